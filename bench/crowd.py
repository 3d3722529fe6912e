"""Crowds: more clients than rows against `chattts-ort serve`, and whether started streams ever stall.

    python bench/crowd.py [--model tiny|full] [--precision int8] [--clients 50] [--max-streams 8] [--frames 94]

One server (127.0.0.1, a free port, --max-streams rows, pcm), then:
1. one round of exactly --max-streams clients at once: T_round, the time every row busy takes for one request each;
2. --clients clients at once, each one request of --frames frames (min = max, so every stream is the same length).
Reported: the longest gap between two audio chunks of any stream after its first byte (a listener hears a stall
when it passes the chunk's own duration, 16 frames = 0.34 s), against that duration + 0.2 s; the wall time
against the rows-never-idle ideal ceil(clients / rows) x T_round; time to first byte by queue position (the
order of arrival; p50 and p99 of each group of --max-streams); and that every request got all its audio.
Results: bench/results/DATE-crowd-MODEL-PRECISION.{json,md}.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
CHUNK_S = 16 * 512 / 24000  # the audio of one 16-frame chunk


def stream_once(url: str, body: dict, t_start: float, timeout: float = 300) -> dict:
    """One streamed request: arrival, first byte, every gap between chunks after the first, bytes."""
    import httpx

    t0 = time.perf_counter()
    arrivals, n = [], 0
    with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.read().decode(errors="replace")[:300]}
        for part in r.iter_raw():
            arrivals.append(time.perf_counter())
            n += len(part)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"status": 200, "start_s": t0 - t_start, "ttfb_s": arrivals[0] - t0 if arrivals else None,
            "end_s": time.perf_counter() - t_start, "longest_gap_s": max(gaps, default=0.0), "bytes": n}


def crowd(url: str, clients: int, frames: int, stagger_s: float = 0.002, voice: str = None) -> dict:
    """`clients` requests started together (in arrival order, `stagger_s` apart); their results and the wall."""
    out = [None] * clients
    t_start = time.perf_counter()

    def one(i):
        body = {"model": "chattts", "input": "今天天气不错，我们去公园散步吧。", "voice": voice or f"seed:{i + 1}",
                "response_format": "pcm", "seed": i, "max_new_token": frames, "min_new_token": frames}
        try:
            out[i] = stream_once(url, body, t_start)
        except Exception as e:  # noqa: BLE001 - a failed request is a result
            out[i] = {"status": -1, "error": repr(e)}

    threads = []
    for i in range(clients):
        t = threading.Thread(target=one, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        time.sleep(stagger_s)
    for t in threads:
        t.join(600)
    return {"wall_s": time.perf_counter() - t_start, "requests": out}


def summary(res: dict, rows: int, t_round: float, frames: int) -> dict:
    reqs = res["requests"]
    ok = [r for r in reqs if r and r["status"] == 200]
    want_bytes = 2 * 512 * frames
    groups = []
    for g in range(0, len(reqs), rows):
        firsts = sorted(r["ttfb_s"] for r in reqs[g:g + rows] if r and r.get("ttfb_s") is not None)
        if firsts:
            groups.append({"positions": f"{g + 1}-{min(g + rows, len(reqs))}", "ttfb_p50_s": firsts[len(firsts) // 2],
                           "ttfb_max_s": firsts[-1]})
    ideal = math.ceil(len(reqs) / rows) * t_round
    return {"ok": len(ok), "clients": len(reqs), "complete": sum(r["bytes"] >= want_bytes - 512 for r in ok),
            "longest_gap_s": max((r["longest_gap_s"] for r in ok), default=None),
            "gap_goal_s": CHUNK_S + 0.2, "wall_s": res["wall_s"], "ideal_s": ideal,
            "wall_over_ideal": res["wall_s"] / ideal if ideal else None, "by_position": groups,
            "errors": [r.get("error") for r in reqs if not r or r["status"] != 200][:5]}


def start_server(export: str, rows: int, port: int, extra=()) -> subprocess.Popen:
    import httpx

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "chattts_ort.cli", "serve", "--model", export, "--port", str(port),
           "--max-streams", str(rows), *extra]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise RuntimeError(f"the server did not start: {server.stderr.read()[-2000:]}")
        time.sleep(0.2)


def main(argv=None) -> int:
    from decode_probe import write_results
    from granularity import export_for
    from serve import free_port
    from streams import cpu_name

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["full", "tiny"])
    ap.add_argument("--precision", default="int8", choices=["fp32", "int8", "int4"])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--max-streams", type=int, default=8)
    ap.add_argument("--frames", type=int, default=94, help="frames per request (94 = 2 s of audio)")
    args = ap.parse_args(argv)

    export = export_for(args.model, 1, args.precision)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(export, args.max_streams, port)
    try:
        crowd(url, 2, 20)  # warm up
        full_round = crowd(url, args.max_streams, args.frames)
        t_round = full_round["wall_s"]
        res = crowd(url, args.clients, args.frames)
    finally:
        server.terminate()
        server.wait(30)
    s = summary(res, args.max_streams, t_round, args.frames)
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = cpu_name()
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
           "args": vars(args), "t_round_s": t_round, "summary": s, "raw": res}
    lines = [f"# Crowd: {args.clients} clients, --max-streams {args.max_streams} ({args.model}, {args.precision})",
             "", f"{out['date']}, {machine}; `python bench/crowd.py --model {args.model} --precision "
                 f"{args.precision} --clients {args.clients} --max-streams {args.max_streams} --frames {args.frames}`",
             "", f"- complete: {s['complete']}/{s['clients']} (200: {s['ok']})",
             f"- longest gap between chunks of a started stream: {s['longest_gap_s']:.3f} s (goal <= "
             f"{s['gap_goal_s']:.3f} s: one chunk's audio + 0.2 s)",
             f"- wall {s['wall_s']:.2f} s against the rows-never-idle ideal {s['ideal_s']:.2f} s "
             f"(ceil({args.clients}/{args.max_streams}) x one full round {t_round:.2f} s): "
             f"{s['wall_over_ideal']:.2f}x (goal <= 1.3x)", "",
             "| queue positions | first byte p50 | first byte max |", "|---|---|---|"]
    lines += [f"| {g['positions']} | {g['ttfb_p50_s']:.2f} s | {g['ttfb_max_s']:.2f} s |" for g in s["by_position"]]
    write_results(HERE / "results" / f"{day}-crowd-{args.model}-{args.precision}", out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
