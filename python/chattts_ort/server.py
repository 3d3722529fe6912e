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
import json
import re
import threading
from pathlib import Path
from typing import Dict, Optional

from .encode import FORMATS, MEDIA_TYPES, Encoder
from .errors import GenerationError

# OpenAI's voice names, each a seeded random ChatTTS speaker (ChatTTS has no named voices of its own).
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")
_VOICE_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
MAX_INPUT_CHARS = 4096  # OpenAI's limit


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


def create_app(rt, model_name: str = "chattts", voices: Optional[Dict[str, str]] = None,
               default_lookahead: Optional[int] = None, queue_timeout: float = 30.0, max_new_token: int = 2048,
               served_by: Optional[str] = None):
    """The FastAPI app serving `rt` (a loaded Runtime with its audio path; max_streams > 1 for concurrency).
    served_by: a name for this server (a Ray Serve replica's id), sent as the X-Served-By header of each speech
    response and in /health, so a client can tell replicas apart."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, Field

    from . import InferCodeParams, RefineTextParams

    if not rt.has_audio:
        raise ValueError(f"the model cannot speak: {rt.no_audio_reason}")
    voices = voices if voices is not None else load_voices(None, rt.config["hidden_size"])
    models = {model_name, "tts-1", "tts-1-hd", "gpt-4o-mini-tts"}  # OpenAI's names reach the one model too
    refine_lock = threading.Lock()  # text refinement runs on the Runtime's single generation state

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

    def error_body(e: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}},
                            status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_body(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        return error_body(ApiError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}",
                                   param=".".join(loc) or None, code="invalid_value"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "max_streams": rt.max_streams, "sample_rate": rt.sample_rate,
                "served_by": served_by}

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
        if len(text) > MAX_INPUT_CHARS:
            raise ApiError(400, f"input has {len(text)} characters; at most {MAX_INPUT_CHARS}", "input",
                           "invalid_value")
        if req.response_format not in FORMATS:
            raise ApiError(400, f"response_format must be one of {', '.join(FORMATS)}", "response_format",
                           "invalid_value")
        if req.stream_format not in ("audio", "sse"):
            raise ApiError(400, "stream_format must be 'audio' or 'sse'", "stream_format", "invalid_value")
        if req.spk_emb is not None:
            speaker = req.spk_emb
        elif req.voice in voices:
            speaker = voices[req.voice]
        elif re.fullmatch(r"seed:\d{1,9}", req.voice):
            from .speaker import random_speaker

            speaker = random_speaker(seed=int(req.voice[5:]), dim=rt.config["hidden_size"])
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
            raise ApiError(400, str(e), None, "invalid_value") from None
        return text, speaker, params

    @app.post("/v1/audio/speech")
    async def speech(req: SpeechRequest, request: Request):
        text, speaker, params = plan(req)
        if req.refine_text:
            def refine():
                with refine_lock:
                    return rt.refine_text(text, params=RefineTextParams(manual_seed=params.manual_seed))
            text = await asyncio.to_thread(refine)
        lookahead = req.lookahead if req.lookahead is not None else default_lookahead
        try:
            # ChatTTS's front-end runs once: inside refine_text when refining, else in stream_audio
            frames = rt.stream_audio(text, params=params, speaker=speaker, lookahead=lookahead,
                                     normalize=not req.refine_text)
            enc = Encoder(req.response_format, rt.sample_rate)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ApiError(400, str(e), None, "invalid_value") from None
        done = object()
        try:
            first = await asyncio.to_thread(next, frames, done)
        except GenerationError as e:
            await asyncio.to_thread(frames.close)
            if "free stream" in str(e):
                raise ApiError(503, f"the server is busy: {e}", None, "server_busy", "server_error",
                               {"Retry-After": str(max(1, int(queue_timeout)))}) from None
            raise ApiError(500, str(e), None, "generation_failed", "server_error") from None

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
                    chunk = await asyncio.to_thread(next, frames, done)
                tail = enc.close()
                if tail:
                    yield pack(tail)
                if sse:
                    done_event = {"type": "speech.audio.done",
                                  "usage": {"input_tokens": len(text), "output_tokens": samples,
                                            "total_tokens": len(text) + samples}}
                    yield f"data: {json.dumps(done_event)}\n\n".encode()
            finally:  # the client left, or the stream ended: the generation's row is freed at its next step
                await asyncio.to_thread(frames.close)

        media = "text/event-stream" if sse else MEDIA_TYPES[req.response_format]
        headers = {"X-Served-By": served_by} if served_by else None
        return StreamingResponse(body(), media_type=media, headers=headers)

    return app


def load_server(model: str, max_streams: int = 4, threads=None, voice_dir=None, lookahead=None,
                queue_timeout: float = 30.0, model_name: str = "chattts", batch_invariant: bool = True,
                max_context=None, served_by: Optional[str] = None):
    """Load MODEL and build its app: (runtime, app). The one recipe behind `chattts-ort serve` and each Ray Serve
    replica (ray_serve.py). batch_invariant (default): a request's audio does not depend on the others running
    beside it (Runtime.load's batch_invariant; at int4 it costs one extra row when alone). max_context: KV positions
    per stream (Runtime.load's; the KV cache of every stream is allocated at start: ~250 MB per stream at 2048 for
    ChatTTS). A request is cut at max_context - its prompt frames."""
    from .runtime import Runtime

    rt = Runtime.load(model, threads=threads, max_streams=max(2, max_streams), batch_invariant=batch_invariant,
                      max_context=max_context)
    try:
        voices = load_voices(voice_dir, rt.config["hidden_size"])
        app = create_app(rt, model_name=model_name, voices=voices, default_lookahead=lookahead,
                         queue_timeout=queue_timeout, max_new_token=min(2048, rt.max_context - 1),
                         served_by=served_by)
    except BaseException:
        rt.close()
        raise
    return rt, app


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **settings) -> None:
    """Load MODEL and serve it with uvicorn until interrupted; `settings` are load_server's."""
    try:
        import uvicorn
    except ImportError as e:
        raise RuntimeError(f"chattts-ort serve needs the serve extra (pip install 'chattts-ort[serve]'): {e}") from None
    rt, app = load_server(model, **settings)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        rt.close()
