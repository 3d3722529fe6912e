"""Scale-out on Ray Serve: one chattts-ort engine per replica, behind Ray's HTTP proxy.

Each replica loads the export once through the same recipe as `chattts-ort serve` (server.load_server: a Runtime
with its audio path and the OpenAI-compatible FastAPI app) and serves up to `max_streams` concurrent speech streams
as rows of its batched decode loop. Ray's proxy streams the responses as the replica produces them.

- max_ongoing_requests = max_streams: Ray's router sends a replica no more requests than it has rows, so no request
  waits inside an engine while another replica has a free row; the others wait in Ray's queue, and past
  `max_queued_requests` Ray answers 503.
- Autoscaling (when max_replicas > min_replicas) follows ongoing requests, aiming at `target_fill` of each
  replica's rows, so a new replica starts before the running ones are full.
- Each replica reserves `threads` logical CPUs (ray_actor_options num_cpus): a node of C cores runs C / threads
  replicas; the model folder must be readable at the same path on every node.

Three ways in:

    chattts-ort serve --model DIR --ray --replicas 2                       # a local Ray instance on this host
    (api_key=KEY, or $CHATTTS_ORT_API_KEY in each replica's environment: the same access control as `serve`)
    serve run chattts_ort.ray_serve:app_builder model=DIR max_streams=4 min_replicas=1 max_replicas=8
    RayService (KubeRay): import_path chattts_ort.ray_serve:app_builder, the same args (README, "Scale-out")
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

try:
    from pydantic import BaseModel, Field, field_validator
    from ray import serve
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(f"chattts_ort.ray_serve needs Ray Serve (pip install 'chattts-ort[ray]'): {e}") from None

from .server import load_server


class RayServeArgs(BaseModel):
    """The arguments of one chattts-ort application on Ray Serve (`serve run ... key=value` or a RayService's
    `args`). Ray validates them against this model before any replica starts."""

    model: str = Field(..., description="export folder, at the same path on every node")
    max_streams: int = Field(4, ge=1, le=256, description="concurrent streams per replica (rows of its engine)")
    threads: int = Field(2, ge=1, le=256, description="intra-op threads per replica = the CPUs it reserves")
    replicas: Optional[int] = Field(None, ge=1, description="a fixed number of replicas (no autoscaling)")
    min_replicas: int = Field(1, ge=0)
    max_replicas: Optional[int] = Field(None, ge=1, description="autoscale up to this many replicas")
    target_fill: float = Field(0.75, gt=0, le=1, description="autoscaling target: ongoing requests / max_streams")
    max_queued_requests: int = Field(64, ge=-1, description="requests waiting in Ray's queue before a 503 (-1: no limit)")
    voices: Optional[str] = Field(None, description="folder of NAME.txt spk_emb voices, at the same path on every node")
    lookahead: Optional[int] = Field(None, ge=0, description="default audio lookahead in frames (None: exact)")
    queue_timeout: float = Field(30.0, ge=0, allow_inf_nan=False,
                                 description="seconds a request may wait for a row inside a replica")
    name: str = Field("chattts", description="the model name the API serves")
    batch_invariant: bool = True
    max_context: Optional[int] = Field(None, ge=2, description="KV positions per stream")
    api_key: Optional[str] = Field(None, repr=False, description="required as 'Authorization: Bearer' on /v1 routes "
                                   "(None: each replica's $CHATTTS_ORT_API_KEY, if set)")
    max_input_chars: int = Field(4096, ge=1, le=1 << 20, description="longest input in characters")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body (413 past it)")
    body_timeout: float = Field(30.0, gt=0, allow_inf_nan=False, description="seconds to receive a request body")

    @field_validator("model", "voices", mode="before")
    @classmethod
    def _path(cls, v):
        return os.fspath(v) if isinstance(v, os.PathLike) else v


@serve.deployment(name="chattts-ort", health_check_period_s=10, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=30)
@serve.ingress()
class SpeechReplica:
    """One engine: a Runtime and its app, built when Ray starts the replica."""

    def __init__(self, model: str, settings: Dict[str, Any]):
        replica = serve.get_replica_context().replica_id.unique_id
        if not settings.get("api_key"):  # a RayService passes its secret as the replicas' environment
            from .server import API_KEY_ENV

            settings = {**settings, "api_key": (os.environ.get(API_KEY_ENV) or "").strip() or None}
        self.runtime, self._app = load_server(model, served_by=f"{replica}@{os.uname().nodename}:{os.getpid()}",
                                              **settings)

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self):
        """Ray's health check: a closed or broken engine takes the replica out of rotation (Ray restarts it)."""
        if self.runtime.closed:
            raise RuntimeError("the replica's runtime is closed")

    def __del__(self):
        rt = getattr(self, "runtime", None)
        if rt is not None:
            rt.close()


