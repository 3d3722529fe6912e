"""The web page at / in a real browser: Debian's chromium, headless, driven by Playwright (never Playwright's own
browsers). The page loads without console errors, speaks a sentence as it streams (what it scheduled on its
AudioContext equals the API's own response to the same request), shows first-audio time and RTF, offers a WAV that
holds the same samples, shows server errors readably, sends the API key a server asks for, and works the same
behind Ray Serve's proxy (slow).

Needs: the playwright package (the test extra) and a chromium on PATH (`apt-get install chromium`); skips otherwise.
CHATTTS_ORT_PAGE_SCREENSHOTS=DIR saves a screenshot of each spoken page there."""
import os
import re
import shutil
import socket
import time
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")

from chattts_ort import Runtime  # noqa: E402

from .test_server import Server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")

KEY = "sk-page-test"
# frames per request (the server's cap; the page sends none): past the tiny export's exact lookahead (52 frames), so
# the audio comes in several pieces (~2.5 s of it, played out in real time)
FRAMES = 120
TEXT = "hello world, spoken by the page"


@pytest.fixture(scope="module")
def export(_private_cache):
    from chattts_ort.export.exporter import default_export

    return default_export("tiny", layer_form="fused")


@pytest.fixture(scope="module")
def rt(export):
    with Runtime.load(export, threads=1, max_streams=2) as rt:
        yield rt


@pytest.fixture(scope="module")
def server(rt):
    s = Server(rt, max_new_token=FRAMES)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed_server(rt):
    s = Server(rt, max_new_token=FRAMES, api_key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--autoplay-policy=no-user-gesture-required", "--disable-gpu",
                                    "--disable-dev-shm-usage"])
        yield b
        b.close()


class Page:
    """A fresh browser context on URL/, with the console's errors and the page's uncaught exceptions collected."""

    def __init__(self, browser, url):
        self.context = browser.new_context(accept_downloads=True)
        self.page = self.context.new_page()
        self.errors, self.requests = [], []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r))
        self.page.goto(url + "/")

    def voices(self):
        self.page.wait_for_function("document.querySelectorAll('#voice option').length > 1")
        return self.page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")

    def speak(self, text=TEXT, voice="alloy", seed="5", lookahead="", speed="1", keyboard=False, timeout=60_000):
        pg = self.page
        pg.fill("#input", text)
        pg.select_option("#voice", voice if not voice.startswith("seed:") else "seed:")
        if voice.startswith("seed:"):
            pg.fill("#voice-seed", voice[5:])
        pg.fill("#seed", seed)
        pg.fill("#lookahead", lookahead)
        pg.fill("#speed", speed)
        pg.evaluate("window.__chatttsPlayed = null")
        if keyboard:
            pg.focus("#input")
            pg.keyboard.press("Control+Enter")
        else:
            pg.click("#speak")
        pg.wait_for_function("window.__chatttsPlayed && window.__chatttsPlayed.done", timeout=timeout)
        return pg.evaluate("""() => { const p = window.__chatttsPlayed;
            return {samples: Array.from(p.samples), lens: p.pieces.map(x => x.length), starts: p.starts,
                    rate: p.rate, request: p.request, firstAudioMs: p.firstAudioMs, rtf: p.rtf, wallMs: p.wallMs,
                    error: p.error, contextState: p.contextState}; }""")

    def close(self):
        self.context.close()


@pytest.fixture
def page(browser, server):
    pg = Page(browser, server.url)
    yield pg
    pg.close()


