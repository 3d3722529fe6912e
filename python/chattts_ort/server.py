"""`chattts-ort serve`: OpenAI's speech API over the public Runtime API (FastAPI + uvicorn, the `serve` extra).

    POST /v1/audio/speech   {"model", "input", "voice", "response_format", "speed", "stream_format", + ChatTTS's
                             own fields: seed, temperature, top_P, top_K, spk_emb, refine_text, lookahead,
                             max_new_token, min_new_token}
    GET  /v1/audio/voices   the named voices
    GET  /v1/models         the served model
    GET  /health

Audio streams as the GPT samples it: the response starts with the first audio (so a request refused by a full
queue gets a 503, not a broken stream), each chunk is encoded as it comes (encode.py), and a client that goes away
cancels its generation at the next step. Concurrent requests are rows of the Runtime's batched decode loop
(`max_streams`); past those, a request waits in the Runtime's FIFO up to `queue_timeout` seconds. Voices are seeded
random speakers under OpenAI's names, `seed:N`, and the spk_emb strings of a voice folder read at start-up (no
request names a file).
"""
# No `from __future__ import annotations` here: FastAPI must see the request model itself (a local class) in the
# endpoint signature, not a string it cannot resolve.
import asyncio
import base64
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Dict, Optional

from .encode import FORMATS, MEDIA_TYPES, Encoder
from .errors import GenerationError

# OpenAI's voice names, each a seeded random ChatTTS speaker (ChatTTS has no named voices of its own).
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")
_VOICE_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
MAX_INPUT_CHARS = 4096  # OpenAI's limit
MIN_FRAMES = 64  # frames of audio every admitted prompt leaves room for in max_context (~1.4 s)
API_KEY_ENV = "CHATTTS_ORT_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
# Connection hygiene (uvicorn serve; docs/SERVING.md): defaults of the serve command.
MAX_BODY_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 10
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
MAX_CONNECTIONS = 1000
FD_RESERVE = 64  # descriptors kept for the model's files, threads' pipes and logs
log = logging.getLogger("chattts_ort.server")


def speed_tag(speed: float) -> str:
    """OpenAI's speed (0.25..4, 1 = normal) as ChatTTS's [speed_N] (0..9, 5 = normal): N = round(5 x speed)."""
    return f"[speed_{min(9, max(0, int(round(5 * speed))))}]"


def load_voices(folder: Optional[Path], dim: int) -> Dict[str, str]:
    """Named voices: OpenAI's names as seeded speakers, then NAME.txt files (a spk_emb string each) of `folder`."""
    from .speaker import decode_spk_emb, random_speaker

    voices = {name: random_speaker(seed=i + 1, dim=dim) for i, name in enumerate(OPENAI_VOICES)}
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"voice folder not found: {folder}")
        for p in sorted(folder.glob("*.txt")):
            if _VOICE_NAME.match(p.stem):
                s = p.read_text(encoding="utf-8").strip()
                decode_spk_emb(s, dim=dim)  # a bad file fails at start-up, naming itself
                voices[p.stem] = s
    return voices


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}


class ClientLeft(Exception):
    """The client closed its connection while its request waited."""


async def while_connected(request, awaitable, every: float = 0.25):
    """Await `awaitable`, checking every `every` seconds that the client is still there; if it left, cancel the
    work (a place in a queue, a wait for a lock) and raise ClientLeft. Holds no thread."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientLeft()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def error_json(status: int, message: str, code: Optional[str], kind: str = "invalid_request_error",
               param: Optional[str] = None, headers: Optional[dict] = None):
    """(status, headers, body) of an error in OpenAI's shape, for the raw ASGI and protocol layers."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()
    h = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
         (b"connection", b"close")]
    h += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in (headers or {}).items()]
    return status, h, body


