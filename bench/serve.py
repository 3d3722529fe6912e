"""Load test of `chattts-ort serve`: N concurrent clients on loopback, each streaming one utterance.

    python bench/serve.py [--model full|tiny] [--precision int4] [--clients 1 4 8 16] [--seconds 10]
                          [--lookahead 52 24] [--ray REPLICAS]

The server runs in its own process (127.0.0.1, a free port, --max-streams = the largest N). Per N: time to the
first audio byte (p50, p99, from each request), each client's real-time factor (its wall time over its audio's
length; <= 1 means it received audio at least as fast as it plays), the aggregate (audio seconds served per
wall second), every stream complete and bit-identical to the same request made alone, and the server's resident
memory after each round (the whole process tree: with --ray, Ray's processes and replicas too). --ray N serves
through Ray Serve instead of uvicorn (a local Ray, N replicas of --threads / N threads and --max-streams / N rows
each). Bounded: one request per client per round, a timeout on every request.
Results: bench/results/DATE-serve-MODEL.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
FRAMES_PER_S = 24000 / 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of PID and all its descendants."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def request(url: str, body: dict, timeout: float = 600) -> dict:
    import httpx

    t0 = time.perf_counter()
    first, data = None, bytearray()
    with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.read().decode(errors="replace")[:300]}
        for part in r.iter_raw():
            if first is None:
                first = time.perf_counter() - t0
            data += part
    return {"status": 200, "ttfb_s": first, "wall_s": time.perf_counter() - t0, "bytes": bytes(data)}


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main(argv=None) -> int:
    import httpx

    sys.path.insert(0, str(HERE))
    from streams import cpu_name, export_for  # noqa: E402

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="full", choices=["full", "tiny"])
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each utterance")
    ap.add_argument("--lookahead", nargs="+", type=int, default=[52, 24])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ray", type=int, default=0, metavar="REPLICAS", help="serve through Ray Serve with N replicas")
    ap.add_argument("--tag", default="", help="appended to the result file names")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    stamp = datetime.now(timezone.utc)
    export = export_for(args.model, args.precision)
    frames = int(round(args.seconds * FRAMES_PER_S))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    replicas = max(1, args.ray)
    cmd = [sys.executable, "-m", "chattts_ort.cli", "serve", "--model", export, "--port", str(port), "--max-streams",
           str(max(1, max(args.clients) // replicas)), "--threads", str(max(1, args.threads // replicas)),
           "--log-level", "warning", "--queue-timeout", "600"]
    if args.ray:
        cmd += ["--ray", "--replicas", str(args.ray)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    res = {"date": stamp.isoformat(timespec="seconds"), "machine": f"{cpu_name()}, {os.cpu_count()} cores",
           "model": args.model, "precision": args.precision, "server": f"ray, {replicas} replicas" if args.ray else "uvicorn", "seconds": args.seconds, "frames": frames,
           "command": "python bench/serve.py " + " ".join(argv or sys.argv[1:]), "rounds": []}
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the server did not start: {server.stderr.read()[-2000:]}")
            time.sleep(0.5)
        body = lambda i, la: {"input": f"request number {i} of the load test, spoken in full.",  # noqa: E731
                              "response_format": "pcm", "seed": 100 + i, "max_new_token": frames,
                              "min_new_token": frames, "lookahead": la}
        request(url, body(0, 52))  # warm up
        for la in args.lookahead:
            solo = {}
            for n in args.clients:
                for i in range(n):  # the same requests alone, for identity (once per client index)
                    if i not in solo:
                        solo[i] = request(url, body(i, la))["bytes"]
                got = [None] * n
                threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, request(url, body(i, la))))
                           for i in range(n)]
                t0 = time.perf_counter()
                [t.start() for t in threads]
                [t.join() for t in threads]
                wall = time.perf_counter() - t0
                ok = [g for g in got if g and g["status"] == 200]
                audio_s = [len(g["bytes"]) / 2 / 24000 for g in ok]
                row = {"lookahead": la, "clients": n, "complete": len(ok), "wall_s": wall,
                       "ttfb_p50_s": pct([g["ttfb_s"] for g in ok], 50), "ttfb_p99_s": pct([g["ttfb_s"] for g in ok], 99),
                       "client_rtf_max": max(g["wall_s"] / a for g, a in zip(ok, audio_s)),
                       "aggregate_x_realtime": sum(audio_s) / wall,
                       "identical_to_solo": sum(g["bytes"] == solo[i] for i, g in enumerate(got) if g and "bytes" in g),
                       "all_full_length": all(a == (512 * frames - 256) / 24000 for a in audio_s),
                       "server_rss_mb": rss_mb(server.pid)}
                res["rounds"].append(row)
                print(f"lookahead {la:2d}, {n:2d} clients: {row['complete']}/{n} complete, identical to solo "
                      f"{row['identical_to_solo']}/{n}, first byte p50 {row['ttfb_p50_s']:.3f} s p99 "
                      f"{row['ttfb_p99_s']:.3f} s, slowest client RTF {row['client_rtf_max']:.2f}, aggregate "
                      f"{row['aggregate_x_realtime']:.2f}x real time, server RSS {row['server_rss_mb']:.0f} MB",
                      flush=True)
    finally:
        server.send_signal(2)  # SIGINT: a Ray server shuts its replicas and Ray down
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    lines = [f"# chattts-ort serve under load ({stamp:%Y-%m-%d})", "",
             f"Machine: {res['machine']}. Server: {res['server']}. Model: random weights, {args.model} shape, "
             f"GPT {args.precision}, audio fp32; "
             f"each request {args.seconds:.0f} s of speech ({frames} frames), pcm, loopback. Command: `{res['command']}`",
             "", "| lookahead | clients | complete | identical to solo | first byte p50 s | p99 s | slowest client RTF "
                 "| aggregate x real time | server RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rounds"]:
        lines.append(f"| {r['lookahead']} | {r['clients']} | {r['complete']} | {r['identical_to_solo']} | "
                     f"{r['ttfb_p50_s']:.3f} | {r['ttfb_p99_s']:.3f} | {r['client_rtf_max']:.2f} | "
                     f"{r['aggregate_x_realtime']:.2f} | {r['server_rss_mb']:.0f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / (f"{stamp:%Y-%m-%d}-serve-{args.model}" + (f"-ray{args.ray}" if args.ray else "")
                 + (f"-{args.tag}" if args.tag else ""))
    Path(f"{base}.json").write_text(json.dumps(res, indent=2))
    Path(f"{base}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