def api_pcm(url, request, key=None) -> np.ndarray:
    """The API's own response to the page's request, made directly."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(url + "/v1/audio/speech", json=request, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return np.frombuffer(r.content, "<i2")


def check_played(pg, played, url, key=None):
    """What the page scheduled is the API's response, piece after piece on the audio clock, and it played out.
    With a lookahead under the export's exact one the audio depends on when each frame is decoded (two identical
    requests differ), so there only the length is compared."""
    assert played["error"] is None, played["error"]
    want = api_pcm(url, played["request"], key)
    got = np.asarray(played["samples"], np.int16)
    assert got.size > 0 and got.size == sum(played["lens"])
    if "lookahead" in played["request"]:
        assert got.size == want.size
    else:
        np.testing.assert_array_equal(got, want)
    assert played["rate"] == 24000 and played["contextState"] == "running"
    # back to back: each piece starts where the last one ends (later only after an underrun, never earlier)
    ends = np.array(played["starts"][:-1]) + np.array(played["lens"][:-1]) / played["rate"]
    assert np.all(np.array(played["starts"][1:]) >= ends - 1e-6)
    # the AudioContext's clock ran through every scheduled piece (each source's ended event)
    pg.page.wait_for_function("window.__chatttsPlayed.ended", timeout=30_000)
    assert pg.page.text_content("#status") == "Done."
    # first audio (request to first sample scheduled) and RTF (wall time / audio duration) are shown
    assert 0 < played["firstAudioMs"] <= played["wallMs"]
    assert abs(played["rtf"] - played["wallMs"] / 1000 / (got.size / 24000)) < 1e-9
    assert re.fullmatch(r"\d+ ms", pg.page.text_content("#first-audio"))
    assert re.match(r"\d+\.\d\d \(wall ", pg.page.text_content("#rtf"))
    return want


def check_download(pg, want, tmp_path):
    with pg.page.expect_download() as d:
        pg.page.click("#download")
    assert d.value.suggested_filename == "speech.wav"
    path = tmp_path / "speech.wav"
    d.value.save_as(path)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        np.testing.assert_array_equal(np.frombuffer(w.readframes(w.getnframes()), "<i2"), want)


def screenshot(pg, name):
    folder = os.environ.get("CHATTTS_ORT_PAGE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        pg.page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def test_page_plays_the_stream_and_offers_it_as_wav(page, server, tmp_path):
    voices = page.voices()
    assert "alloy" in voices and voices[-1] == "seed:"  # the server's list, then the free seed:N entry
    assert page.page.get_by_label("Text").count() == 1 and page.page.get_by_label("Voice", exact=True).count() == 1
    t0 = time.perf_counter()
    played = page.speak()
    assert played["request"] == {"input": TEXT, "voice": "alloy", "response_format": "pcm", "speed": 1, "seed": 5}
    want = check_played(page, played, server.url)
    assert len(played["lens"]) > 1 and played["firstAudioMs"] < played["wallMs"]  # played as it streamed
    check_download(page, want, tmp_path)
    screenshot(page, "page-spoken")
    print(f"page: first audio {played['firstAudioMs']:.0f} ms, RTF {played['rtf']:.2f}, "
          f"{len(played['lens'])} pieces, spoken in {time.perf_counter() - t0:.2f} s")
    # a seed:N voice, another speed and a lookahead, from the keyboard (Ctrl+Enter in the text box)
    played = page.speak(voice="seed:1234", seed="9", speed="1.6", lookahead="2", keyboard=True)
    assert played["request"] == {"input": TEXT, "voice": "seed:1234", "response_format": "pcm", "speed": 1.6,
                                 "lookahead": 2, "seed": 9}
    check_played(page, played, server.url)
    assert page.errors == [], page.errors


def test_page_shows_server_errors(page, server):
    page.voices()
    played = page.speak(lookahead="100000")
    assert played["error"] and played["samples"] == []
    msg = page.page.text_content("#error")
    assert page.page.is_visible("#error") and msg.startswith("Speech failed: HTTP 400")
    assert "lookahead must be in 0.." in msg and "(param: lookahead, code: invalid_value)" in msg
    assert page.page.is_hidden("#download") and page.page.text_content("#status") == "Failed."
    # the page's own checks need no server
    page.page.fill("#input", "   ")
    page.page.click("#speak")
    assert page.page.text_content("#error") == "Enter some text to speak."


def test_page_sends_the_api_key(browser, keyed_server, tmp_path):
    pg = Page(browser, keyed_server.url)
    try:
        # / stays open; the page sees from /health that the /v1 routes need a key and asks for it
        pg.page.wait_for_function("document.getElementById('auth').open")
        assert "needs an API key" in pg.page.text_content("#status") and pg.errors == []
        pg.page.fill("#api-key", "sk-wrong")
        pg.page.dispatch_event("#api-key", "change")
        pg.page.wait_for_selector("#error:not([hidden])")
        msg = pg.page.text_content("#error")
        assert "HTTP 401" in msg and "Incorrect API key" in msg and "code: invalid_api_key" in msg, msg
        pg.page.fill("#api-key", KEY)
        pg.page.dispatch_event("#api-key", "change")
        assert "alloy" in pg.voices() and pg.page.is_hidden("#error")
        played = pg.speak()
        speech = [r for r in pg.requests if r.url.endswith("/v1/audio/speech")]
        assert speech and speech[-1].headers.get("authorization") == f"Bearer {KEY}"
        check_played(pg, played, keyed_server.url, key=KEY)
    finally:
        pg.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_proxy(export, tmp_path_factory):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    from ray import serve

    from chattts_ort.ray_serve import RayServeArgs, run

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2, configure_logging=False,
             log_to_driver=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        port = _free_port()
        # max_context bounds the frames of a request (the page sends no max_new_token)
        run(RayServeArgs(model=export, replicas=1, max_streams=2, threads=1, max_context=FRAMES + 40),
            host="127.0.0.1", port=port, blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_page_behind_ray_serve(browser, ray_proxy, tmp_path):
    pg = Page(browser, ray_proxy)
    try:
        assert "alloy" in pg.voices()
        played = pg.speak(timeout=120_000)
        want = check_played(pg, played, ray_proxy)
        assert pg.page.text_content("#served-by") not in ("–", "this server")  # the replica's X-Served-By
        check_download(pg, want, tmp_path)
        screenshot(pg, "page-ray")
        assert pg.errors == [], pg.errors
    finally:
        pg.close()