def is_loopback(host: str) -> bool:
    """Whether HOST only listens on this machine (127.0.0.0/8, ::1, localhost); names count as not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_settings(host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", queue_timeout: float = 30.0,
                   api_key: Optional[str] = None, insecure_no_api_key: bool = False, max_streams: int = 4,
                   lookahead: Optional[int] = None, max_context: Optional[int] = None,
                   max_input_chars: int = MAX_INPUT_CHARS, max_body_bytes: int = MAX_BODY_BYTES,
                   max_header_bytes: int = MAX_HEADER_BYTES, header_timeout: float = HEADER_TIMEOUT,
                   body_timeout: float = BODY_TIMEOUT, max_connections: Optional[int] = MAX_CONNECTIONS) -> None:
    """Refuse a bad server setting before anything loads: ValueError with a one-line message naming the option.
    (The settings that need the export, lookahead's upper bound and max_context's lower one, are checked by
    load_server right after the load, before the server listens.)"""
    def integer(name, v, lo, hi=None):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
            raise ValueError(f"--{name} must be an integer {rng}, got {v!r}")

    def seconds(name, v, positive=False):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or \
                (positive and v == 0):
            raise ValueError(f"--{name} must be a finite number of seconds {'> 0' if positive else '>= 0'}, "
                             f"got {v!r}")

    integer("port", port, 1, 65535)
    seconds("queue-timeout", queue_timeout)
    seconds("header-timeout", header_timeout, positive=True)
    seconds("body-timeout", body_timeout, positive=True)
    if not isinstance(log_level, str) or log_level.lower() not in LOG_LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    integer("max-streams", max_streams, 1, 4096)
    if lookahead is not None:
        integer("lookahead", lookahead, 0)
    if max_context is not None:
        integer("max-context", max_context, 2)
    integer("max-input-chars", max_input_chars, 1, 1 << 20)
    integer("max-body-bytes", max_body_bytes, 1024)
    integer("max-header-bytes", max_header_bytes, 1024, 1 << 20)
    if max_connections is not None:
        integer("max-connections", max_connections, 8)
    if api_key is not None and (not api_key or not api_key.isprintable() or any(c.isspace() for c in api_key)):
        raise ValueError("--api-key must be a non-empty string of printable characters without spaces")
    if not is_loopback(host) and not api_key and not insecure_no_api_key:
        raise ValueError(f"--host {host} is reachable from other machines: give --api-key KEY (or {API_KEY_ENV}), "
                         "or --insecure-no-api-key to serve it to anyone who can connect")


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed; the soft limit now in force."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 16


def connection_cap(requested: Optional[int], fd_limit: int) -> int:
    """The connection cap: REQUESTED (default MAX_CONNECTIONS), which must stay FD_RESERVE under the limit."""
    most = fd_limit - FD_RESERVE
    if requested is None:
        return max(8, min(MAX_CONNECTIONS, most))
    if requested > most:
        raise ValueError(f"--max-connections {requested} does not fit the {fd_limit} file descriptors this process "
                         f"may open (at most {most}; raise ulimit -n)")
    return requested


class _Guard:
    """ASGI middleware in front of the app: the API key on /v1 routes (constant-time), the request body's size
    (from Content-Length at once, and while it streams: never read past the cap) and its read deadline, and with
    max_streams 1 a one-at-a-time gate on the speech route (waiting up to queue_timeout, then 503)."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int, body_timeout: float,
                 gate: Optional[asyncio.Semaphore], queue_timeout: float):
        self.app, self.max_body, self.body_timeout, self.gate, self.queue_timeout = (
            app, max_body_bytes, body_timeout, gate, queue_timeout)
        self.key = api_key.encode() if api_key else None

    @staticmethod
    async def _reply(send, status, message, code, kind="invalid_request_error", param=None, headers=None):
        status, h, body = error_json(status, message, code, kind, param, headers)
        await send({"type": "http.response.start", "status": status, "headers": h})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = scope.get("headers") or []
        if self.key is not None and (path == "/v1" or path.startswith("/v1/")):
            got = b""
            for k, v in headers:
                if k == b"authorization":
                    scheme, _, token = v.strip().partition(b" ")
                    got = token.strip() if scheme.lower() == b"bearer" else b""
                    break
            if not hmac.compare_digest(got, self.key):
                return await self._reply(send, 401, "Incorrect API key provided. Pass it as 'Authorization: Bearer "
                                         "KEY'." if got else "Missing API key: pass it as 'Authorization: Bearer KEY'.",
                                         "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        for k, v in headers:
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return await self._reply(send, 400, "Content-Length is not a number", "invalid_request")
                if n > self.max_body:
                    return await self._reply(send, 413, f"the request body has {n} bytes; this server takes at most "
                                                        f"{self.max_body}", "request_too_large")
        loop = asyncio.get_running_loop()
        state = {"read": 0, "more": scope.get("method") not in ("GET", "HEAD"), "replied": False, "deadline": None}

        async def guarded_receive():
            if not state["more"] or state["replied"]:
                return await receive()
            if state["deadline"] is None:  # the body's clock starts when the app first reads it (after any gate)
                state["deadline"] = loop.time() + self.body_timeout
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, state["deadline"] - loop.time()))
            except asyncio.TimeoutError:
                state["replied"] = True
                await self._reply(send, 408, f"the request body did not arrive within {self.body_timeout:g} s",
                                  "request_timeout")
                return {"type": "http.disconnect"}
            if msg["type"] == "http.request":
                state["read"] += len(msg.get("body", b""))
                state["more"] = msg.get("more_body", False)
                if state["read"] > self.max_body:
                    state["replied"] = True
                    await self._reply(send, 413, f"the request body is larger than this server takes "
                                                 f"({self.max_body} bytes)", "request_too_large")
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if not state["replied"]:
                await send(msg)

        if self.gate is not None and path == "/v1/audio/speech" and scope.get("method") == "POST":
            try:
                if self.gate.locked() and self.queue_timeout <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(self.gate.acquire(), self.queue_timeout)
            except asyncio.TimeoutError:
                return await self._reply(send, 503, f"the server is busy: no free stream within "
                                                    f"{self.queue_timeout:g} s", "server_busy", "server_error",
                                         headers={"Retry-After": str(max(1, int(self.queue_timeout)))})
            try:
                return await self.app(scope, guarded_receive, guarded_send)
            finally:
                self.gate.release()
        return await self.app(scope, guarded_receive, guarded_send)


