"""Generation parameters, mirroring ChatTTS 0.2.5's RefineTextParams / InferCodeParams (names and defaults),
plus the runtime's own extras (`greedy`, `return_hidden`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union


@dataclass
class RefineTextParams:
    prompt: str = ""
    top_P: float = 0.7
    top_K: int = 20
    temperature: float = 0.7
    repetition_penalty: float = 1.0
    max_new_token: int = 384
    min_new_token: int = 0
    manual_seed: Optional[int] = None
    # chattts-ort extras
    greedy: bool = False          # argmax of the processed distribution (noise of ones); for tests
    return_hidden: bool = False

    def validate(self, num_vq: int = 4) -> None:
        temps = self.temperature if isinstance(self.temperature, (list, tuple)) else [self.temperature]
        if isinstance(self.temperature, (list, tuple)) and len(temps) != num_vq:
            raise ValueError(f"temperature list must have {num_vq} values (one per codebook), got {len(temps)}")
        for t in temps:
            if not isinstance(t, (int, float)) or not t > 0 or t != t or t == float("inf"):
                raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        if not isinstance(self.top_P, (int, float)) or not (0 < self.top_P <= 1):
            raise ValueError(f"top_P must be in (0, 1], got {self.top_P!r}")
        if not isinstance(self.top_K, int) or self.top_K < 1:
            raise ValueError(f"top_K must be an integer >= 1, got {self.top_K!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0 \
                or self.repetition_penalty == float("inf"):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.max_new_token, int) or self.max_new_token < 1:
            raise ValueError(f"max_new_token must be an integer >= 1, got {self.max_new_token!r}")
        if not isinstance(self.min_new_token, int) or self.min_new_token < 0:
            raise ValueError(f"min_new_token must be an integer >= 0, got {self.min_new_token!r}")
        if self.manual_seed is not None and (not isinstance(self.manual_seed, int) or self.manual_seed < 0):
            raise ValueError(f"manual_seed must be None or an integer >= 0, got {self.manual_seed!r}")


@dataclass
class InferCodeParams(RefineTextParams):
    prompt: str = "[speed_5]"
    spk_emb: Optional[str] = None
    txt_smp: Optional[str] = None
    temperature: Union[float, List[float]] = 0.3
    repetition_penalty: float = 1.05
    max_new_token: int = 2048


_TAGS = ("[Stts]", "[spk_emb]", "[empty_spk]")


def build_prompt_code(text: str, has_speaker: bool, txt_smp: Optional[str], prompt: str) -> str:
    """ChatTTS's code prompt: "[Stts][spk_emb]{txt_smp}{prompt}{text}[Ptts]" ([empty_spk] without a speaker);
    the tags ChatTTS strips from the text are stripped here too, then the text is stripped of spaces."""
    for tag in _TAGS:
        text = text.replace(tag, "")
    text = text.strip()
    if prompt:
        text = prompt + text
    spk = "[spk_emb]" if has_speaker else "[empty_spk]"
    return f"[Stts]{spk}{txt_smp or ''}{text}[Ptts]"


def build_prompt_refine(text: str, prompt: str) -> str:
    """ChatTTS's refine-text prompt: "[Sbreak]{text}[Pbreak]{prompt}"."""
    return f"[Sbreak]{text}[Pbreak]{prompt}"
