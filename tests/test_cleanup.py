"""Processes that die leave nothing; --force deletes only what the exporter wrote; mapped weights; bounded manifests;
a full disk (the issue after the cleanup probe). Every subprocess is bounded by a timeout and killed if it runs over."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from chattts_ort.errors import ExportError
from chattts_ort.format import MANIFEST, is_export, open_export, read_manifest, sha256_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fused(_private_cache):
    from chattts_ort.export.exporter import default_export

    return default_export("tiny", layer_form="fused")


@pytest.fixture(scope="module")
def shared(fused, tmp_path_factory):
    from chattts_ort.export.quantize import share_weights_export

    return share_weights_export(fused, tmp_path_factory.mktemp("cleanup") / "shared", progress=False)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "python") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=30)
    return p.pid


def _leftovers(parent: Path, name: str) -> list:
    return sorted(p.name for p in parent.glob(f".{name}.*"))


def _snapshot(folder: Path) -> dict:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


# A child that runs `chattts-ort ARGV` with one step slowed down: when the step has written its temporary file it
# touches MARKER and sleeps, so the test can signal it at a known point.
PATCHES = {
    "export": """
        import chattts_ort.export.exporter as m
        orig = m._save
        def slow(model, path):
            orig(model, path); touch(); time.sleep(60)
        m._save = slow""",
    "quantize": """
        import chattts_ort.export.quantize as m
        orig = m.quantize_block
        def slow(src, dst, *a, **k):
            orig(src, dst, *a, **k); touch(); time.sleep(60)
        m.quantize_block = slow""",
    "share-weights": """
        import chattts_ort.export.quantize as m
        orig = m._share_file
        def slow(src, dst):
            orig(src, dst); touch(); time.sleep(60)
        m._share_file = slow""",
    "verify": """
        import chattts_ort.checks.verify as v
        v._torch_modules = lambda manifest: (None, None)
        v.verify_blocks = lambda *a, **k: []
        v.verify_chain = lambda *a, **k: {"ok": True, "identical": True, "steps": 1, "batch": 2, "first_mismatch": None}
        import chattts_ort.format as f
        orig = os.replace
        def slow(a, b):
            touch(); time.sleep(60); orig(a, b)
        f.os = type("os", (), {k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
        f.os.replace = slow""",
    "say": """
        import chattts_ort.runtime as r
        orig = r.Runtime.stream_audio
        def slow(self, *a, **k):
            for i, c in enumerate(orig(self, *a, **k)):
                yield c
                if i == 0:
                    touch(); time.sleep(60)
        r.Runtime.stream_audio = slow""",
}


def _child(cmd: str, argv: list, marker: Path) -> subprocess.Popen:
    code = textwrap.dedent("""
        import os, sys, time
        def touch():
            open(%r, "w").close()
    """ % str(marker)) + textwrap.dedent(PATCHES[cmd]) + textwrap.dedent("""
        from chattts_ort.cli import main
        sys.exit(main(%r))
    """ % ([cmd] + argv))
    return subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    t = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child ended early: {proc.returncode}\n{proc.stderr.read()}")
        if time.monotonic() > t:
            proc.kill()
            raise AssertionError("child never reached the slow step")
        time.sleep(0.05)


def _argv(cmd, src, out):
    return {"export": ["random-tiny", str(out), "--quiet"], "quantize": [str(src), str(out), "--quiet", "--plan", "fp32"],
            "share-weights": [str(src), str(out)], "verify": [str(src), "--quiet"],
            "say": ["hi", "-o", str(out), "--model", str(src), "--frames", "40", "--min-frames", "40",
                    "--threads", "1"]}[cmd]


@pytest.mark.parametrize("cmd,sig", [("export", "SIGTERM"), ("quantize", "SIGTERM"), ("quantize", "SIGHUP"),
                                     ("share-weights", "SIGHUP"), ("verify", "SIGTERM"), ("say", "SIGTERM"),
                                     ("say", "SIGHUP")])
def test_sigterm_and_sighup_clean_up(cmd, sig, fused, tmp_path):
    signum = getattr(signal, sig)
    src = fused
    if cmd == "verify":
        src = tmp_path / "e"
        shutil.copytree(fused, src)
        (src / "verify.json").write_text("{}")  # the earlier report must survive
    out = tmp_path / ("out.wav" if cmd == "say" else "out")
    marker = tmp_path / "marker"
    proc = _child(cmd, _argv(cmd, src, out), marker)
    try:
        _wait_for(marker, proc)
        leftover_name = "verify.json" if cmd == "verify" else out.name
        parent = src if cmd == "verify" else out.parent
        assert _leftovers(parent, leftover_name), "the slow step should hold a temporary file"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, err
    lines = [ln for ln in err.splitlines() if "chattts-ort" in ln or "Traceback" in ln]
    assert lines == [f"chattts-ort {cmd}: stopped by {sig}; temporary files removed"], err
    assert _leftovers(parent, leftover_name) == []
    if cmd == "verify":
        assert (src / "verify.json").read_text() == "{}"
    else:
        assert not out.exists()


def test_sigkill_leftovers_are_removed_by_the_next_writer_not_a_live_ones(fused, tmp_path):
    from chattts_ort.cli import main

    out = tmp_path / "q"
    marker = tmp_path / "marker"
    proc = _child("quantize", _argv("quantize", fused, out), marker)
    try:
        _wait_for(marker, proc)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = _leftovers(tmp_path, "q")
    assert killed and all(f".tmp-{proc.pid}-" in n for n in killed)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / f".q.tmp-{live.pid}-busy").mkdir()
        assert main(["quantize", str(fused), str(out), "--plan", "fp32", "--quiet"]) == 0
        assert _leftovers(tmp_path, "q") == [f".q.tmp-{live.pid}-busy"]
        # say: its .NAME.tmp-PID-*.wav siblings
        wav = tmp_path / "s.wav"
        dead = tmp_path / f".s.wav.tmp-{_dead_pid()}-abc.wav"
        busy = tmp_path / f".s.wav.tmp-{live.pid}-abc.wav"
        dead.write_bytes(b"x")
        busy.write_bytes(b"x")
        assert main(["say", "hi", "-o", str(wav), "--model", str(fused), "--frames", "4", "--min-frames", "4",
                     "--threads", "1"]) == 0
        assert wav.is_file() and not dead.exists() and busy.exists()
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------------------------------------
# --force deletes only what the exporter wrote


def test_force_refuses_a_folder_with_files_the_exporter_did_not_write(fused, tmp_path, capsys):
    from chattts_ort.cli import main
    from chattts_ort.export.exporter import export_model
    from chattts_ort.export.quantize import quantize_export, share_weights_export

    out = tmp_path / "e"
    shutil.copytree(fused, out)
    (out / "verify.json").write_text("{}")  # a report chattts-ort writes: replaceable
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    before = _snapshot(out)
    t = time.perf_counter()
    for call in (lambda: export_model("random-tiny", out, force=True, progress=False),
                 lambda: quantize_export(fused, out, plan="fp32", force=True, progress=False),
                 lambda: share_weights_export(fused, out, force=True, progress=False)):
        with pytest.raises(ExportError, match=r"extra/, notes\.txt"):
            call()
    assert time.perf_counter() - t < 5  # refused before any work
    assert main(["quantize", str(fused), str(out), "--plan", "fp32", "--force", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.txt" in err
    assert _snapshot(out) == before and (out / "extra").is_dir()
    (out / "notes.txt").unlink()
    (out / "extra").rmdir()
    assert main(["quantize", str(fused), str(out), "--plan", "fp32", "--force", "--quiet"]) == 0


# ---------------------------------------------------------------------------------------------------------
# Mapped weights


def test_truncated_data_is_caught_at_load_and_share_weights_false_survives_truncation_later(shared, tmp_path):
    from chattts_ort import Runtime

    bad = tmp_path / "bad"
    shutil.copytree(shared, bad)
    data = sorted(bad.glob("*.data"))
    os.truncate(data[0], 0)
    with pytest.raises(ExportError, match="does not match the manifest"):
        Runtime.load(bad, threads=1)  # size (and, with verify=True, sha256) against the manifest
    script = textwrap.dedent("""
        import os, sys
        from chattts_ort import InferCodeParams, Runtime
        folder = sys.argv[1]
        rt = Runtime.load(folder, threads=1, share_weights=sys.argv[2] == "1")
        for f in os.listdir(folder):
            if f.endswith(".data"):
                os.truncate(os.path.join(folder, f), 0)
        p = InferCodeParams(max_new_token=8, min_new_token=8, manual_seed=1)
        print(rt.generate("hello", params=p).codes[0].shape, len(rt.synthesize("hello", params=p)[0]))
    """)
    rcs = {}
    for share in ("1", "0"):
        folder = tmp_path / f"s{share}"
        shutil.copytree(shared, folder)
        r = subprocess.run([sys.executable, "-c", script, str(folder), share], env=_env(), capture_output=True,
                           text=True, timeout=120)
        rcs[share] = r.returncode
    assert rcs["1"] == -signal.SIGBUS  # the documented risk: never truncate a shared export in place
    assert rcs["0"] == 0


# ---------------------------------------------------------------------------------------------------------
# Bounded manifests


@pytest.mark.parametrize("kind", ["deep", "deep-but-parses", "huge"])
def test_manifest_depth_and_size_are_bounded(fused, tmp_path, kind):
    from chattts_ort import Runtime

    bad = tmp_path / "bad"
    shutil.copytree(fused, bad)
    p = bad / MANIFEST
    if kind == "deep":
        p.write_text("[" * 200_000 + "]" * 200_000)
    elif kind == "deep-but-parses":
        m = json.loads(p.read_text())
        x = {}
        m["nested"] = x
        for _ in range(100):
            x["a"] = {}
            x = x["a"]
        p.write_text(json.dumps(m))
    else:
        with open(p, "wb") as f:
            f.write(b'{"format": "chattts-ort/1", "x": "')
            f.truncate(64 << 20)
    t = time.perf_counter()
    match = "larger than" if kind == "huge" else "nests deeper"
    with pytest.raises(ExportError, match=match):
        read_manifest(bad)
    with pytest.raises(ExportError, match=match):
        Runtime.load(bad, threads=1)
    assert is_export(bad) is False
    assert time.perf_counter() - t < 5


# ---------------------------------------------------------------------------------------------------------
# A full disk


def _no_space(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _cheap_verify(monkeypatch):
    import chattts_ort.checks.verify as v

    monkeypatch.setattr(v, "_torch_modules", lambda manifest: (None, None))
    monkeypatch.setattr(v, "verify_blocks", lambda *a, **k: [])
    monkeypatch.setattr(v, "verify_chain", lambda *a, **k: {"ok": True, "identical": True, "steps": 1, "batch": 2,
                                                            "first_mismatch": None})


@pytest.mark.parametrize("cmd", ["export", "quantize", "share-weights", "verify"])
def test_enospc_is_one_line_and_the_earlier_export_is_intact(cmd, fused, tmp_path, monkeypatch, capsys):
    import chattts_ort.export.exporter as ex
    import chattts_ort.export.quantize as q
    import chattts_ort.format as fmt
    from chattts_ort.cli import main

    out = tmp_path / "e"
    shutil.copytree(fused, out)
    (out / "verify.json").write_text("{}")
    before = _snapshot(out)
    calls = []

    def fail_second(orig):
        def f(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise _no_space(a[1] if len(a) > 1 else a[0])
            return orig(*a, **k)
        return f

    if cmd == "export":
        monkeypatch.setattr(ex, "_save", fail_second(ex._save))
        argv = ["export", "random-tiny", str(out), "--force", "--quiet"]
    elif cmd == "quantize":
        monkeypatch.setattr(q, "quantize_block", fail_second(q.quantize_block))
        argv = ["quantize", str(fused), str(out), "--plan", "fp32", "--force", "--quiet"]
    elif cmd == "share-weights":
        def ort_fails(src, dst):  # ONNX Runtime's own error type, as a failed write of its optimised model gives
            raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {dst}: No space left on device")
        monkeypatch.setattr(q, "_share_file", ort_fails)
        argv = ["share-weights", str(fused), str(out), "--force"]
    else:
        _cheap_verify(monkeypatch)

        def full_open(path, mode="r", *a, **k):
            if "w" in mode:
                raise _no_space(path)
            return open(path, mode, *a, **k)
        monkeypatch.setattr(fmt, "open", full_open, raising=False)
        argv = ["verify", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = out / "verify.json" if cmd == "verify" else out
    assert len(err) == 1 and err[0].startswith(f"chattts-ort {cmd}: error: no space left on device while writing "
                                               f"{want}") and err[0].endswith("; nothing was replaced"), err
    assert _snapshot(out) == before
    assert _leftovers(tmp_path, "e") == [] and _leftovers(out, "verify.json") == []


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB tmpfs (the tiny export is ~28 MB: one fits, two do not); skipped where mount is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], capture_output=True,
                       timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], timeout=30)


def test_a_real_full_disk(fused, small_disk, monkeypatch, capsys):
    from chattts_ort.cli import main

    out = small_disk / "e"
    shutil.copytree(fused, out)
    before = _snapshot(out)
    for argv in (["quantize", str(fused), str(out), "--plan", "fp32", "--force", "--quiet"],
                 ["share-weights", str(fused), str(out), "--force"],
                 ["export", "random-tiny", str(out), "--force", "--quiet"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no space left on device while writing" in err[0] \
            and err[0].endswith("nothing was replaced"), err
        assert _snapshot(out) == before and _leftovers(small_disk, "e") == []
        open_export(out)
    # verify's report on a disk with no room left at all
    with open(small_disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
        except OSError:
            pass
    _cheap_verify(monkeypatch)
    big = json.dumps({"pad": "x" * (1 << 20)})  # larger than any block the disk has left

    import chattts_ort.checks.verify as v
    monkeypatch.setattr(v.VerifyReport, "to_json", lambda self: json.loads(big))
    assert main(["verify", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no space left on device while writing {out / 'verify.json'}" in err[0], err
    assert _leftovers(out, "verify.json") == []


# ---------------------------------------------------------------------------------------------------------
# say refuses an output it cannot write before it synthesises


@pytest.mark.parametrize("where", ["folder", "unwritable", "missing"])
def test_say_refuses_a_bad_out_before_loading(where, tmp_path, monkeypatch, capsys):
    import chattts_ort.prepare as prep
    from chattts_ort.cli import main

    def never(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(prep, "resolve_model", never)
    if where == "folder":
        out = tmp_path / "x.wav"
        out.mkdir()
    elif where == "unwritable":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc")
        out = Path("/proc/x.wav")
    else:
        out = tmp_path / "nope" / "x.wav"
    assert main(["say", "hi", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chattts-ort say: error:") and str(out) in err[0], err
