"""A Hugging Face Hub on loopback, answering what huggingface_hub asks when it downloads a snapshot, so the tests
of `--model owner/name` never touch the network (point HF_ENDPOINT at `server.url`).

It serves repositories made of local files: per repository a commit id and {path: bytes}. Files whose name ends in
.safetensors are served as LFS files (ETag = sha256, listed with an lfs entry), the others as git files (ETag = git
blob sha1), as the Hub does. Faults for the tests: `cut_once[path] = n` ends the first GET of that file after n
bytes (a dropped connection); `stall[path] = n` pauses it after n bytes until `release()`; `tamper[path] = bytes`
serves other content than the listing's hashes describe.
Every request is logged in `server.requests` as (method, path, Range header).
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, files: dict, commit: str = "0123456789abcdef0123456789abcdef01234567", branch: str = "main"):
        self.files = dict(files)  # path -> bytes
        self.commit = commit
        self.branch = branch

    @classmethod
    def from_folder(cls, folder: Path, prefix: str = "", **kw) -> "Repo":
        folder = Path(folder)
        files = {prefix + p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        return cls(files, **kw)

    def entry(self, path: str) -> dict:
        data = self.files[path]
        e = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if path.endswith(".safetensors"):
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return e


class HubServer:
    def __init__(self):
        self.repos = {}            # "owner/name" -> Repo
        self.cut_once = {}         # path -> bytes to send before dropping the connection (first GET only)
        self.tamper = {}           # path -> bytes served instead of the listed file
        self.stall = {}            # path -> bytes to send before pausing the body until release() (first GET)
        self._released = threading.Event()
        self.requests = []
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def release(self) -> None:
        """Let every stalled body go on."""
        self._released.set()

    def log(self, method: str, path: str, rng) -> None:
        with self._lock:
            self.requests.append((method, path, rng))

    def gets(self, suffix: str) -> list:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith(suffix)]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer

    def log_message(self, *a):  # quiet
        pass

    def _json(self, obj, status=200, head=False):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _not_found(self, what: str, head=False, code="RepoNotFound"):
        body = json.dumps({"error": what}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", what)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _repo(self, owner, name, rev, head=False):
        repo = self.hub.repos.get(f"{owner}/{name}")
        if repo is None:
            self._not_found(f"Repository {owner}/{name} not found", head)
            return None
        if rev not in (repo.branch, repo.commit):
            self._not_found(f"Invalid rev id: {rev}", head, code="RevisionNotFound")
            return None
        return repo

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool):
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        self.hub.log("HEAD" if head else "GET", url.path, self.headers.get("Range"))
        # /api/models/{owner}/{name}/revision/{rev}
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
            repo = self._repo(parts[2], parts[3], "/".join(parts[5:]), head)
            if repo:
                self._json({"id": f"{parts[2]}/{parts[3]}", "modelId": f"{parts[2]}/{parts[3]}", "sha": repo.commit,
                            "private": False, "siblings": [{"rfilename": p} for p in sorted(repo.files)]}, head=head)
            return
        # /api/models/{owner}/{name}/tree/{rev}[/{path}]
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            repo = self._repo(parts[2], parts[3], parts[5], head)
            if repo:
                under = "/".join(parts[6:])
                entries, dirs = [], set()
                for p in sorted(repo.files):
                    if under and not p.startswith(under + "/"):
                        continue
                    entries.append(repo.entry(p))
                    d = p.rsplit("/", 1)[0] if "/" in p else ""
                    while d and d != under:
                        dirs.add(d)
                        d = d.rsplit("/", 1)[0] if "/" in d else ""
                entries += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)]
                self._json(entries, head=head)
            return
        # /{owner}/{name}/resolve/{rev}/{path}
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo(parts[0], parts[1], parts[3], head)
            if repo is None:
                return
            path = "/".join(parts[4:])
            if path not in repo.files:
                self._not_found(f"Entry not found: {path}", head, code="EntryNotFound")
                return
            self._file(repo, path, head)
            return
        self._not_found(f"no route {url.path}", head, code="NotFound")

    def _file(self, repo: Repo, path: str, head: bool):
        entry = repo.entry(path)
        data = self.hub.tamper.get(path, repo.files[path])
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            first = rng[6:].split("-")[0]
            start = int(first) if first else 0
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        cut = self.hub.cut_once.pop(path, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            try:
                import socket

                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        stall = self.hub.stall.pop(path, None)
        try:
            if stall is not None:
                self.wfile.write(body[:stall])
                self.wfile.flush()
                self.hub._released.wait(300)
                body = body[stall:]
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
