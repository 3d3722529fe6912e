"""ChatTTS's real weights from the Hugging Face Hub: `--model 2Noise/ChatTTS[@revision]`.

huggingface_hub does the transfer (its cache, resumable downloads, its progress bars; HF_ENDPOINT, HF_HUB_OFFLINE,
HF_TOKEN and HF_HUB_CACHE are honoured as everywhere else). We ask only for the files ChatTTS 0.2.5 itself loads,
and check every one against a sha256 before anything uses it:
- 2Noise/ChatTTS: the values ChatTTS 0.2.5 publishes (ChatTTS/res/sha256_map.json), pinned below;
- any other repository (a fork, a mirror): the sha256 the Hub lists for the file (its LFS object id), or for a file
  kept in git itself, its git blob id (sha1 of "blob <size>\\0" + content).
A file that does not match is named in the error and its cached copy removed, so the next try downloads it
again. A verified snapshot is recorded (cache_dir()/hub/), so later runs neither re-hash a gigabyte nor need the
network.

Torch-free: exporting what was fetched is the caller's business (chattts_ort.prepare).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from .defaults import cache_dir
from .errors import AssetError

CHATTTS_REPO = "2Noise/ChatTTS"

# What ChatTTS 0.2.5 loads from its snapshot (Chat.load -> snapshot_download + check_all_assets).
ASSET_FILES = (
    "asset/gpt/config.json",
    "asset/gpt/model.safetensors",
    "asset/Embed.safetensors",
    "asset/Decoder.safetensors",
    "asset/Vocos.safetensors",
    "asset/DVAE.safetensors",
    "asset/tokenizer/special_tokens_map.json",
    "asset/tokenizer/tokenizer_config.json",
    "asset/tokenizer/tokenizer.json",
)

# The sha256 of each file as ChatTTS 0.2.5 publishes them (facts; its res/sha256_map.json).
CHATTTS_SHA256 = {
    "asset/Decoder.safetensors": "77aa55e0a977949c4733df3c6f876fa85860d3298cba63295a7bc6901729d4e0",
    "asset/DVAE.safetensors": "1d0b044a8368c0513100a2eca98456b289e6be6a18b7a63be1bcaa315ea874d9",
    "asset/Embed.safetensors": "2ff0be7134934155741b643b74e32fb6bf3eec41257984459b2ed60cdb4c48b0",
    "asset/Vocos.safetensors": "07e5561491cce41f7f90cfdb94b2ff263ff5742c3d89339db99b17ad82cc3f44",
    "asset/gpt/config.json": "0aaa1ecd96c49ad4f473459eb1982fa7ad79fa5de08cde2781bf6ad1f9a0c236",
    "asset/gpt/model.safetensors": "cd0806fd971f52f6a22c923ec64982b305e817bcc41ca83417fcf9141b984a0f",
    "asset/tokenizer/special_tokens_map.json": "bd0ac9d9bb1657996b5c5fbcaa7d80f8de530d01a283da97f89deae5b1b8d011",
    "asset/tokenizer/tokenizer_config.json": "43e9d658b554fa5ee8d8e1d763349323bfef1ed7a89c0794220ab8861387d421",
    "asset/tokenizer/tokenizer.json": "843838a64e121e23e774cc75874c6fe862198d9f7dd43747914633a8fd89c20e",
}

# owner/name[@revision], as on the Hub (names of letters, digits, '-', '_', '.').
_SPEC = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[\w./-]{1,200}))?")


class HubError(AssetError):
    """The model could not be fetched or verified."""


class HubOffline(HubError):
    """The Hub cannot be reached (or HF_HUB_OFFLINE is set) and the files are not cached."""


class ChecksumError(HubError):
    """A fetched file is not the file its sha256 says."""


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    revision: Optional[str] = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass
class HubModel:
    """A verified snapshot: `asset_dir` is its ChatTTS asset folder."""
    spec: HubSpec
    commit: str
    asset_dir: Path
    sha256: Dict[str, str] = field(default_factory=dict)  # ASSET_FILES -> sha256

    @property
    def source_key(self) -> str:
        """One hash of every file's sha256: the name of what an export of this snapshot is made from."""
        return source_key(self.sha256)


