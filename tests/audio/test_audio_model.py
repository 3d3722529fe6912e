"""The audio path in PyTorch (export/audio.py): the streaming form equals the whole-utterance form, the ISTFT as
MatMul + overlap-add equals torch.istft, and the Decoder and Vocos equal ChatTTS 0.2.5's and vocos 0.1.0's own
modules on the same random weights (skipped with the reason when those packages are not installed)."""
import numpy as np
import pytest
import torch

from chattts_ort.config import AudioConfig
from chattts_ort.errors import AssetError
from chattts_ort.export.audio import (DECODER_FILE, VOCOS_FILE, DecoderNet, StreamingAudio, VocosNet, audio_config_of,
                                      load_audio, stream_decode, write_random_audio)


@pytest.fixture(scope="module", params=["tiny", "full"])
def audio(request, tmp_path_factory):
    c = AudioConfig.tiny() if request.param == "tiny" else AudioConfig.full()
    folder = tmp_path_factory.mktemp(f"audio-{request.param}")
    write_random_audio(folder, c, seed=5)
    dec, voc, got = load_audio(folder, 2 * c.dec_idim)
    assert got == c  # the shapes are read back off the files
    return folder, dec, voc, c


def test_lookahead_facts():
    c = AudioConfig.full()
    assert (c.decoder_reach, c.vocos_reach, c.exact_lookahead, c.samples_per_frame) == (75, 27, 52, 512)
    assert c.samples(10) == 512 * 10 - 256 and c.samples(0) == 0


def test_vocos_istft_equals_torch_istft(audio):
    _, dec, voc, c = audio
    mel = dec(torch.randn(1, 30, 2 * c.dec_idim, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        got = voc(mel)
        y = voc.head.out(voc.backbone.final_layer_norm(voc.features(mel).transpose(1, 2))).transpose(1, 2)
        mag, p = y.chunk(2, 1)
        spec = torch.clip(torch.exp(mag), max=1e2) * (torch.cos(p) + 1j * torch.sin(p))
        want = torch.istft(spec, c.n_fft, c.hop, c.n_fft, voc.head.istft.window, center=True)
    assert got.shape == want.shape == (1, c.samples(30))
    assert float(want.abs().max()) > 0.05  # speech-like amplitudes, not silence
    assert float((got - want).abs().max()) <= 1e-6


# Every length against every chunking, except 130 frames one at a time (slow at full size; 53 frames one at a
# time and 130 in chunks of 7 and 24 cover it).
CASES = [(T, chunk) for T in (1, 2, 53, 130) for chunk in (1, 7, 24) if (T, chunk) != (130, 1)]


@pytest.mark.parametrize("T,chunk", CASES)
def test_stream_equals_whole(audio, T, chunk):
    _, dec, voc, c = audio
    s = StreamingAudio(dec, voc).eval()
    hidden = torch.randn(1, T, 2 * c.dec_idim, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        whole = voc(dec(hidden))
        streamed = stream_decode(s, hidden, chunk)
    assert streamed.shape == whole.shape
    assert float((streamed - whole).abs().max()) <= 1e-5


def test_matches_chattts_and_vocos_modules(audio):
    from chattts_ort.checks.audio_reference import load_reference

    folder, dec, voc, c = audio
    ref, why = load_reference(folder, 2 * c.dec_idim)
    if ref is None:
        pytest.skip(why)
    hidden = torch.randn(2, 40, 2 * c.dec_idim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mel = dec(hidden)
        want_mel = ref.decoder(hidden.transpose(1, 2).contiguous())  # ChatTTS's [B, 768, T] layout
        wav = voc(want_mel)
        want_wav = ref.vocos(want_mel)
    assert float((mel - want_mel).abs().max()) <= 1e-5
    assert wav.shape == want_wav.shape
    assert float((wav - want_wav).abs().max()) <= 1e-5 * max(1.0, float(want_wav.abs().max()))


def test_asset_errors_name_the_file(tmp_path):
    c = AudioConfig.tiny()
    with pytest.raises(AssetError, match="Decoder.safetensors"):
        audio_config_of(tmp_path, 64)
    write_random_audio(tmp_path, c)
    with pytest.raises(AssetError, match="hidden size 768"):
        audio_config_of(tmp_path, 768)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / VOCOS_FILE))
    del sd["backbone.final_layer_norm.weight"]
    save_file(sd, str(tmp_path / VOCOS_FILE))
    with pytest.raises(AssetError, match="Vocos.safetensors.*missing"):
        load_audio(tmp_path, 64)
    (tmp_path / DECODER_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(AssetError, match="Decoder.safetensors: cannot read"):
        audio_config_of(tmp_path, 64)
