"""Generation parameters, mirroring ChatTTS 0.2.5's RefineTextParams / InferCodeParams (names and defaults),
plus the runtime's own extras (`greedy`, `return_hidden`)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np


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
    queue_timeout: Optional[float] = None  # seconds to wait for a free stream (Runtime max_streams); None: no limit

    def validate(self, num_vq: int = 4) -> None:
        """Raise ValueError naming the first bad field. Numbers may be Python or numpy scalars; the ranges
        are checked on the float32 values the engine uses, and they keep every step's arithmetic finite
        (see RANGES)."""
        temps = self.temperature if isinstance(self.temperature, (list, tuple)) else [self.temperature]
        if isinstance(self.temperature, (list, tuple)) and len(temps) != num_vq:
            raise ValueError(f"temperature list must have {num_vq} values (one per codebook), got {len(temps)}")
        for t in temps:
            _check_real("temperature", t)
        _check_real("top_P", self.top_P)
        _check_int("top_K", self.top_K)
        _check_real("repetition_penalty", self.repetition_penalty)
        _check_int("max_new_token", self.max_new_token)
        _check_int("min_new_token", self.min_new_token)
        if int(self.min_new_token) > int(self.max_new_token):
            raise ValueError(f"min_new_token ({self.min_new_token}) must not exceed max_new_token "
                             f"({self.max_new_token})")
        if self.manual_seed is not None:
            _check_int("manual_seed", self.manual_seed)
        if self.queue_timeout is not None and (isinstance(self.queue_timeout, bool) or not isinstance(
                self.queue_timeout, numbers.Real) or not 0 <= float(self.queue_timeout) < 1e9):
            raise ValueError(f"queue_timeout must be None or seconds >= 0, got {self.queue_timeout!r}")
        if not isinstance(self.greedy, (bool, np.bool_)):
            raise ValueError(f"greedy must be True or False, got {self.greedy!r}")


# field -> (lowest, highest), inclusive, on the value as the engine holds it (float32 / int64). With
# |logits| < 1e3, temperature >= 1e-4 and penalty^16 within [1e-16, 1e16] keep the sample head finite; the
# engine checks the logits and hidden states themselves every step.
RANGES = {
    "temperature": (1e-4, 1e4),
    "top_P": (1e-6, 1.0),
    "repetition_penalty": (0.1, 10.0),
    "top_K": (1, 2**31 - 1),
    "max_new_token": (1, 2**31 - 1),
    "min_new_token": (0, 2**31 - 1),
    "manual_seed": (0, 2**64 - 1),
}


def _check_real(name: str, v) -> None:
    lo, hi = RANGES[name]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    try:
        with np.errstate(over="ignore"):
            f = float(np.float32(v))
    except OverflowError:  # an int beyond any float
        f = math.inf
    # the bounds as the engine holds them too (float32(1e-4) < 1e-4: the documented minimum must pass)
    if not (math.isfinite(f) and float(np.float32(lo)) <= f <= float(np.float32(hi))):
        raise ValueError(f"{name} must be a finite number in [{lo:g}, {hi:g}] (as float32), got {v!r}")


def check_int(name: str, v, lo: int, hi: int) -> int:
    """v as an int if it is an integer (Python or numpy, not bool) in [lo, hi]; else ValueError naming it."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or not lo <= int(v) <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def _check_int(name: str, v) -> None:
    check_int(name, v, *RANGES[name])


@dataclass
class InferCodeParams(RefineTextParams):
    prompt: str = "[speed_5]"
    spk_emb: Optional[str] = None
    txt_smp: Optional[str] = None
    temperature: Union[float, List[float]] = 0.3
    repetition_penalty: float = 1.05
    max_new_token: int = 2048


_TAGS = ("[Stts]", "[spk_emb]", "[empty_spk]")


def strip_tags(text: str) -> str:
    """The user's text as ChatTTS puts it into the code prompt: its own template tags removed, then stripped."""
    for tag in _TAGS:
        text = text.replace(tag, "")
    return text.strip()


def build_prompt_code(text: str, has_speaker: bool, txt_smp: Optional[str], prompt: str) -> str:
    """ChatTTS's code prompt: "[Stts][spk_emb]{txt_smp}{prompt}{text}[Ptts]" ([empty_spk] without a speaker);
    the tags ChatTTS strips from the text are stripped here too, then the text is stripped of spaces."""
    text = strip_tags(text)
    if prompt:
        text = prompt + text
    spk = "[spk_emb]" if has_speaker else "[empty_spk]"
    return f"[Stts]{spk}{txt_smp or ''}{text}[Ptts]"


def build_prompt_refine(text: str, prompt: str) -> str:
    """ChatTTS's refine-text prompt: "[Sbreak]{text}[Pbreak]{prompt}"."""
    return f"[Sbreak]{text}[Pbreak]{prompt}"
