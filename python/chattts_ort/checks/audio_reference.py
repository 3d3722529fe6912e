"""ChatTTS 0.2.5's own audio modules as the reference for the exported audio graphs.

The Decoder is ChatTTS's `DVAE(decoder_config, dim=idim)` (ChatTTS/model/dvae.py) and the vocoder vocos 0.1.0's
`VocosBackbone` + `ISTFTHead` (what `Vocos.decode` runs), each loaded from the asset folder's files as ChatTTS
loads them. Both packages are optional (`pip install --no-deps chattts==0.2.5 vocos==0.1.0`, plus
vector-quantize-pytorch and scipy that their modules import): their package __init__ files import the whole
audio stack, and torchaudio has no build for the torch used here. So only the model modules are loaded, and
where torchaudio is missing an empty placeholder stands in for it: the modules we load name torchaudio only
in code they never run here (the encoder's mel spectrogram, an MDCT head).

`load_reference(folder)` returns None with the reason when the packages are not there.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple


@dataclass
class AudioReference:
    decoder: Callable  # hidden [B, 2*idim, T] (ChatTTS's layout) -> mel [B, n_mels, 2T]
    vocos: Callable    # mel [B, n_mels, M] -> samples [B, hop * (M - 1)]
    source: str


def _placeholder(name: str) -> None:
    """An importable, empty `name` package (and its dotted parents) where the real one is missing."""
    top = sys.modules.get(name.split(".")[0])
    if top is None and importlib.util.find_spec(name.split(".")[0]) is not None:
        return  # the real package is installed
    if top is not None and not getattr(top, "__chattts_ort_placeholder__", False):
        return
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules:
            m = types.ModuleType(sub)
            m.__path__ = []
            m.__spec__ = importlib.machinery.ModuleSpec(sub, None, is_package=True)
            m.__chattts_ort_placeholder__ = True
            sys.modules[sub] = m
            if i > 1:
                setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], m)


def _bare_package(name: str) -> None:
    """Make package `name` importable without running its __init__ (its submodules import normally)."""
    if name in sys.modules:
        return
    parent, _, child = name.rpartition(".")
    if parent:
        locations = [str(Path(sys.modules[parent].__path__[0]) / child)]
    else:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"the {name} package is not installed")
        locations = list(spec.submodule_search_locations)
    m = types.ModuleType(name)
    m.__path__ = locations
    m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    m.__spec__.submodule_search_locations = locations
    sys.modules[name] = m


def _modules():
    _placeholder("torchaudio.transforms")
    _placeholder("torchaudio.functional.functional")
    tf = sys.modules.get("torchaudio.functional.functional")
    if tf is not None and getattr(tf, "__chattts_ort_placeholder__", False):
        def unavailable(*a, **k):
            raise RuntimeError("torchaudio is not installed")
        tf._hz_to_mel = tf._mel_to_hz = unavailable
    for name in ("ChatTTS", "ChatTTS.model", "vocos"):
        _bare_package(name)
    from ChatTTS.model.dvae import DVAE
    from vocos.heads import ISTFTHead
    from vocos.models import VocosBackbone
    return DVAE, VocosBackbone, ISTFTHead


def load_reference(folder, gpt_hidden: int) -> Tuple[Optional[AudioReference], str]:
    """(reference, "") or (None, why it is unavailable)."""
    import torch
    from safetensors.torch import load_file

    from ..export.audio import DECODER_FILE, VOCOS_FILE, audio_config_of

    try:
        DVAE, VocosBackbone, ISTFTHead = _modules()
    except Exception as e:  # missing packages, or their own imports
        return None, f"ChatTTS's and vocos's modules do not import here: {e!r}"
    folder = Path(folder)
    c = audio_config_of(folder, gpt_hidden)
    dcfg = dict(idim=c.dec_idim, odim=c.dec_idim, hidden=c.dec_hidden, n_layer=c.dec_layers, bn_dim=c.dec_bn,
                kernel=c.dec_kernel, dilation=c.dec_dilation)
    dec = DVAE(decoder_config=dcfg, dim=c.dec_idim)
    dec.load_state_dict(load_file(str(folder / DECODER_FILE)))
    dec.eval()
    vsd = load_file(str(folder / VOCOS_FILE))
    backbone = VocosBackbone(input_channels=c.n_mels, dim=c.voc_dim, intermediate_dim=c.voc_intermediate,
                             num_layers=c.voc_layers)
    head = ISTFTHead(dim=c.voc_dim, n_fft=c.n_fft, hop_length=c.hop, padding="center")
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in vsd.items() if k.startswith("backbone.")})
    head.load_state_dict({k[len("head."):]: v for k, v in vsd.items() if k.startswith("head.")})
    backbone.eval()
    head.eval()

    def decoder(hidden):
        with torch.inference_mode():
            return dec(hidden.clone(), "decode").clone()

    def vocos(mel):
        with torch.inference_mode():
            return head(backbone(mel)).clone()

    import ChatTTS.model.dvae as d
    import vocos.heads as h
    return AudioReference(decoder, vocos, f"ChatTTS ({Path(d.__file__).parent.parent}) and vocos "
                                          f"({Path(h.__file__).parent})"), ""