def source_key(hashes: Dict[str, str]) -> str:
    text = "\n".join(f"{k} {hashes[k]}" for k in sorted(hashes))
    return hashlib.sha256(text.encode()).hexdigest()


def parse_spec(text) -> Optional[HubSpec]:
    """A HubSpec for "owner/name[@revision]", or None when `text` is not of that form or names an existing path
    (a local folder always wins)."""
    if not isinstance(text, str):
        return None
    m = _SPEC.fullmatch(text)
    if m is None or Path(text).exists():
        return None
    return HubSpec(m["repo"], m["rev"])


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _endpoint() -> Optional[str]:
    """HF_ENDPOINT as it is now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _record_path(spec: HubSpec, commit: str) -> Path:
    return cache_dir() / "hub" / spec.repo_id.replace("/", "--") / f"{commit}.json"


def _stat_key(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _recorded(spec: HubSpec, commit: str, root: Path) -> Optional[Dict[str, str]]:
    """The hashes verified earlier for this snapshot, if its files are still the very files then checked."""
    try:
        rec = json.loads(_record_path(spec, commit).read_text())
        files = rec["files"]
        if sorted(files) != sorted(ASSET_FILES):
            return None
        for name, entry in files.items():
            if _stat_key((root / name).resolve()) != entry["stat"]:
                return None
        return {name: entry["sha256"] for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record(spec: HubSpec, commit: str, root: Path, hashes: Dict[str, str]) -> None:
    from .format import write_text_atomic

    path = _record_path(spec, commit)
    path.parent.mkdir(parents=True, exist_ok=True)
    files = {n: {"sha256": h, "stat": _stat_key((root / n).resolve())} for n, h in hashes.items()}
    write_text_atomic(path, json.dumps({"repo": spec.repo_id, "commit": commit, "files": files}, indent=1))


def _hub_hashes(spec: HubSpec, commit: str, timeout: float) -> Dict[str, tuple]:
    """file -> ("sha256", hex) for LFS files, ("sha1-blob", hex) for files kept in git, as the Hub lists them."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    out = {}
    for f in HfApi(endpoint=_endpoint()).list_repo_tree(spec.repo_id, revision=commit, recursive=True):
        if isinstance(f, RepoFile) and f.path in ASSET_FILES:
            out[f.path] = ("sha256", f.lfs.sha256) if f.lfs is not None else ("sha1-blob", f.blob_id)
    return out


