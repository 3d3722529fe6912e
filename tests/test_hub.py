"""`--model owner/name`: the Hub path end to end against a Hub on loopback (tests/hub_server.py): download, hash
check, export, speech; a tampered file refused by name; an interrupted download resumed; the offline fallback; a
second process starting while the first exports. The real ChatTTS tokenizer (../shared/chattts-asset) rides on a
tiny random model. Commands run in child processes that get the loopback Hub's address (huggingface_hub reads its
settings at import, and the test session itself is offline)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chattts_ort import hub
from tests.hub_server import HubServer, Repo

pytestmark = pytest.mark.slow

EXPORT_ROOT_FILES = ("manifest.json",)


@pytest.fixture(scope="module")
def tiny_asset(tmp_path_factory, chattts_asset_dir):
    """A tiny random model in ChatTTS's asset layout with ChatTTS's real tokenizer files."""
    from chattts_ort.config import GPTConfig
    from chattts_ort.export.assets import write_random_asset_folder

    root = tmp_path_factory.mktemp("hubrepo")
    asset = root / "asset"
    write_random_asset_folder(asset, cfg=GPTConfig.tiny(), seed=3,
                              tokenizer_json=chattts_asset_dir / "tokenizer" / "tokenizer.json")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        shutil.copyfile(chattts_asset_dir / "tokenizer" / name, asset / "tokenizer" / name)
    (asset / "DVAE.safetensors").write_bytes(os.urandom(4096))  # ChatTTS fetches it; we do not read it
    (root / "README.md").write_text("a test repository\n")     # not one of ChatTTS's files: never fetched
    return root


@pytest.fixture
def hub_env(tmp_path):
    """A loopback Hub and the environment of a child process that uses it (its own caches)."""
    with HubServer() as server:
        env = dict(os.environ, HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"),
                   HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), CHATTTS_ORT_CACHE=str(tmp_path / "cache"),
                   HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1")
        env.pop("CHATTTS_ORT_TEST_CACHE", None)
        yield server, env


def run(env, *args, timeout=600, check=True):
    p = subprocess.run([sys.executable, "-m", "chattts_ort.cli", *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"chattts-ort {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def file_gets(server):
    return sorted({r[1].split("/resolve/", 1)[1].split("/", 1)[1] for r in server.requests
                   if r[0] == "GET" and "/resolve/" in r[1]})


def exports(env):
    root = Path(env["CHATTTS_ORT_CACHE"]) / "exports"
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file()) if root.is_dir() else []


def test_download_verify_export_speak(hub_env, tiny_asset, tmp_path):
    server, env = hub_env
    server.repos["tester/chattts-tiny"] = Repo.from_folder(tiny_asset)
    out = tmp_path / "x.wav"
    p = run(env, "say", "今天是2026年12月3日，气温-5°C。", "--model", "tester/chattts-tiny", "-o", str(out),
            "--frames", "30")
    assert "model tester/chattts-tiny" in p.stdout and "wrote" in p.stdout
    import soundfile as sf

    wav, rate = sf.read(out)
    assert rate == 24000 and len(wav) > 0
    # only ChatTTS's own files were fetched, each verified
    assert file_gets(server) == sorted(hub.ASSET_FILES)
    made = exports(env)
    # the fp32 export and the quantized ones tried for the fastest passing precision
    assert len(made) >= 2 and all(m.startswith("tester--chattts-tiny-") for m in made)
    # A second run: nothing downloaded again, nothing exported again.
    server.requests.clear()
    p = run(env, "say", "你好，欢迎使用实时语音合成。", "--model", "tester/chattts-tiny", "-o", str(out),
            "--frames", "10")
    assert file_gets(server) == [] and "exporting" not in p.stdout and exports(env) == made
    # An unknown revision is a clear error.
    p = run(env, "say", "hi", "--model", "tester/chattts-tiny@nope", "-o", str(out), check=False)
    assert p.returncode == 2 and "no revision 'nope'" in p.stderr


def test_tampered_file_refused_by_name(hub_env, tiny_asset, tmp_path, chattts_asset_dir):
    server, env = hub_env
    # A mirror whose file is not the one its listing describes.
    server.repos["tester/chattts-tiny"] = Repo.from_folder(tiny_asset)
    server.tamper["asset/Embed.safetensors"] = b"\0" * 64
    p = run(env, "say", "hi", "--model", "tester/chattts-tiny", "-o", str(tmp_path / "x.wav"), check=False)
    assert p.returncode == 2 and "asset/Embed.safetensors does not match" in p.stderr, p.stderr
    assert exports(env) == [] and not (tmp_path / "x.wav").exists()
    # 2Noise/ChatTTS is checked against ChatTTS's published hashes: its real config and tokenizer pass, random
    # weights do not.
    repo = Repo.from_folder(tiny_asset)
    repo.files["asset/gpt/config.json"] = (chattts_asset_dir / "gpt" / "config.json").read_bytes()
    server.repos["2Noise/ChatTTS"] = repo
    p = run(env, "say", "hi", "--model", "2Noise/ChatTTS", "-o", str(tmp_path / "x.wav"), check=False)
    assert p.returncode == 2 and "asset/gpt/model.safetensors does not match its sha256" in p.stderr, p.stderr
    assert exports(env) == []
    # The bad file was dropped from the cache: once the mirror is mended, the next run fetches it again.
    server.tamper.clear()
    server.requests.clear()
    p = run(env, "say", "hi", "--model", "tester/chattts-tiny", "-o", str(tmp_path / "x.wav"), "--frames", "5")
    assert "asset/Embed.safetensors" in file_gets(server)


def test_interrupted_download_resumes(hub_env, tiny_asset, tmp_path):
    """A dropped connection in the middle of a file is resumed from where it broke (a Range request), and the
    file verified whole. A process killed mid-file: huggingface_hub >= 2 downloads into a file of its own per
    process, so the next process starts that file again; it must still end verified."""
    server, env = hub_env
    repo = Repo.from_folder(tiny_asset)
    repo.files["asset/DVAE.safetensors"] = os.urandom(12 << 20)  # more than huggingface_hub's 10 MiB write chunk
    server.repos["tester/chattts-tiny"] = repo
    code = "import sys; from chattts_ort import hub; m = hub.fetch(sys.argv[1], progress=False); print(m.commit)"
    # 1. a process killed while the file is half sent
    server.stall["asset/DVAE.safetensors"] = 11 << 20
    child = subprocess.Popen([sys.executable, "-c", code, "tester/chattts-tiny"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        part = []
        while time.time() < deadline and not part:
            part = [p for p in Path(env["HF_HUB_CACHE"]).rglob("*.incomplete") if p.stat().st_size >= 10 << 20]
            assert child.poll() is None, child.communicate()
            time.sleep(0.1)
        assert part, "the download never reached 10 MiB"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        server.release()
    # 2. the next process, whose connection drops after 11 MiB of the file
    server.requests.clear()
    server.cut_once["asset/DVAE.safetensors"] = 11 << 20
    p = subprocess.run([sys.executable, "-c", code, "tester/chattts-tiny"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    ranges = [r[2] for r in server.requests if r[0] == "GET" and r[1].endswith("DVAE.safetensors")]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    assert ranges[1].startswith("bytes=") and int(ranges[1][6:].split("-")[0]) >= 10 << 20, ranges
    snap = Path(env["HF_HUB_CACHE"]) / "models--tester--chattts-tiny" / "snapshots" / p.stdout.strip()
    assert (snap / "asset" / "DVAE.safetensors").read_bytes() == repo.files["asset/DVAE.safetensors"]


def test_offline_falls_back_to_the_random_model(monkeypatch, capsys, tiny_export):
    """No --model: ChatTTS's model if cached or downloadable, else the random one, said in one line, at once."""
    from chattts_ort import prepare

    if "-portable-" in tiny_export.name:
        pytest.skip("one layer form is enough")
    calls = []
    monkeypatch.setattr(prepare, "demo_model", lambda kind="full", progress=True: (calls.append(kind), tiny_export,
                                                                                     "precision fp32")[1:])
    t0 = time.perf_counter()
    got = prepare.default_model(progress=True)  # HF_HUB_OFFLINE is set for the test session
    assert time.perf_counter() - t0 < 5
    out = capsys.readouterr().out.strip().splitlines()
    assert got.folder == tiny_export and calls == ["full"]
    assert len(out) == 1 and "2Noise/ChatTTS is not cached and HF_HUB_OFFLINE is set" in out[0], out
    # A Hub that accepts connections and never answers costs at most the probe's timeout.
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(prepare, "PROBE_TIMEOUT", 1.0)
        t0 = time.perf_counter()
        got = prepare.default_model(progress=True)
        assert time.perf_counter() - t0 < 8 and got.folder == tiny_export
        assert "cannot be reached" in capsys.readouterr().out
    finally:
        silent.close()


