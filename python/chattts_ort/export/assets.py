"""ChatTTS asset folders: loading real ones unchanged, writing random ones in the same layout.

Layout (ChatTTS 0.2.x):
    asset/gpt/config.json          transformers LlamaConfig + num_audio_tokens, num_text_tokens, num_vq
    asset/gpt/model.safetensors    transformers LlamaModel keys (layers.N.self_attn.q_proj.weight, norm.weight, ...)
    asset/Embed.safetensors        emb_text.weight, emb_code.N.weight,
                                   head_text.parametrizations.weight.original0 / original1 (weight norm g / v),
                                   head_code.N.parametrizations.weight.original0 / original1
    asset/tokenizer/tokenizer.json the BERT WordPiece tokenizer
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, Tuple

import torch

from ..config import ADDED_TOKENS, BERT_SPECIAL, GPTConfig
from ..errors import AssetError
from .model import ChatTTSGPT, bake_weight_norm

LAYER_KEYS = {  # LlamaModel key suffix -> our DecoderLayer attribute
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.o_proj.weight": "o_proj.weight",
    "mlp.gate_proj.weight": "gate_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "down_proj.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
}
WN_G, WN_V = "parametrizations.weight.original0", "parametrizations.weight.original1"


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise AssetError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise AssetError(f"{path}: cannot read safetensors ({e})") from e


def _take(sd: Dict[str, torch.Tensor], key: str, shape, path: Path) -> torch.Tensor:
    if key not in sd:
        raise AssetError(f"{path}: missing tensor '{key}'")
    t = sd[key]
    if tuple(t.shape) != tuple(shape):
        raise AssetError(f"{path}: tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(shape)} from the config")
    return t.float()


def gpt_from_state_dicts(cfg: GPTConfig, llama_sd, embed_sd, llama_path=Path("gpt/model.safetensors"),
                         embed_path=Path("Embed.safetensors")) -> ChatTTSGPT:
    E, F_, V_t, V_c = cfg.hidden_size, cfg.intermediate_size, cfg.num_text_tokens, cfg.num_audio_tokens
    shapes = {
        "q_proj.weight": (E, E), "k_proj.weight": (E, E), "v_proj.weight": (E, E), "o_proj.weight": (E, E),
        "gate_proj.weight": (F_, E), "up_proj.weight": (F_, E), "down_proj.weight": (E, F_),
        "input_layernorm.weight": (E,), "post_attention_layernorm.weight": (E,),
    }
    model = ChatTTSGPT(cfg)
    ours = {}
    prefix = "model." if any(k.startswith("model.layers.") for k in llama_sd) else ""
    for i in range(cfg.num_layers):
        for theirs, mine in LAYER_KEYS.items():
            ours[f"layers.{i}.{mine}"] = _take(llama_sd, f"{prefix}layers.{i}.{theirs}", shapes[mine], llama_path)
    extra = [k for k in llama_sd if k.startswith(f"{prefix}layers.{cfg.num_layers}.")]
    if extra:
        raise AssetError(f"{llama_path}: has more layers than num_hidden_layers={cfg.num_layers} ({extra[0]})")
    ours["heads.norm.weight"] = _take(llama_sd, f"{prefix}norm.weight", (E,), llama_path)
    ours["embed.emb_text.weight"] = _take(embed_sd, "emb_text.weight", (V_t, E), embed_path)
    for i in range(cfg.num_vq):
        ours[f"embed.emb_code.{i}.weight"] = _take(embed_sd, f"emb_code.{i}.weight", (V_c, E), embed_path)
        g = _take(embed_sd, f"head_code.{i}.{WN_G}", (V_c, 1), embed_path)
        v = _take(embed_sd, f"head_code.{i}.{WN_V}", (V_c, E), embed_path)
        ours[f"heads.head_code.{i}.weight"] = bake_weight_norm(g, v)
    g = _take(embed_sd, f"head_text.{WN_G}", (V_t, 1), embed_path)
    v = _take(embed_sd, f"head_text.{WN_V}", (V_t, E), embed_path)
    ours["heads.head_text.weight"] = bake_weight_norm(g, v)
    model.load_state_dict(ours, strict=True)
    return model.eval()


def load_asset_folder(path, device="cpu") -> Tuple[ChatTTSGPT, GPTConfig, Path]:
    """(model, config, tokenizer.json path) from a ChatTTS asset folder (gpt/model.safetensors' LlamaModel
    embed_tokens, unused by ChatTTS, is ignored when present)."""
    path = Path(path)
    if not path.is_dir():
        raise AssetError(f"{path}: asset folder not found")
    cfg = GPTConfig.from_json(path / "gpt" / "config.json")
    llama_path, embed_path = path / "gpt" / "model.safetensors", path / "Embed.safetensors"
    tok = path / "tokenizer" / "tokenizer.json"
    if not tok.is_file():
        raise AssetError(f"{tok}: tokenizer file not found")
    model = gpt_from_state_dicts(cfg, _load_safetensors(llama_path), _load_safetensors(embed_path),
                                 llama_path, embed_path)
    return model.to(device), cfg, tok


def random_state_dicts(cfg: GPTConfig, seed: int = 0):
    """Seeded random weights in ChatTTS's two state dicts (LlamaModel keys; Embed with weight-norm keys)."""
    g = torch.Generator().manual_seed(seed)
    E, F_, V_t, V_c = cfg.hidden_size, cfg.intermediate_size, cfg.num_text_tokens, cfg.num_audio_tokens

    def normal(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    def norm_w(n):  # near 1, not exactly 1, so a norm is never a no-op in tests
        return 1.0 + normal(n, std=0.1)

    llama = {}
    for i in range(cfg.num_layers):
        for name, shape in (("self_attn.q_proj.weight", (E, E)), ("self_attn.k_proj.weight", (E, E)),
                            ("self_attn.v_proj.weight", (E, E)), ("self_attn.o_proj.weight", (E, E)),
                            ("mlp.gate_proj.weight", (F_, E)), ("mlp.up_proj.weight", (F_, E)),
                            ("mlp.down_proj.weight", (E, F_))):
            llama[f"layers.{i}.{name}"] = normal(*shape)
        llama[f"layers.{i}.input_layernorm.weight"] = norm_w(E)
        llama[f"layers.{i}.post_attention_layernorm.weight"] = norm_w(E)
    llama["norm.weight"] = norm_w(E)
    emb = {"emb_text.weight": normal(V_t, E, std=1.0)}
    for i in range(cfg.num_vq):
        emb[f"emb_code.{i}.weight"] = normal(V_c, E, std=1.0)
        # g spread around 3 gives logits of a few units, so sampling is not near-uniform.
        emb[f"head_code.{i}.{WN_G}"] = (3.0 + normal(V_c, 1, std=0.5)).abs()
        emb[f"head_code.{i}.{WN_V}"] = normal(V_c, E)
    emb[f"head_text.{WN_G}"] = (3.0 + normal(V_t, 1, std=0.5)).abs()
    emb[f"head_text.{WN_V}"] = normal(V_t, E)
    return llama, emb


def is_asset_folder(path) -> bool:
    """A folder in ChatTTS's asset layout (what write_random_asset_folder may replace)."""
    path = Path(path)
    return (path / "gpt" / "config.json").is_file() and (path / "Embed.safetensors").is_file()


def write_random_asset_folder(path, cfg: GPTConfig = None, seed: int = 0, tokenizer_json=None,
                              audio: bool = True) -> Path:
    """Write a seeded random model in ChatTTS's asset layout (atomically: temp folder, then rename; an
    existing folder is replaced only if it is an asset folder or empty).

    tokenizer_json: a tokenizer.json to copy; default: the generated one (make_generated_tokenizer below),
    which has ChatTTS's special tokens at ChatTTS's ids. gpt/model.safetensors omits LlamaModel's
    embed_tokens (ChatTTS never uses it: it feeds inputs_embeds). audio: also Decoder.safetensors and
    Vocos.safetensors (ChatTTS's shapes at full size, narrow channels for a tiny GPT).
    """
    import json

    from safetensors.torch import save_file


    from ..format import atomic_folder

    cfg = cfg or GPTConfig.full()
    path = Path(path)
    with atomic_folder(path, force=True, replaceable=is_asset_folder, what="a ChatTTS asset folder") as tmp:
        (tmp / "gpt").mkdir()
        (tmp / "tokenizer").mkdir()
        (tmp / "gpt" / "config.json").write_text(json.dumps(cfg.to_chattts_json(), indent=2))
        llama, emb = random_state_dicts(cfg, seed)
        save_file({k: v.contiguous() for k, v in llama.items()}, str(tmp / "gpt" / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in emb.items()}, str(tmp / "Embed.safetensors"))
        if audio:
            from ..config import AudioConfig
            from .audio import write_random_audio

            full = cfg.hidden_size == GPTConfig.full().hidden_size
            write_random_audio(tmp, AudioConfig.full() if full else AudioConfig.tiny(cfg.hidden_size), seed=seed)
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer" / "tokenizer.json")
        else:
            make_generated_tokenizer(tmp / "tokenizer" / "tokenizer.json")
    return path


def to_transformers_llama_state_dict(model: ChatTTSGPT) -> Dict[str, torch.Tensor]:
    """Our layers (and final norm) under transformers LlamaModel keys (no embed_tokens)."""
    sd = {}
    for i, layer in enumerate(model.layers):
        lsd = layer.state_dict()
        for theirs, mine in LAYER_KEYS.items():
            sd[f"layers.{i}.{theirs}"] = lsd[mine]
    sd["norm.weight"] = model.heads.norm.weight.detach()
    return sd


# What the generated vocabulary holds besides the special tokens: every character ChatTTS's front-end lets through
# (all of CJK U+4E00..U+9FFF, letters, digits and its punctuation "，。、,."), WordPiece continuations of letters
# and digits (so any English word splits into known pieces), ASCII punctuation and the common full-width marks.
# It fills BERT's 21,128 base ids exactly; GENERATED_TOKENIZER_MARK tells a current generated file from an older one.
_FULL_WIDTH = "，。、！？：；（）“”‘’《》【】「」『』－～…·°"
GENERATED_TOKENIZER_MARK = "欢"


def generated_vocabulary() -> list:
    """The pieces of the generated vocabulary, in id order (BERT's special ids excepted)."""
    ascii_punct = [chr(c) for c in range(0x21, 0x7F) if not chr(c).isalnum()]
    pieces = list("abcdefghijklmnopqrstuvwxyz0123456789") + ascii_punct
    pieces += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789°"]  # ° is a symbol, not punctuation: "5°c"
    pieces += list(_FULL_WIDTH)
    pieces += [chr(c) for c in range(0x4E00, 0xA000)]
    return pieces


def make_generated_tokenizer(path) -> Path:
    """A tokenizer.json of our own for the random default: BERT-style (lowercase normaliser, BERT
    pre-tokeniser, WordPiece) over generated_vocabulary(), BERT's special tokens at 0/100-103 and ChatTTS's 50
    added tokens at exactly ChatTTS's ids. Any text of CJK, Latin letters, digits and common punctuation
    tokenizes without [UNK]."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    base = 21128
    vocab = {}
    for name, i in BERT_SPECIAL.items():
        vocab[name] = i
    pieces = generated_vocabulary()
    if len(pieces) + len(BERT_SPECIAL) > base:
        raise AssertionError(f"generated vocabulary of {len(pieces)} pieces does not fit in {base} ids")
    free = (i for i in range(base) if i not in BERT_SPECIAL.values())
    for p, i in zip(dict.fromkeys(pieces), free):
        vocab[p] = i
    used = set(vocab.values())
    for filler, i in enumerate(i for i in range(base) if i not in used):
        vocab[f"[unused{filler}]"] = i
    tok = HFTokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    from tokenizers import AddedToken

    for name, i in sorted(ADDED_TOKENS.items(), key=lambda kv: kv[1]):
        got = tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        if tok.token_to_id(name) != i:
            raise AssertionError(f"generated tokenizer put {name} at {tok.token_to_id(name)}, expected {i} ({got})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
