"""`chattts-ort serve` on the tiny random export: a real uvicorn server on 127.0.0.1, OpenAI's speech API in every
response format, SSE, errors in OpenAI's shape, a full queue answered with 503, a client that leaves, and the
official openai client unchanged."""
import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest

fastapi = pytest.importorskip("fastapi", reason="the serve extra is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from chattts_ort import InferCodeParams, Runtime  # noqa: E402
from chattts_ort.server import create_app, load_voices, speed_tag  # noqa: E402

FRAMES = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedUvicorn:
    """An ASGI app served by uvicorn in a thread on a free loopback port (config: more uvicorn.Config options)."""

    def __init__(self, app, **config):
        self.port = _free_port()
        config.setdefault("log_level", "error")
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


class Server(ThreadedUvicorn):
    def __init__(self, rt, **kw):
        self.rt = rt
        super().__init__(create_app(rt, **kw))


@pytest.fixture(scope="module")
def export(_private_cache):
    from chattts_ort.export.exporter import default_export

    return default_export("tiny", layer_form="fused")


@pytest.fixture(scope="module")
def server(export):
    rt = Runtime.load(export, threads=1, max_streams=2)
    s = Server(rt, max_new_token=FRAMES, queue_timeout=0.3)
    yield s
    s.stop()
    rt.close()


def solo_pcm(rt, text, seed, voice="alloy") -> np.ndarray:
    """The same request made directly on the Runtime, as int16 samples."""
    spk = load_voices(None, rt.config["hidden_size"])[voice]
    p = InferCodeParams(prompt=speed_tag(1.0), max_new_token=FRAMES, manual_seed=seed)
    return rt.synthesize(text, params=p, speaker=spk, dtype="int16")[0]


def post(server, **body):
    body.setdefault("input", "hello world")
    body.setdefault("seed", 5)
    return httpx.post(server.url + "/v1/audio/speech", json=body, timeout=60)


def test_pcm_equals_a_solo_run(server):
    r = post(server, response_format="pcm")
    assert r.status_code == 200 and r.headers["content-type"] == "audio/pcm"
    got = np.frombuffer(r.content, np.int16)
    want = solo_pcm(server.rt, "hello world", 5)
    assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1


def decode(data: bytes):
    """All samples of a compressed stream (PyAV), as int16 at the stream's rate."""
    av = pytest.importorskip("av")
    with av.open(io.BytesIO(data)) as c:
        rate = c.streams.audio[0].rate
        out = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return out, rate


def test_wav_and_flac_decode_to_the_same_samples(server):
    pcm = np.frombuffer(post(server, response_format="pcm").content, np.int16)
    r = post(server, response_format="wav")
    assert r.content[:4] == b"RIFF" and r.headers["content-type"] == "audio/wav"
    assert np.array_equal(np.frombuffer(r.content[44:], np.int16), pcm)  # streamed header: open-ended sizes
    flac, rate = decode(post(server, response_format="flac").content)
    assert rate == 24000 and np.array_equal(flac, pcm)  # lossless


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac"])
def test_compressed_formats_decode(server, fmt):
    r = post(server, response_format=fmt)
    assert r.status_code == 200 and len(r.content) > 100
    samples, rate = decode(r.content)
    want = len(np.frombuffer(post(server, response_format="pcm").content, np.int16)) / 24000
    assert abs(samples.size / rate - want) < 0.1  # the same duration, within codec padding


def test_sse_events(server):
    pcm = post(server, response_format="pcm").content
    r = post(server, response_format="pcm", stream_format="sse")
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done" and all(e["type"] == "speech.audio.delta" for e in events[:-1])
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == pcm


@pytest.mark.parametrize("body,status,param", [
    ({"voice": "nobody"}, 400, "voice"), ({"model": "gpt-5"}, 404, "model"), ({"input": "  "}, 400, "input"),
    ({"response_format": "ogg"}, 400, "response_format"), ({"speed": 10}, 400, "speed"),
    ({"input": "x" * 5000}, 400, "input"), ({"stream_format": "ws"}, 400, "stream_format"),
    ({"temperature": -1}, 400, None), ({"lookahead": 99}, 400, "lookahead"),
    ({"max_new_token": 10**6}, 400, "max_new_token"), ({"seed": -1}, 400, "seed"),
])
def test_errors_in_openai_shape(server, body, status, param):
    r = post(server, **body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param


def test_listing_endpoints(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "chattts"
    assert "alloy" in httpx.get(server.url + "/v1/audio/voices").json()["voices"]


def test_speed_and_seed_voices(server):
    assert speed_tag(1.0) == "[speed_5]" and speed_tag(0.25) == "[speed_1]" and speed_tag(4) == "[speed_9]"
    a = post(server, response_format="pcm", voice="seed:9").content
    b = post(server, response_format="pcm", voice="seed:9").content
    assert a == b and len(a) > 0


def test_openai_client_unchanged(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    buf = b""
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input="hello world",
                                                            response_format="pcm", extra_body={"seed": 5}) as resp:
        for part in resp.iter_bytes():
            buf += part
    assert buf == post(server, response_format="pcm").content


def _stats(rt):
    return rt._scheduler.stats()


def test_full_queue_gets_503(export):
    rt = Runtime.load(export, threads=1, max_streams=2, queue_frames=4)
    s = Server(rt, max_new_token=500, queue_timeout=0.3)
    try:
        # Two streams that read one frame and stop: their rows stay taken (paused on a full queue).
        held = [rt.stream(f"holding row {i}", params=InferCodeParams(max_new_token=500, min_new_token=500))
                for i in range(2)]
        for h in held:
            next(h)
        r = post(s, response_format="pcm")
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "server_busy" and "free stream" in r.json()["error"]["message"]
        for h in held:
            h.close()
        assert post(s, response_format="pcm").status_code == 200  # rows free again
    finally:
        s.stop()
        rt.close()


def test_a_client_that_leaves_frees_its_row(server):
    rt = server.rt
    with httpx.stream("POST", server.url + "/v1/audio/speech", timeout=60,
                      json={"input": "a long one", "response_format": "pcm", "seed": 1, "max_new_token": FRAMES,
                            "min_new_token": FRAMES}) as r:
        assert r.status_code == 200
        next(r.iter_raw())
    deadline = time.time() + 10
    while _stats(rt)["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert _stats(rt)["active"] == 0
    assert post(server, response_format="pcm", input="after").status_code == 200


def test_serve_command(export):
    """`chattts-ort serve` itself, as a user starts it (a subprocess on a free loopback port)."""
    import subprocess
    import sys

    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "chattts_ort.cli", "serve", "--model", str(export), "--port",
                          str(port), "--max-streams", "2", "--max-context", "256", "--threads", "1",
                          "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                h = httpx.get(url + "/health", timeout=2)
                break
            except httpx.HTTPError:
                assert p.poll() is None, p.stderr.read()
                assert time.time() < deadline, "the server did not start"
                time.sleep(0.2)
        assert h.json()["max_streams"] == 2
        r = httpx.post(url + "/v1/audio/speech", json={"input": "hello", "response_format": "wav", "seed": 1,
                                                      "max_new_token": 30, "min_new_token": 30}, timeout=60)
        assert r.status_code == 200 and len(r.content) == 44 + 2 * (512 * 30 - 256)
        too_long = httpx.post(url + "/v1/audio/speech", json={"input": "hello", "max_new_token": 1000}, timeout=60)
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_new_token"
    finally:
        p.terminate()
        p.wait(20)
