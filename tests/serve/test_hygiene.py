"""Access control, limits and connection hygiene of `chattts-ort serve` (docs/SERVING.md), on the tiny export over
loopback, at a bounded scale: the API key on /v1 routes, errors in OpenAI's shape on every route, a flood of
half-sent requests past the connection cap (/health still answers; they close after the head timeout), a huge
request head refused at once, a huge body refused with 413 without being read, a short body timed out, the input
and context limits, max_streams 1 giving one stream, and start-up refusing each bad setting."""
import socket
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from chattts_ort import cli  # noqa: E402
from chattts_ort.server import guarded_protocol, load_server  # noqa: E402

from .test_server import ThreadedUvicorn  # noqa: E402

KEY = "sk-test-0123456789"
CAP = 32  # connections
HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.0
MAX_BODY = 64 << 10


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class GuardedServer(ThreadedUvicorn):
    """`serve`'s own stack (load_server + the guarded h11 protocol) in a thread, on a free loopback port."""

    def __init__(self, export, **settings):
        settings.setdefault("threads", 1)
        settings.setdefault("max_streams", 2)
        settings.setdefault("max_context", 256)
        self.rt, app = load_server(str(export), **settings)
        super().__init__(app, log_level="critical", http=guarded_protocol(CAP, 16384, HEADER_TIMEOUT),
                         timeout_keep_alive=5, h11_max_incomplete_event_size=16384)

    def stop(self):
        super().stop()
        self.rt.close()


@pytest.fixture(scope="module")
def export(_private_cache):
    from chattts_ort.export.exporter import default_export

    return default_export("tiny", layer_form="fused")


@pytest.fixture(scope="module")
def srv(export):
    s = GuardedServer(export, api_key=KEY, max_body_bytes=MAX_BODY, body_timeout=BODY_TIMEOUT, max_input_chars=100)
    yield s
    s.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}


def _speech(srv, headers=AUTH, **body):
    body = {"input": "hello", "seed": 1, "response_format": "pcm", "max_new_token": 20, **body}
    return httpx.post(srv.url + "/v1/audio/speech", json=body, headers=headers, timeout=60)