def deployment_options(args: RayServeArgs) -> Dict[str, Any]:
    """Ray Serve options for ARGS: rows as max_ongoing_requests, CPUs per replica, fixed or autoscaled replicas."""
    opts: Dict[str, Any] = {
        "max_ongoing_requests": args.max_streams,
        "max_queued_requests": args.max_queued_requests,
        "ray_actor_options": {"num_cpus": args.threads},
    }
    if args.replicas is not None:
        if args.max_replicas is not None:
            raise ValueError("give either replicas (a fixed count) or max_replicas (autoscaling), not both")
        opts["num_replicas"] = args.replicas
    elif args.max_replicas is not None and args.max_replicas > args.min_replicas:
        opts["autoscaling_config"] = {
            "min_replicas": args.min_replicas,
            "initial_replicas": max(1, args.min_replicas),
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": max(1.0, args.target_fill * args.max_streams),
        }
    else:
        opts["num_replicas"] = max(1, args.max_replicas or args.min_replicas)
    return opts


def app_builder(args: RayServeArgs):
    """The Ray Serve application for ARGS (what `serve run chattts_ort.ray_serve:app_builder k=v ...` calls)."""
    if isinstance(args, dict):
        args = RayServeArgs(**args)
    options = deployment_options(args)
    model = os.path.abspath(args.model)
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model folder not found: {model}")
    settings = {"max_streams": args.max_streams, "threads": args.threads, "voice_dir": args.voices,
                "lookahead": args.lookahead, "queue_timeout": args.queue_timeout, "model_name": args.name,
                "batch_invariant": args.batch_invariant, "max_context": args.max_context, "api_key": args.api_key,
                "max_input_chars": args.max_input_chars, "max_body_bytes": args.max_body_bytes,
                "body_timeout": args.body_timeout}
    return SpeechReplica.options(**options).bind(model, settings)


def run(args: RayServeArgs, host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None,
        blocking: bool = True, insecure_no_api_key: bool = False) -> None:
    """Start (or join, with ADDRESS) a Ray instance, put the app behind Ray's HTTP proxy on HOST:PORT and serve
    until interrupted (blocking) or return once every replica is ready (blocking=False)."""
    import ray

    from .server import check_settings

    if isinstance(args, dict):
        args = RayServeArgs(**args)
    # the proxy's address and the replicas' settings are checked before Ray starts (ValueError, one line)
    check_settings(host=host, port=port, queue_timeout=args.queue_timeout, max_streams=args.max_streams,
                   lookahead=args.lookahead, max_context=args.max_context, max_input_chars=args.max_input_chars,
                   max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout,
                   api_key=args.api_key or (os.environ.get("CHATTTS_ORT_API_KEY") or "").strip() or None,
                   insecure_no_api_key=insecure_no_api_key)
    app = app_builder(args)  # bad arguments fail here, before Ray starts
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:  # a local instance on this host only
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="chattts-ort", route_prefix="/", blocking=False)
    if blocking:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
