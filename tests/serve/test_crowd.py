"""More clients than rows (the crowds issue): every request completes, in arrival order, and a stream that has
started playing never stalls behind the admissions of the others. bench/crowd.py measures the same at scale."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("httpx", reason="httpx is not installed")

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def crowd():
    sys.path.insert(0, str(BENCH))
    try:
        import crowd as module
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_a_crowd_never_stalls_a_started_stream(crowd, _private_cache):
    from chattts_ort.export.exporter import default_export

    from serve import free_port

    export = str(default_export("tiny", layer_form="fused"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = crowd.start_server(export, 4, port, extra=["--queue-timeout", "60"])
    try:
        crowd.crowd(url, 2, 10, voice="alloy")  # warm up
        t_round = crowd.crowd(url, 4, 60, voice="alloy")["wall_s"]
        res = crowd.crowd(url, 24, 60, voice="alloy")
    finally:
        server.terminate()
        server.wait(30)
    s = crowd.summary(res, 4, t_round, 60)
    print(s)
    assert s["ok"] == s["complete"] == 24, s["errors"]
    # Before: waiting requests sat in asyncio's worker threads ahead of live streams' next chunks, and started
    # streams went silent for seconds. A loose bound here (a shared 2-core machine); the bench reports the
    # precise figure against the goal of one chunk's audio + 0.2 s.
    assert s["longest_gap_s"] < 1.0, s
    # first bytes in arrival order, group by group
    firsts = [g["ttfb_p50_s"] for g in s["by_position"]]
    assert firsts[0] <= firsts[-1], s["by_position"]
