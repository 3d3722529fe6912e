"""Shared fixtures: a private cache folder, the tiny random export, the real ChatTTS asset folder if present."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never touch the network: the Hugging Face Hub is off for everything this process and its children do
# (huggingface_hub reads these at import), so the default model resolves to the random one at once. The Hub's
# tests start their own loopback Hub and pass its address to the processes they run.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    # Tests never touch the user's cache; CHATTTS_ORT_TEST_CACHE reuses one between runs if set.
    root = os.environ.get("CHATTTS_ORT_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("CHATTTS_ORT_CACHE")
    os.environ["CHATTTS_ORT_CACHE"] = root
    yield Path(root)
    if old is None:
        os.environ.pop("CHATTTS_ORT_CACHE", None)
    else:
        os.environ["CHATTTS_ORT_CACHE"] = old


@pytest.fixture(scope="session", params=["fused", "portable"])
def tiny_export(request, _private_cache):
    """The tiny random model exported in each layer form (every test using it runs for both)."""
    from chattts_ort.export.exporter import default_export

    return default_export("tiny", layer_form=request.param)


@pytest.fixture(scope="session")
def tiny_model(_private_cache):
    from chattts_ort.export.sources import resolve_source

    gpt, cfg, tok = resolve_source("random-tiny")
    return gpt, cfg, tok


@pytest.fixture(scope="session")
def chattts_asset_dir():
    """The real ChatTTS tokenizer/config folder (../shared/chattts-asset), or a skip."""
    cands = [os.environ.get("CHATTTS_ASSET_DIR"), REPO.parent / "shared" / "chattts-asset"]
    for c in cands:
        if c and (Path(c) / "tokenizer" / "tokenizer.json").is_file():
            return Path(c)
    pytest.skip("ChatTTS asset folder (../shared/chattts-asset) not present")