_PROMPT_TOO_LONG = re.compile(r"prompt has (\d+) tokens; it must be shorter than max_context=(\d+)")


def client_message(e: Exception) -> str:
    """A Runtime's message in an HTTP client's terms (no Python API advice)."""
    msg = str(e)
    m = _PROMPT_TOO_LONG.search(msg)
    if m:
        return (f"input is too long for this server's context ({m.group(1)} tokens; at most "
                f"{int(m.group(2)) - MIN_FRAMES})")
    return re.sub(r"\s*\((pass|use|give) [^)]*(Runtime|load|export)[^)]*\)", "", msg)


def create_app(rt, model_name: str = "chattts", voices: Optional[Dict[str, str]] = None,
               default_lookahead: Optional[int] = None, queue_timeout: float = 30.0, max_new_token: int = 2048,
               served_by: Optional[str] = None, api_key: Optional[str] = None,
               max_input_chars: int = MAX_INPUT_CHARS, max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout: float = BODY_TIMEOUT, max_streams: Optional[int] = None):
    """The FastAPI app serving `rt` (a loaded Runtime with its audio path; max_streams > 1 for concurrency).
    served_by: a name for this server (a Ray Serve replica's id), sent as the X-Served-By header of each speech
    response and in /health, so a client can tell replicas apart. api_key: required as `Authorization: Bearer` on
    every /v1 route (/health and / stay open). max_input_chars: the longest input (OpenAI's 4096). max_body_bytes,
    body_timeout: the request body's cap and read deadline. max_streams: requests generating at once (default the
    Runtime's rows; 1 admits one at a time on a Runtime of 2 rows)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import InferCodeParams, RefineTextParams

    if not rt.has_audio:
        raise ValueError(f"the model cannot speak: {rt.no_audio_reason}")
    voices = voices if voices is not None else load_voices(None, rt.config["hidden_size"])
    from .params import build_prompt_code
    from .speaker import decode_spk_emb

    dim = rt.config["hidden_size"]
    # Decoded once here: a request never decodes a named voice on the event loop (plan runs in a thread anyway).
    voice_values = {name: decode_spk_emb(v, dim=dim) if isinstance(v, str) else v for name, v in voices.items()}
    max_prompt = rt.max_context - MIN_FRAMES
    served_streams = rt.max_streams if max_streams is None else max_streams
    models = {model_name, "tts-1", "tts-1-hd", "gpt-4o-mini-tts"}  # OpenAI's names reach the one model too
    # Text refinement runs on the Runtime's single generation state, one at a time: requests wait for it on the
    # event loop (no thread), at most queue_timeout from their arrival, and leave the line when their client does.
    refine_lock = asyncio.Lock()

    class SpeechRequest(BaseModel):
        model: str = model_name
        input: str
        voice: str = "alloy"
        response_format: str = "mp3"
        speed: float = Field(1.0, ge=0.25, le=4.0)
        stream_format: str = "audio"
        instructions: Optional[str] = None  # OpenAI's; ChatTTS takes no instructions (ignored)
        seed: Optional[int] = Field(None, ge=0, lt=2**63)
        temperature: Optional[float] = None
        top_P: Optional[float] = None
        top_K: Optional[int] = None
        spk_emb: Optional[str] = Field(None, max_length=16384)
        refine_text: bool = False
        lookahead: Optional[int] = None
        max_new_token: Optional[int] = Field(None, ge=1)
        min_new_token: Optional[int] = Field(None, ge=0)

    app = FastAPI(title="chattts-ort", description="OpenAI-compatible ChatTTS speech server")
    gate = asyncio.Semaphore(1) if served_streams == 1 else None
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout=body_timeout, gate=gate,
                       queue_timeout=queue_timeout)

    def error_body(e: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}},
                            status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_body(e)

    @app.exception_handler(ClientLeft)
    async def _client_left(request, e: ClientLeft):
        # nobody reads this; 499 ("client closed request") marks it in the access log
        return JSONResponse({"error": {"message": "client closed the request", "type": "invalid_request_error",
                                       "param": None, "code": "client_closed"}}, status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            why = (first.get("ctx") or {}).get("error", "")
            return error_body(ApiError(400, f"the request body is not valid JSON{': ' + str(why) if why else ''}",
                                       code="invalid_json"))
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        if first.get("type") == "missing" and not loc:
            return error_body(ApiError(400, "the request needs a JSON body", code="invalid_json"))
        return error_body(ApiError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}",
                                   param=".".join(loc) or None, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:
            msg, code = f"no route {request.method} {request.url.path} on this server", "not_found"
        elif e.status_code == 405:
            msg, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            msg, code = str(e.detail), None
        return error_body(ApiError(e.status_code, msg, code=code, headers=dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_body(ApiError(500, "internal server error", code="internal_error", kind="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "max_streams": served_streams, "rows": rt.max_streams,
                "sample_rate": rt.sample_rate, "served_by": served_by, "auth": api_key is not None}

    # The web page (web/index.html: speak, play as it streams, download a WAV), open like /health, its assets under
    # /web/; the browser calls the /v1 routes with the API key the user types in.
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    web_dir = Path(__file__).with_name("web")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(web_dir / "index.html", media_type="text/html")

    app.mount("/web", StaticFiles(directory=web_dir), name="web")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "chattts-ort"}]}

    @app.get("/v1/audio/voices")
    async def list_voices():
        return {"voices": sorted(voices)}

    def plan(req: SpeechRequest):
        if req.model not in models:
            raise ApiError(404, f"model {req.model!r} does not exist (this server has {model_name!r})", "model",
                           "model_not_found")
        text = req.input
        if not text.strip():
            raise ApiError(400, "input is empty", "input", "invalid_value")
        if len(text) > max_input_chars:
            raise ApiError(400, f"input is too long: {len(text)} characters; this server takes at most "
                                f"{max_input_chars}", "input", "invalid_value")
        if req.response_format not in FORMATS:
            raise ApiError(400, f"response_format must be one of {', '.join(FORMATS)}", "response_format",
                           "invalid_value")
        if req.stream_format not in ("audio", "sse"):
            raise ApiError(400, "stream_format must be 'audio' or 'sse'", "stream_format", "invalid_value")
        if req.lookahead is not None and not 0 <= req.lookahead <= rt.exact_lookahead:
            raise ApiError(400, f"lookahead must be in 0..{rt.exact_lookahead} frames", "lookahead", "invalid_value")
        if req.spk_emb is not None:
            try:
                speaker = decode_spk_emb(req.spk_emb, dim=dim)
            except (ValueError, TypeError) as e:
                raise ApiError(400, f"spk_emb: {client_message(e)}", "spk_emb", "invalid_value") from None
        elif req.voice in voice_values:
            speaker = voice_values[req.voice]
        elif re.fullmatch(r"seed:\d{1,9}", req.voice):
            from .speaker import decode_spk_emb as _dec, random_speaker

            speaker = _dec(random_speaker(seed=int(req.voice[5:]), dim=dim), dim=dim)
        else:
            raise ApiError(400, f"voice {req.voice!r} is not one of this server's voices (GET /v1/audio/voices), "
                                "nor seed:N", "voice", "invalid_value")
        if req.max_new_token is not None and req.max_new_token > max_new_token:
            raise ApiError(400, f"max_new_token is at most {max_new_token} on this server", "max_new_token",
                           "invalid_value")
        kw = {"prompt": speed_tag(req.speed), "max_new_token": req.max_new_token or max_new_token,
              "queue_timeout": queue_timeout}
        if req.min_new_token is not None:
            kw["min_new_token"] = req.min_new_token
        for field in ("temperature", "top_P", "top_K"):
            if getattr(req, field) is not None:
                kw[field] = getattr(req, field)
        if req.seed is not None:
            kw["manual_seed"] = req.seed
        try:
            params = InferCodeParams(**kw)
            params.validate()
        except (TypeError, ValueError) as e:
            raise ApiError(400, client_message(e), None, "invalid_value") from None
        if not req.refine_text:  # the prompt's length, known before the request takes a row
            try:
                text = rt.prepare_text(text)[0]  # ChatTTS's front-end, once: the stream takes it as it is
                n = len(rt.tokenize(build_prompt_code(text, True, params.txt_smp, params.prompt)))
            except (TypeError, ValueError) as e:
                raise ApiError(400, client_message(e), "input", "invalid_value") from None
            if n > max_prompt:
                raise ApiError(400, f"input is too long for this server's context ({n} tokens; at most "
                                    f"{max_prompt})", "input", "context_length_exceeded")
        return text, speaker, params

    @app.post("/v1/audio/speech")
    async def speech(req: SpeechRequest, request: Request):
        arrived = time.monotonic()
        text, speaker, params = await asyncio.to_thread(plan, req)  # voices, the front-end: off the event loop
        busy = ApiError(503, "the server is busy: no free stream in time; try again later", None, "server_busy",
                        "server_error", {"Retry-After": str(max(1, int(queue_timeout)))})
        if req.refine_text:
            async def refine():
                await asyncio.wait_for(refine_lock.acquire(), queue_timeout)
                try:
                    return await asyncio.to_thread(
                        rt.refine_text, text, params=RefineTextParams(manual_seed=params.manual_seed))
                finally:
                    refine_lock.release()
            try:
                text = await while_connected(request, refine())
            except asyncio.TimeoutError:
                raise busy from None
            except (ValueError, TypeError) as e:
                raise ApiError(400, client_message(e), None, "invalid_value") from None
            except GenerationError as e:
                raise ApiError(500, str(e), None, "generation_failed", "server_error") from None
        lookahead = req.lookahead if req.lookahead is not None else default_lookahead
        # what is left of the request's wait for a row counts from its arrival
        left = max(0.05, queue_timeout - (time.monotonic() - arrived))
        params = dataclasses.replace(params, queue_timeout=left)
        try:
            enc = Encoder(req.response_format, rt.sample_rate)
            # ChatTTS's front-end ran once already: in plan(), or inside refine_text when refining
            frames = rt.astream_audio(text, params=params, speaker=speaker, lookahead=lookahead, normalize=False)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ApiError(400, client_message(e), None, "invalid_value") from None
        done = object()
        try:
            first = await while_connected(request, anext(frames, done))
        except (ValueError, TypeError) as e:
            await frames.aclose()
            raise ApiError(400, client_message(e), None, "invalid_value") from None
        except GenerationError as e:
            await frames.aclose()
            if "free stream" in str(e):
                raise busy from None
            raise ApiError(500, str(e), None, "generation_failed", "server_error") from None
        except BaseException:
            await frames.aclose()
            raise

        sse = req.stream_format == "sse"

        def pack(data: bytes) -> bytes:
            if not sse:
                return data
            event = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")}
            return f"data: {json.dumps(event)}\n\n".encode()

        async def body():
            chunk, samples = first, 0
            try:
                while chunk is not done:
                    samples += len(chunk.samples)
                    data = enc.add(chunk.samples)
                    if data:
                        yield pack(data)
                    chunk = await anext(frames, done)
                tail = enc.close()
                if tail:
                    yield pack(tail)
                if sse:
                    done_event = {"type": "speech.audio.done",
                                  "usage": {"input_tokens": len(text), "output_tokens": samples,
                                            "total_tokens": len(text) + samples}}
                    yield f"data: {json.dumps(done_event)}\n\n".encode()
            finally:  # the client left, or the stream ended: the generation's row is freed at its next step
                await frames.aclose()

        media = "text/event-stream" if sse else MEDIA_TYPES[req.response_format]
        headers = {"X-Served-By": served_by} if served_by else None
        return StreamingResponse(body(), media_type=media, headers=headers)

    return app


def load_server(model: str, max_streams: int = 4, threads=None, voice_dir=None, lookahead=None,
                queue_timeout: float = 30.0, model_name: str = "chattts", batch_invariant: bool = True,
                max_context=None, served_by: Optional[str] = None, api_key: Optional[str] = None,
                max_input_chars: int = MAX_INPUT_CHARS, max_body_bytes: int = MAX_BODY_BYTES,
                body_timeout: float = BODY_TIMEOUT):
    """Load MODEL and build its app: (runtime, app). The one recipe behind `chattts-ort serve` and each Ray Serve
    replica (ray_serve.py). batch_invariant (default): a request's audio does not depend on the others running
    beside it (Runtime.load's batch_invariant; at int4 it costs one extra row when alone). max_context: KV positions
    per stream (Runtime.load's; the KV cache of every stream is allocated at start: ~250 MB per stream at 2048 for
    ChatTTS); it must hold the fixed prompt, one token of input and MIN_FRAMES frames, and a request's prompt may
    use at most max_context - MIN_FRAMES positions (longer: a 400). A request is cut at max_context - its prompt.

    max_streams 1: one request generates at a time (the others wait up to queue_timeout, then 503), on an engine of
    2 rows, because the server's queue is the batched loop's and that loop has at least 2 rows; with
    batch_invariant the second row is the invariance pad (each step runs 2 rows), without it the row stays unused.
    The settings are checked (check_settings, then lookahead and max_context against the export) before the app
    is built: a ValueError with a one-line message."""
    from .params import build_prompt_code
    from .runtime import Runtime

    check_settings(queue_timeout=queue_timeout, max_streams=max_streams, lookahead=lookahead,
                   max_context=max_context, max_input_chars=max_input_chars, max_body_bytes=max_body_bytes,
                   body_timeout=body_timeout, api_key=api_key)
    rt = Runtime.load(model, threads=threads, max_streams=max(2, max_streams), batch_invariant=batch_invariant,
                      max_context=max_context)
    try:
        if lookahead is not None and lookahead > rt.exact_lookahead:
            raise ValueError(f"--lookahead must be in 0..{rt.exact_lookahead} (this export's exact lookahead), "
                             f"got {lookahead}")
        fixed = len(rt.tokenize(build_prompt_code("", True, None, speed_tag(1.0))))
        least = fixed + 1 + MIN_FRAMES
        if rt.max_context < least:
            raise ValueError(f"--max-context {rt.max_context} is too small: a request needs its fixed prompt "
                             f"({fixed} tokens), at least 1 token of input and {MIN_FRAMES} frames: at least {least}")
        voices = load_voices(voice_dir, rt.config["hidden_size"])
        app = create_app(rt, model_name=model_name, voices=voices, default_lookahead=lookahead,
                         queue_timeout=queue_timeout, max_new_token=min(2048, rt.max_context - 1),
                         served_by=served_by, api_key=api_key, max_input_chars=max_input_chars,
                         max_body_bytes=max_body_bytes, body_timeout=body_timeout, max_streams=max_streams)
    except BaseException:
        rt.close()
        raise
    return rt, app


def guarded_protocol(max_connections: int, max_header_bytes: int = MAX_HEADER_BYTES,
                     header_timeout: float = HEADER_TIMEOUT):
    """uvicorn's h11 protocol with what uvicorn has no option for: the request head (request line and headers)
    must arrive within `header_timeout` seconds (of the connection, or of the first byte of a keep-alive request)
    and within `max_header_bytes` (431 at once, before parsing a byte more); past `max_connections` open
    connections, a new one closes the connection idle longest in its head (a half-sent request, an idle
    keep-alive), so a flood of slow clients cannot keep /health (or anyone) out; when every connection is busy
    with a request, the new one gets a 503."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    head_end = re.compile(rb"\r?\n\r?\n")

    def raw(transport, status: int, reason: str, message: str, code: str, kind: str = "invalid_request_error"):
        status, headers, body = error_json(status, message, code, kind)
        head = f"HTTP/1.1 {status} {reason}\r\n".encode() + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        transport.write(head + b"\r\n" + body)
        transport.close()

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._head_since = self.loop.time()
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)
            if len(self.connections) > max_connections:
                idle = [c for c in self.connections if c is not self and c._in_head()]
                if idle:
                    oldest = min(idle, key=lambda c: c._head_since)
                    oldest._drop()
                else:
                    raw(transport, 503, "Service Unavailable", "the server has too many open connections; try "
                        "again later", "too_many_connections", "server_error")

        def _in_head(self) -> bool:
            return (not self.transport.is_closing() and self.conn.their_state is h11.IDLE
                    and (self.cycle is None or self.cycle.response_complete))

        def _drop(self):
            self._cancel_head_timer()
            self.transport.close()

        def _cancel_head_timer(self):
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self):
            self._head_timer = None
            if not self._in_head():
                return
            if self.conn.trailing_data[0]:
                raw(self.transport, 408, "Request Timeout", f"the request head did not arrive within "
                    f"{header_timeout:g} s", "request_timeout")
            else:
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                pending = self.conn.trailing_data[0]
                if self._head_timer is None:  # the first byte of a keep-alive request: its head's clock starts
                    self._head_since = self.loop.time()
                    self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)
                if len(pending) + len(data) > max_header_bytes:
                    window = pending[-3:] + data[:max(0, max_header_bytes + 4 - len(pending))]
                    if len(pending) > max_header_bytes or not head_end.search(window):
                        raw(self.transport, 431, "Request Header Fields Too Large", f"the request head is larger "
                            f"than this server takes ({max_header_bytes} bytes)", "request_header_too_large")
                        return
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._head_since = self.loop.time()  # idle keep-alive: uvicorn's keep-alive timeout closes it

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

    return GuardedH11Protocol


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          max_connections: Optional[int] = None, max_header_bytes: int = MAX_HEADER_BYTES,
          header_timeout: float = HEADER_TIMEOUT, keep_alive: float = 5.0, insecure_no_api_key: bool = False,
          **settings) -> None:
    """Load MODEL and serve it with uvicorn until interrupted; `settings` are load_server's. Every setting is
    checked before the model loads (ValueError, one line)."""
    check_settings(host=host, port=port, log_level=log_level, max_header_bytes=max_header_bytes,
                   header_timeout=header_timeout, max_connections=max_connections,
                   insecure_no_api_key=insecure_no_api_key,
                   **{k: v for k, v in settings.items() if k in ("queue_timeout", "api_key", "max_streams",
                                                                 "lookahead", "max_context", "max_input_chars",
                                                                 "max_body_bytes", "body_timeout")})
    try:
        import uvicorn
    except ImportError as e:
        raise RuntimeError(f"chattts-ort serve needs the serve extra (pip install 'chattts-ort[serve]'): {e}") from None
    fds = raise_fd_limit()
    cap = connection_cap(max_connections, fds)
    rt, app = load_server(model, **settings)
    try:
        streams = settings.get("max_streams", 4)
        extra = ""
        if streams == 1:
            extra = (" (one request at a time on an engine of 2 rows: the second is "
                     + ("batch_invariant's pad, each step runs 2 rows)" if settings.get("batch_invariant", True)
                        else "unused: the server's queue needs the batched loop)"))
        print(f"chattts-ort serve: http://{host}:{port}: {streams} stream(s){extra}; max_context {rt.max_context}; "
              f"API key {'required on /v1' if settings.get('api_key') else 'off'}; at most {cap} connections "
              f"({fds} file descriptors); request head {max_header_bytes} bytes in {header_timeout:g} s; body "
              f"{settings.get('max_body_bytes', MAX_BODY_BYTES)} bytes in {settings.get('body_timeout', BODY_TIMEOUT):g}"
              f" s; input {settings.get('max_input_chars', MAX_INPUT_CHARS)} characters", flush=True)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                                http=guarded_protocol(cap, max_header_bytes, header_timeout),
                                timeout_keep_alive=keep_alive, h11_max_incomplete_event_size=max_header_bytes)
        uvicorn.Server(config).run()
    finally:
        rt.close()