def _offline_errors() -> tuple:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    errs = [LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for mod in ("httpx", "httpx2", "requests"):
        try:
            m = __import__(mod)
            errs += [m.ConnectError if hasattr(m, "ConnectError") else m.ConnectionError,
                     m.TimeoutException if hasattr(m, "TimeoutException") else m.Timeout]
        except ImportError:
            pass
    return tuple(errs)


def unreachable(spec: HubSpec, timeout: float = 5.0) -> Optional[str]:
    """None if the Hub answers for `spec` within `timeout` seconds, else why not (one short clause)."""
    from huggingface_hub import HfApi

    if _offline():
        return "HF_HUB_OFFLINE is set"
    try:
        HfApi(endpoint=_endpoint()).model_info(spec.repo_id, revision=spec.revision, timeout=timeout)
    except _offline_errors() as e:
        where = os.environ.get("HF_ENDPOINT") or "the Hugging Face Hub"
        return f"{where} cannot be reached ({type(e).__name__})"
    except Exception as e:  # noqa: BLE001 - any answer but the model's info means: not downloadable now
        return f"the Hub did not give {spec} ({type(e).__name__}: {_first_line(e)})"
    return None


def fetch(spec, *, progress: bool = True, local_only: bool = False, expected: Optional[Dict[str, str]] = None,
          timeout: float = 10.0) -> HubModel:
    """Download (or find in the cache) the files of ASSET_FILES of `spec` and verify each one.

    expected: file -> sha256 to check against (default: ChatTTS's published values for 2Noise/ChatTTS, the Hub's
    listing for any other repository). local_only: never touch the network (HubOffline if not cached).
    timeout: seconds for each metadata request (a host that does not answer fails within it)."""
    if isinstance(spec, str):
        parsed = parse_spec(spec)
        if parsed is None:
            raise HubError(f"{spec!r} is not a Hub model id (owner/name[@revision])")
        spec = parsed
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    local_only = local_only or _offline()
    kw = dict(revision=spec.revision, allow_patterns=list(ASSET_FILES), etag_timeout=timeout, endpoint=_endpoint(),
              cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    if not progress:
        kw["tqdm_class"] = _silent_tqdm()
    try:
        snap = Path(snapshot_download(spec.repo_id, local_files_only=local_only, **kw))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise HubError(f"{spec}: no such model on the Hub, or no access to it (HF_TOKEN): {_first_line(e)}") from None
    except RevisionNotFoundError as e:
        raise HubError(f"{spec}: no revision {spec.revision!r} on the Hub: {_first_line(e)}") from None
    except _offline_errors() as e:
        host = os.environ.get("HF_ENDPOINT") or "the Hugging Face Hub"
        where = ("HF_HUB_OFFLINE is set" if _offline() else "the Hub was not asked" if local_only
                 else f"{host} cannot be reached")
        raise HubOffline(f"{spec}: not in the cache and {where} ({type(e).__name__}: {_first_line(e)})") from None
    missing = [n for n in ASSET_FILES if not (snap / n).is_file()]
    if missing:
        raise HubError(f"{spec}: the snapshot lacks {', '.join(missing)} (not a ChatTTS model repository?)")
    commit = snap.name
    hashes = _recorded(spec, commit, snap)
    if hashes is None:
        hashes = _verify(spec, commit, snap, expected, local_only, timeout)
        _record(spec, commit, snap, hashes)
    return HubModel(spec, commit, snap / "asset", hashes)


def _verify(spec: HubSpec, commit: str, snap: Path, expected, local_only: bool, timeout: float) -> Dict[str, str]:
    if expected is None and spec.repo_id == CHATTTS_REPO:
        expected = CHATTTS_SHA256
    listed = {}
    if expected is None:
        if local_only:
            raise HubOffline(f"{spec}: cached but never verified, and the Hub's hashes need the network")
        try:
            listed = _hub_hashes(spec, commit, timeout)
        except _offline_errors() as e:
            raise HubOffline(f"{spec}: cannot read the Hub's hashes to verify the files ({_first_line(e)})") from None
    hashes = {}
    for name in ASSET_FILES:
        path = snap / name
        got = file_sha256(path)
        if expected is not None:
            kind, want = "sha256", expected.get(name)
        else:
            kind, want = listed.get(name, ("sha256", None))
        if want is None:
            raise ChecksumError(f"{spec}: no hash to check {name} against")
        have = got if kind == "sha256" else git_blob_sha1(path)
        if have != want:
            _drop(path)
            raise ChecksumError(f"{spec}: {name} does not match its {kind} (expected {want}, got {have}); the "
                                "cached copy was removed, nothing was exported")
        hashes[name] = got
    return hashes


def _drop(path: Path) -> None:
    """Remove a bad file from huggingface_hub's cache: the blob the snapshot links to and the link."""
    try:
        target = path.resolve()
        path.unlink(missing_ok=True)
        if target != path:
            target.unlink(missing_ok=True)
    except OSError:
        pass


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _silent_tqdm():
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *a, **k):
            k["disable"] = True
            super().__init__(*a, **k)

    return Silent
