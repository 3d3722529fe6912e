"""A bounded load test of the server (loopback, tiny model): concurrent clients each get their whole stream,
bit-identical to the same request made alone (exact lookahead, batch-invariant rows), and the server's memory
does not grow from round to round."""
import threading

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from chattts_ort import Runtime  # noqa: E402

from .test_server import Server  # noqa: E402

FRAMES = 60


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.parametrize("clients", [4])
def test_concurrent_clients_get_complete_identical_streams(_private_cache, clients):
    from chattts_ort.export.exporter import default_export

    rt = Runtime.load(default_export("tiny", layer_form="fused"), threads=1, max_streams=clients,
                      batch_invariant=True)
    s = Server(rt, max_new_token=FRAMES, queue_timeout=30)

    def body(i):
        return {"input": f"client number {i}", "response_format": "pcm", "seed": 50 + i, "max_new_token": FRAMES,
                "min_new_token": FRAMES}

    try:
        solo = [httpx.post(s.url + "/v1/audio/speech", json=body(i), timeout=60).content for i in range(clients)]
        assert all(len(b) == 2 * (512 * FRAMES - 256) for b in solo)
        rss = []
        for _ in range(3):
            got = [None] * clients
            ts = [threading.Thread(target=lambda i=i: got.__setitem__(
                i, httpx.post(s.url + "/v1/audio/speech", json=body(i), timeout=60))) for i in range(clients)]
            [t.start() for t in ts]
            [t.join(120) for t in ts]
            assert all(r is not None and r.status_code == 200 for r in got)
            assert [r.content for r in got] == solo  # complete, nothing dropped, identical to each alone
            rss.append(_rss_mb())
        assert rss[-1] - rss[0] < 50, rss  # no growth from round to round
    finally:
        s.stop()
        rt.close()
