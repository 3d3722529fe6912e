"""Scale-out on Ray Serve: a local Ray instance on 127.0.0.1 with two replicas of the tiny export behind Ray's HTTP
proxy; concurrent streams reach both replicas and each is identical to a solo run on a local Runtime; responses
stream through the proxy (the first event arrives long before a long request ends); options and refusals."""
import concurrent.futures as cf
import json
import os
import socket
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
ray = pytest.importorskip("ray", reason="the ray extra is not installed")
pytest.importorskip("ray.serve", reason="the ray extra is not installed")

from chattts_ort import Runtime  # noqa: E402
from chattts_ort.ray_serve import RayServeArgs, app_builder, deployment_options, run  # noqa: E402

from chattts_ort import InferCodeParams  # noqa: E402
from chattts_ort.server import load_voices, speed_tag  # noqa: E402

from .test_server import FRAMES  # noqa: E402


def solo_stream(rt, text, seed, voice="alloy") -> np.ndarray:
    """The request as the server makes it (stream_audio with its chunking), alone on a local Runtime."""
    spk = load_voices(None, rt.config["hidden_size"])[voice]
    p = InferCodeParams(prompt=speed_tag(1.0), max_new_token=FRAMES, manual_seed=seed)
    return np.concatenate([c.samples for c in rt.stream_audio(text, params=p, speaker=spk, dtype="int16")])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def export(_private_cache):
    from chattts_ort.export.exporter import default_export

    return default_export("tiny", layer_form="fused")


@pytest.fixture(scope="module")
def cluster(export, tmp_path_factory):
    from ray import serve

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # 4 logical CPUs: two replicas of 1 thread each, plus Ray's controller and proxy, on the 2-core machine
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, configure_logging=False,
             log_to_driver=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        port = _free_port()
        run(RayServeArgs(model=export, replicas=2, max_streams=2, threads=1), host="127.0.0.1", port=port,
            blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _speech(url, **body):
    body = {"input": "hello world", "seed": 5, "response_format": "pcm", "max_new_token": FRAMES, **body}
    with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=120) as r:
        return r.status_code, r.headers.get("x-served-by"), r.read()


def test_two_replicas_serve_concurrent_streams_identical_to_solo(cluster, export):
    health = httpx.get(cluster + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["max_streams"] == 2
    seeds = [5, 6, 7, 8] * 2
    with cf.ThreadPoolExecutor(len(seeds)) as ex:
        results = list(ex.map(lambda s: _speech(cluster, seed=s), seeds))
    assert all(status == 200 for status, _, _ in results), [r[:2] for r in results]
    served = {who for _, who, _ in results}
    assert len(served) == 2, f"both replicas should have served: {served}"
    # the replicas' engine settings (server.load_server: batch-invariant rows), the requests one at a time
    with Runtime.load(export, threads=1, max_streams=2, batch_invariant=True) as rt:
        for seed, (_, who, data) in zip(seeds, results):
            got = np.frombuffer(data, dtype="<i2")
            np.testing.assert_array_equal(got, solo_stream(rt, "hello world", seed), err_msg=f"seed {seed} on {who}")


def test_responses_stream_through_the_proxy(cluster):
    body = {"input": "hello world", "seed": 3, "response_format": "pcm", "stream_format": "sse",
            "max_new_token": 900, "min_new_token": 900}
    t0 = time.perf_counter()
    with httpx.stream("POST", cluster + "/v1/audio/speech", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        first, events = None, []
        for line in r.iter_lines():
            if line.startswith("data: "):
                if first is None:
                    first = time.perf_counter() - t0
                events.append(json.loads(line[6:]))
    total = time.perf_counter() - t0
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] == 900 * 512 - 256
    assert len(events) > 10
    # a proxy that buffered the response would deliver its first event only at the end
    assert first < 0.5 * total, (first, total)
    print(f"first event {first:.3f} s, whole response {total:.3f} s")


def test_bad_requests_keep_openai_errors_behind_the_proxy(cluster):
    r = httpx.post(cluster + "/v1/audio/speech", json={"input": "", "voice": "alloy"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = httpx.post(cluster + "/v1/audio/speech", json={"input": "hi", "voice": "../../etc/passwd"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "voice"


def test_deployment_options():
    fixed = deployment_options(RayServeArgs(model="m", replicas=3, max_streams=4, threads=2))
    assert fixed["num_replicas"] == 3 and fixed["max_ongoing_requests"] == 4
    assert fixed["ray_actor_options"] == {"num_cpus": 2} and "autoscaling_config" not in fixed
    auto = deployment_options(RayServeArgs(model="m", min_replicas=1, max_replicas=8, max_streams=8))
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 8,
                                          "target_ongoing_requests": 6.0}
    assert deployment_options(RayServeArgs(model="m"))["num_replicas"] == 1
    with pytest.raises(ValueError, match="not both"):
        deployment_options(RayServeArgs(model="m", replicas=2, max_replicas=4))
    with pytest.raises(ValueError):
        RayServeArgs(model="m", max_streams=0)


def test_app_builder_refuses_a_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        app_builder({"model": str(tmp_path / "nope")})


def test_cli_refuses_conflicting_replica_options_before_starting_ray(export):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "chattts_ort.cli", "serve", "--model", str(export), "--replicas", "2",
                        "--max-replicas", "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not both" in r.stderr and "Traceback" not in r.stderr


def test_ray_settings_are_checked_before_ray_starts(monkeypatch):
    """The same access control and setting checks as `serve`, refused before Ray starts."""
    monkeypatch.delenv("CHATTTS_ORT_API_KEY", raising=False)
    for bad in (float("nan"), float("inf"), -1):
        with pytest.raises(ValueError):
            RayServeArgs(model="m", queue_timeout=bad)
    with pytest.raises(ValueError, match="--api-key"):
        run(RayServeArgs(model="m"), host="0.0.0.0", port=8000, blocking=False)
    with pytest.raises(ValueError, match="--port"):
        run(RayServeArgs(model="m"), host="127.0.0.1", port=70000, blocking=False)
    args = RayServeArgs(model="m", api_key="sk-secret", max_input_chars=100)
    assert "sk-secret" not in repr(args) and args.api_key == "sk-secret"