def test_second_process_waits_for_the_first(hub_env, tiny_asset, tmp_path):
    server, env = hub_env
    server.repos["tester/chattts-tiny"] = Repo.from_folder(tiny_asset)
    args = ("say", "你好。", "--model", "tester/chattts-tiny", "--frames", "5")
    first = subprocess.Popen([sys.executable, "-m", "chattts_ort.cli", *args, "-o", str(tmp_path / "a.wav")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        locks = Path(env["CHATTTS_ORT_CACHE"]) / "locks"
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not _held(locks):
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        second = run(env, *args, "-o", str(tmp_path / "b.wav"))
        out1, err1 = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err1
    assert "another process is preparing" in second.stdout and "exporting" not in second.stdout, second.stdout
    assert "exporting" in out1
    assert len(exports(env)) >= 2 and len({e.split("-v")[0] for e in exports(env)}) == 1
    assert (tmp_path / "a.wav").stat().st_size > 44 and (tmp_path / "b.wav").stat().st_size > 44


def _held(locks: Path) -> bool:
    from filelock import FileLock, Timeout

    for p in locks.glob("*.lock") if locks.is_dir() else []:
        lock = FileLock(str(p))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
    return False


def test_parse_spec(tmp_path, monkeypatch):
    assert hub.parse_spec("2Noise/ChatTTS") == hub.HubSpec("2Noise/ChatTTS", None)
    assert hub.parse_spec("2Noise/ChatTTS@v0.2") == hub.HubSpec("2Noise/ChatTTS", "v0.2")
    for bad in ("random", "a/b/c", "/abs/path", "x/", "", None, 3):
        assert hub.parse_spec(bad) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "folder").mkdir(parents=True)
    assert hub.parse_spec("local/folder") is None  # an existing folder wins
