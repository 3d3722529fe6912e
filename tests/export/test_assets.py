"""Asset folders in ChatTTS's layout: write, load back, and clear errors for bad folders."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from chattts_ort.config import ADDED_TOKENS, GPTConfig
from chattts_ort.errors import AssetError
from chattts_ort.export.assets import load_asset_folder, make_generated_tokenizer, write_random_asset_folder
from chattts_ort.tokenizer import Tokenizer


@pytest.fixture()
def tiny_folder(tmp_path):
    return write_random_asset_folder(tmp_path / "asset", GPTConfig.tiny(), seed=1)


def test_layout_and_round_trip(tiny_folder):
    for rel in ("gpt/config.json", "gpt/model.safetensors", "Embed.safetensors", "tokenizer/tokenizer.json"):
        assert (tiny_folder / rel).is_file(), rel
    emb = load_file(str(tiny_folder / "Embed.safetensors"))
    assert "head_text.parametrizations.weight.original0" in emb and "emb_code.3.weight" in emb
    llama = load_file(str(tiny_folder / "gpt" / "model.safetensors"))
    assert "layers.1.self_attn.q_proj.weight" in llama and "norm.weight" in llama
    gpt, cfg, tok = load_asset_folder(tiny_folder)
    assert cfg == GPTConfig.tiny()
    assert torch.equal(gpt.layers[1].q_proj.weight, llama["layers.1.self_attn.q_proj.weight"])
    assert torch.equal(gpt.embed.emb_code[3].weight, emb["emb_code.3.weight"])


def test_seeded_and_deterministic(tmp_path):
    a = write_random_asset_folder(tmp_path / "a", GPTConfig.tiny(), seed=7)
    b = write_random_asset_folder(tmp_path / "b", GPTConfig.tiny(), seed=7)
    c = write_random_asset_folder(tmp_path / "c", GPTConfig.tiny(), seed=8)
    fa, fb, fc = (load_file(str(p / "Embed.safetensors")) for p in (a, b, c))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert not torch.equal(fa["emb_text.weight"], fc["emb_text.weight"])


def test_write_is_atomic(tmp_path, monkeypatch):
    import chattts_ort.export.assets as assets

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(assets, "random_state_dicts", boom)
    with pytest.raises(OSError):
        write_random_asset_folder(tmp_path / "x", GPTConfig.tiny())
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_and_files(tiny_folder, tmp_path):
    with pytest.raises(AssetError, match="not found"):
        load_asset_folder(tmp_path / "nope")
    (tiny_folder / "Embed.safetensors").unlink()
    with pytest.raises(AssetError, match="Embed.safetensors"):
        load_asset_folder(tiny_folder)


def test_missing_tensor_and_wrong_shape(tiny_folder):
    p = tiny_folder / "gpt" / "model.safetensors"
    sd = load_file(str(p))
    del sd["layers.0.mlp.up_proj.weight"]
    save_file(sd, str(p))
    with pytest.raises(AssetError, match="layers.0.mlp.up_proj.weight"):
        load_asset_folder(tiny_folder)
    sd["layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(p))
    with pytest.raises(AssetError, match=r"shape \(3, 3\)"):
        load_asset_folder(tiny_folder)


def test_config_errors(tiny_folder):
    p = tiny_folder / "gpt" / "config.json"
    cfg = json.loads(p.read_text())
    del cfg["num_audio_tokens"]
    p.write_text(json.dumps(cfg))
    with pytest.raises(AssetError, match="num_audio_tokens"):
        load_asset_folder(tiny_folder)
    p.write_text("{not json")
    with pytest.raises(AssetError, match="config.json"):
        load_asset_folder(tiny_folder)


def test_corrupt_safetensors(tiny_folder):
    (tiny_folder / "Embed.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(AssetError, match="Embed.safetensors"):
        load_asset_folder(tiny_folder)


def test_real_config_reads(chattts_asset_dir):
    cfg = GPTConfig.from_json(chattts_asset_dir / "gpt" / "config.json")
    assert cfg == GPTConfig.full()


def test_default_tiny_folder_is_cached(_private_cache):
    from chattts_ort.export.sources import random_asset_folder

    def tiny_asset_folder():
        return random_asset_folder("tiny")

    a = tiny_asset_folder()
    assert str(a).startswith(str(_private_cache))
    mtime = (a / "gpt" / "model.safetensors").stat().st_mtime_ns
    assert tiny_asset_folder() == a  # second call reuses it
    assert (a / "gpt" / "model.safetensors").stat().st_mtime_ns == mtime
    gpt, cfg, _ = load_asset_folder(a, device="cpu")
    assert cfg == GPTConfig.tiny() and next(gpt.parameters()).device.type == "cpu"


def test_gqa_config_rejected(tiny_folder):
    p = tiny_folder / "gpt" / "config.json"
    cfg = json.loads(p.read_text())
    cfg["num_key_value_heads"] = 1
    p.write_text(json.dumps(cfg))
    with pytest.raises(AssetError, match="config.json.*GQA"):
        load_asset_folder(tiny_folder)


def test_embed_tokens_ignored(tiny_folder):
    # A real gpt/model.safetensors may carry LlamaModel's embed_tokens (ChatTTS never uses it).
    p = tiny_folder / "gpt" / "model.safetensors"
    sd = load_file(str(p))
    sd["embed_tokens.weight"] = torch.zeros(32000, GPTConfig.tiny().hidden_size)
    save_file(sd, str(p))
    load_asset_folder(tiny_folder)


def test_generated_tokenizer(tmp_path):
    p = make_generated_tokenizer(tmp_path / "tokenizer.json")
    tok = Tokenizer(p)
    for name, i in ADDED_TOKENS.items():
        assert tok.token_to_id(name) == i
    ids = tok.encode("[Stts][empty_spk][speed_5]hello world[Ptts]")
    assert ids[:3] == [21131, 21144, 21173] and ids[-1] == 21132
    assert tok.unk_id not in ids

