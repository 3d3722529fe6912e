"""The probe's cases at its own scale against a real `chattts-ort serve` (tiny export) started under `ulimit -n 1024`:
1,100 half-sent requests, a 256 MB body, a 64 MiB header, a short body. Not collected by pytest (about 45 s, most of
it waiting out the 10 s head and 30 s body timeouts); run: python tests/serve/probe_hygiene.py. Loopback only."""
import os, socket, subprocess, sys, time
import httpx
from chattts_ort.export.exporter import default_export
exp = str(default_export("tiny", layer_form="fused"))
port = int(os.environ.get("PROBE_PORT", "18765"))
p = subprocess.Popen(["bash", "-c", f"ulimit -Sn 1024; ulimit -Hn 1024; exec {sys.executable} -m chattts_ort.cli serve --model {exp} --port {port} --threads 1 --max-streams 2 --max-context 256 --log-level warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
url = f"http://127.0.0.1:{port}"
def rss():
    return int(next(l.split()[1] for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS"))) / 1024
def fds():
    return len(os.listdir(f"/proc/{p.pid}/fd"))
def health():
    t = time.perf_counter(); r = httpx.get(url + "/health", timeout=5); return r.status_code, time.perf_counter() - t
for _ in range(300):
    try: httpx.get(url + "/health", timeout=1); break
    except Exception: time.sleep(0.2)
print(p.stdout.readline().strip()); print(p.stdout.readline().strip())
print(f"idle: RSS {rss():.0f} MB, fds {fds()}")
# 1. 1,100 half-sent requests
socks = []
for i in range(1100):
    c = socket.create_connection(("127.0.0.1", port)); c.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nX-Slow: "); socks.append(c)
time.sleep(0.5)
hs = [health() for _ in range(5)]
print(f"1,100 half-sent: server fds {fds()}, /health {[h[0] for h in hs]} ms {[round(h[1]*1000,1) for h in hs]}")
t0 = time.time()
while fds() > 40 and time.time() - t0 < 30: time.sleep(0.5)
print(f"  all closed by the head timeout after {time.time()-t0:.1f} s more (server fds {fds()})")
for c in socks: c.close()
# 2. 256 MB body
base = rss()
c = socket.create_connection(("127.0.0.1", port)); t0 = time.perf_counter()
c.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 268435456\r\n\r\n")
sent = 0; chunk = b" " * 65536
c.settimeout(5)
try:
    while sent < 256 << 20: c.sendall(chunk); sent += len(chunk)
except OSError as e: pass
reply = c.recv(200); c.close()
print(f"256 MB body: {reply[:12]!r} after {1000*(time.perf_counter()-t0):.1f} ms; client got to send {sent/1e6:.2f} MB; RSS {base:.0f} -> {rss():.0f} MB")
# 3. 64 MiB header
c = socket.create_connection(("127.0.0.1", port)); t0 = time.perf_counter(); sent = 0
try:
    c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
    while sent < 64 << 20: c.sendall(chunk); sent += len(chunk)
except OSError: pass
try: reply = c.recv(200)
except OSError: reply = b"(reset)"
print(f"64 MiB header: {reply[:12]!r} after {1000*(time.perf_counter()-t0):.1f} ms, {sent/1e6:.2f} MB sent; /health {health()[1]*1000:.1f} ms")
# 4. short body
c = socket.create_connection(("127.0.0.1", port)); t0 = time.perf_counter()
c.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
c.settimeout(60); reply = c.recv(200)
print(f"short body: {reply[:12]!r} after {time.perf_counter()-t0:.2f} s")
p.terminate(); p.wait(20)