def _is_openai_error(r, status, code=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


# -- A: access control -----------------------------------------------------------------------------------------
def test_api_key_on_v1_routes_only(srv):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
        for path in ("/v1/models", "/v1/audio/voices"):
            err = _is_openai_error(httpx.get(srv.url + path, headers=headers), 401, "invalid_api_key")
            assert err["type"] == "invalid_request_error" and err["param"] is None
        _is_openai_error(_speech(srv, headers=headers), 401, "invalid_api_key")
    _is_openai_error(httpx.get(srv.url + "/v1/nothing"), 401, "invalid_api_key")  # no route probing without it
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"  # open
    assert httpx.get(srv.url + "/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(srv.url + "/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200
    r = _speech(srv)
    assert r.status_code == 200 and len(r.content) > 0


def test_openai_client_with_the_key(srv):
    openai = pytest.importorskip("openai")
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    assert good.models.list().data[0].id == "chattts"


# -- C: errors in OpenAI's shape everywhere -----------------------------------------------------------------------
def test_errors_in_openai_shape_on_every_route(srv):
    _is_openai_error(httpx.get(srv.url + "/nope"), 404, "not_found")
    _is_openai_error(httpx.get(srv.url + "/v1/nope", headers=AUTH), 404, "not_found")
    r = httpx.get(srv.url + "/v1/audio/speech", headers=AUTH)
    _is_openai_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers.get("allow", "")
    r = httpx.post(srv.url + "/v1/audio/speech", content=b"{not json", headers={**AUTH, "content-type":
                                                                                  "application/json"})
    assert "not valid JSON" in _is_openai_error(r, 400, "invalid_json")["message"]
    _is_openai_error(httpx.post(srv.url + "/v1/audio/speech", headers=AUTH), 400)  # no body
    err = _is_openai_error(_speech(srv, input=123), 400, "invalid_value")  # FastAPI's 422, as OpenAI's 400
    assert err["param"] == "input"
    err = _is_openai_error(_speech(srv, input="x" * 101), 400)
    assert err["param"] == "input" and "at most 100" in err["message"]


def test_context_limit_in_the_request_terms(export):
    s = GuardedServer(export, max_context=80)  # tiny: 4 fixed tokens + 1 + 64 frames = 69 at least
    try:
        err = _is_openai_error(_speech(s, headers={}, input="a " * 40), 400, "context_length_exceeded")
        assert "input is too long for this server's context" in err["message"] and "at most 16" in err["message"]
        assert "Runtime" not in err["message"] and "max_context" not in err["message"]
        assert _speech(s, headers={}, input="a b").status_code == 200
    finally:
        s.stop()


# -- D: connection hygiene ------------------------------------------------------------------------------------
def _health_time(url) -> float:
    t0 = time.perf_counter()
    r = httpx.get(url + "/health", timeout=5)
    assert r.status_code == 200
    return time.perf_counter() - t0


def test_slowloris_past_the_connection_cap(srv):
    n = CAP + 16
    socks = []
    try:
        for i in range(n):
            c = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            c.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
            socks.append(c)
        time.sleep(0.2)
        took = [_health_time(srv.url) for _ in range(3)]
        assert max(took) < 0.2, took
        # the oldest were closed to make room; the rest close after the head timeout
        time.sleep(HEADER_TIMEOUT + 0.5)
        closed = 0
        for c in socks:
            c.settimeout(2)
            try:
                data = c.recv(65536)
                closed += 1 if data == b"" or data.startswith(b"HTTP/1.1 408") else 0
            except OSError:
                closed += 1
        assert closed == n
    finally:
        for c in socks:
            c.close()
    assert _health_time(srv.url) < 0.2


def test_a_huge_head_is_refused_at_once(srv):
    c = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    t0 = time.perf_counter()
    sent = 0
    try:
        c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * (1 << 16)
        while sent < (64 << 20):
            c.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the server closed the connection: no more is read
    try:
        reply = c.recv(65536)
    except OSError:
        reply = b""
    took = time.perf_counter() - t0
    c.close()
    assert sent < (8 << 20), sent  # refused after a few chunks, not after 64 MiB
    assert took < 2.0, took
    assert reply == b"" or reply.startswith(b"HTTP/1.1 431"), reply[:80]
    assert _health_time(srv.url) < 0.2


def test_a_huge_body_gets_413_unread(srv):
    idle = _rss_mb()
    # Content-Length past the cap: refused before a byte of the body is read
    c = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    c.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nContent-Type: application/json\r\nContent-Length: 268435456\r\n\r\n")
    reply = c.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413") and b"request_too_large" in reply, reply[:200]
    sent = 0
    try:  # the connection is closed: a client that goes on sending is cut off
        chunk = b" " * (1 << 16)
        while sent < (256 << 20):
            c.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    c.close()
    assert sent < (16 << 20), sent
    # chunked (no Content-Length): counted as it streams, refused past the cap
    def chunks():
        for _ in range(4096):
            yield b" " * (1 << 16)
    try:
        r = httpx.post(srv.url + "/v1/audio/speech", content=chunks(), headers={**AUTH, "content-type":
                                                                                 "application/json"}, timeout=10)
        assert r.status_code == 413
    except httpx.TransportError:
        pass  # cut off while sending, after the 413
    assert _rss_mb() - idle < 50, (idle, _rss_mb())
    assert _health_time(srv.url) < 0.2


def test_a_short_body_times_out(srv):
    c = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    t0 = time.perf_counter()
    c.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"input\": ")
    reply = c.recv(65536)
    took = time.perf_counter() - t0
    c.close()
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply, reply[:200]
    assert BODY_TIMEOUT - 0.1 < took < BODY_TIMEOUT + 2, took


def test_one_stream_means_one_at_a_time(export):
    s = GuardedServer(export, max_streams=1, queue_timeout=0.3, max_context=1024)
    try:
        h = httpx.get(s.url + "/health").json()
        assert h["max_streams"] == 1 and h["rows"] == 2
        # a client that reads slowly (a small receive window), so its stream stays on the server
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.settimeout(30)
        c.connect(("127.0.0.1", s.port))
        body = b'{"input": "long", "response_format": "pcm", "max_new_token": 950, "min_new_token": 950}'
        c.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        try:
            assert c.recv(4096).startswith(b"HTTP/1.1 200")
            busy = _speech(s, headers={})
            _is_openai_error(busy, 503, "server_busy")
            assert int(busy.headers["retry-after"]) >= 1
        finally:
            c.close()  # the client leaves: its stream ends and the next request runs
        deadline = time.time() + 10
        while time.time() < deadline:
            r = _speech(s, headers={})
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert r.status_code == 200
    finally:
        s.stop()


# -- B: start-up refuses bad settings -------------------------------------------------------------------------
@pytest.mark.parametrize("argv,words", [
    (["--port", "70000"], "--port must be an integer in 1..65535"),
    (["--port", "-1"], "--port"),
    (["--queue-timeout", "nan"], "--queue-timeout"), (["--queue-timeout", "inf"], "--queue-timeout"),
    (["--queue-timeout", "-1"], "--queue-timeout"),
    (["--log-level", "loud"], "--log-level must be one of"),
    (["--lookahead", "-1"], "--lookahead"),
    (["--host", "0.0.0.0"], "--api-key"),
    (["--max-body-bytes", "10"], "--max-body-bytes"), (["--header-timeout", "0"], "--header-timeout"),
    (["--max-connections", "100000000"], "--max-connections"),
    (["--lookahead", "53"], "--lookahead must be in 0..52"),
    (["--max-context", "32"], "--max-context 32 is too small"),
])
def test_startup_refuses_bad_settings(export, capsys, argv, words):
    rc = cli.main(["serve", "--model", str(export), "--threads", "1", "--max-streams", "2"] + argv)
    err = capsys.readouterr().err
    assert rc == 2 and words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_startup_refusal_as_a_command(export):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "chattts_ort.cli", "serve", "--model", str(export), "--port", "70000"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--port must be" in r.stderr and "Traceback" not in r.stderr
