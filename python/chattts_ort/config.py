"""The GPT's configuration and ChatTTS's special tokens."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import AssetError

# ChatTTS's added tokens (tokenizer.json of ChatTTS 0.2.x): name -> id. Facts, used by the prompt
# templates, the embedding (speaker rows) and the generated tokenizer of the random default.
ADDED_TOKENS = {
    "[Sasr]": 21128, "[Pasr]": 21129, "[Easr]": 21130, "[Stts]": 21131, "[Ptts]": 21132, "[Etts]": 21133,
    "[Sbreak]": 21134, "[Pbreak]": 21135, "[Ebreak]": 21136, "[uv_break]": 21137, "[v_break]": 21138,
    "[lbreak]": 21139, "[llbreak]": 21140, "[undefine]": 21141, "[laugh]": 21142, "[spk_emb]": 21143,
    "[empty_spk]": 21144, "[music]": 21145, "[pure]": 21146, "[break_0]": 21147, "[break_1]": 21148,
    "[break_2]": 21149, "[break_3]": 21150, "[break_4]": 21151, "[break_5]": 21152, "[break_6]": 21153,
    "[break_7]": 21154, "[laugh_0]": 21155, "[laugh_1]": 21156, "[laugh_2]": 21157, "[oral_0]": 21158,
    "[oral_1]": 21159, "[oral_2]": 21160, "[oral_3]": 21161, "[oral_4]": 21162, "[oral_5]": 21163,
    "[oral_6]": 21164, "[oral_7]": 21165, "[oral_8]": 21166, "[oral_9]": 21167, "[speed_0]": 21168,
    "[speed_1]": 21169, "[speed_2]": 21170, "[speed_3]": 21171, "[speed_4]": 21172, "[speed_5]": 21173,
    "[speed_6]": 21174, "[speed_7]": 21175, "[speed_8]": 21176, "[speed_9]": 21177,
}
BERT_SPECIAL = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
SPECIAL_TOKENS = {k.strip("[]"): v for k, v in {**BERT_SPECIAL, **ADDED_TOKENS}.items()}

_JSON_KEYS = {  # our field -> ChatTTS gpt/config.json key
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "num_text_tokens": "num_text_tokens",
    "num_audio_tokens": "num_audio_tokens",
    "num_vq": "num_vq",
    "max_position_embeddings": "max_position_embeddings",
}


@dataclass
class GPTConfig:
    hidden_size: int = 768
    num_layers: int = 20
    num_heads: int = 12
    intermediate_size: int = 3072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    num_text_tokens: int = 21178
    num_audio_tokens: int = 626
    num_vq: int = 4
    max_position_embeddings: int = 4096

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def full(cls) -> "GPTConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "GPTConfig":
        # Real vocabularies (the special ids must exist), tiny everything else.
        return cls(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=1024)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path) -> "GPTConfig":
        path = Path(path)
        if not path.is_file():
            raise AssetError(f"{path}: config file not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise AssetError(f"{path}: not valid JSON ({e})") from e
        missing = [k for k in _JSON_KEYS.values() if k not in raw and k not in ("rope_theta", "max_position_embeddings")]
        if missing:
            raise AssetError(f"{path}: missing config key(s) {missing}")
        kv = raw.get("num_key_value_heads", raw["num_attention_heads"])
        if kv != raw["num_attention_heads"]:
            raise AssetError(f"{path}: num_key_value_heads={kv} != num_attention_heads (GQA is not supported)")
        if raw.get("rope_scaling"):
            raise AssetError(f"{path}: rope_scaling={raw['rope_scaling']} is not supported")
        kw = {ours: raw[theirs] for ours, theirs in _JSON_KEYS.items() if theirs in raw}
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise AssetError(f"{path}: {e}") from e

    def to_chattts_json(self) -> dict:
        """gpt/config.json in ChatTTS's layout (a transformers LlamaConfig plus ChatTTS's keys)."""
        return {
            "architectures": ["LlamaModel"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": self.hidden_size,
            "initializer_range": 0.02, "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings, "mlp_bias": False, "model_type": "llama",
            "num_attention_heads": self.num_heads, "num_audio_tokens": self.num_audio_tokens,
            "num_hidden_layers": self.num_layers, "num_key_value_heads": self.num_heads,
            "num_text_tokens": self.num_text_tokens, "num_vq": self.num_vq, "pretraining_tp": 1,
            "rms_norm_eps": self.rms_norm_eps, "rope_scaling": None, "rope_theta": self.rope_theta,
            "spk_KL": False, "spk_emb_dim": 192, "tie_word_embeddings": False, "torch_dtype": "float32",
            "use_cache": False, "vocab_size": 32000,
        }


@dataclass
class AudioConfig:
    """Shapes of ChatTTS's audio path: the Decoder (asset/Decoder.safetensors, a DVAE without encoder and
    quantizer) and the Vocos vocoder (asset/Vocos.safetensors). ChatTTS keeps these in code, not in a file;
    an asset folder's are read off its tensors (export.audio.audio_config_of)."""

    dec_idim: int = 384          # the GPT's hidden (768) is two mel frames of dec_idim channels
    dec_bn: int = 128
    dec_hidden: int = 512
    dec_layers: int = 12
    dec_kernel: int = 7
    dec_dilation: int = 2
    n_mels: int = 100
    voc_dim: int = 512
    voc_intermediate: int = 1536
    voc_layers: int = 8
    voc_kernel: int = 7
    n_fft: int = 1024
    hop: int = 256
    sample_rate: int = 24000

    @classmethod
    def full(cls) -> "AudioConfig":
        return cls()

    @classmethod
    def tiny(cls, gpt_hidden: int = 64) -> "AudioConfig":
        # ChatTTS's kernels, layer counts and STFT (so the receptive field and the lookahead are the real ones),
        # narrow channels.
        return cls(dec_idim=gpt_hidden // 2, dec_bn=16, dec_hidden=32, voc_dim=32, voc_intermediate=64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AudioConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # Derived facts (mel positions: 2 per GPT frame; samples: `hop` per mel frame).
    mel_per_frame = 2

    @property
    def samples_per_frame(self) -> int:
        return self.mel_per_frame * self.hop

    @property
    def decoder_reach(self) -> int:
        """Mel frames each side that one Decoder output depends on: conv_in (k3, k3), the ConvNeXt blocks'
        dilated depthwise convs, conv_out (k1), out_conv (k3)."""
        return 1 + 1 + self.dec_layers * (self.dec_kernel // 2) * self.dec_dilation + 1

    @property
    def vocos_reach(self) -> int:
        """Mel frames each side for one Vocos frame: the embedding conv and the blocks' depthwise convs."""
        return (self.voc_kernel // 2) * (1 + self.voc_layers)

    @property
    def exact_lookahead(self) -> int:
        """GPT frames after a sample's own frame that decide it: a sample in mel frame m needs ISTFT frames up to
        m + n_fft / (2 hop), each needing the stack's reach of mel frames beyond it (52 for ChatTTS)."""
        return (1 + self.n_fft // (2 * self.hop) + self.decoder_reach + self.vocos_reach) // self.mel_per_frame

    def samples(self, frames: int) -> int:
        """Length of the audio of `frames` GPT frames (torch.istft, center=True)."""
        return max(0, self.samples_per_frame * frames - self.hop)
