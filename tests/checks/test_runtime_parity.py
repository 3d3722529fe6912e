"""The C++ runtime against the PyTorch reference loop (transformers LlamaModel + ChatTTS's sampling), token for
token under shared noise."""
import numpy as np
import pytest
import torch

from chattts_ort import InferCodeParams, RefineTextParams, Runtime
from chattts_ort.checks.reference import generate_reference

TEXTS = ["hello world, this is chat tts speaking from onnx", "fast audio"]


@pytest.fixture(scope="module")
def rt(tiny_export):
    return Runtime.load(tiny_export, threads=1, max_context=512, max_batch=2)


def _noise(steps, N, V, seed):
    g = torch.Generator().manual_seed(seed)
    return np.stack([torch.empty(N, V).exponential_(generator=g).numpy() for _ in range(steps)])


def _reference(tiny_model, rt, texts, params, speaker, noise, mode="code", greedy=False):
    gpt, cfg, _ = tiny_model
    from chattts_ort.params import build_prompt_code, build_prompt_refine

    if mode == "code":
        prompts = [rt.tokenize(build_prompt_code(t, speaker is not None, params.txt_smp, params.prompt)) for t in texts]
    else:
        prompts = [rt.tokenize(build_prompt_refine(t, params.prompt)) for t in texts]
    fn = None if noise is None else (lambda step, N, V: torch.from_numpy(noise[step]))
    return generate_reference(gpt, cfg, prompts, mode=mode, params=params, speaker=speaker, noise=fn, greedy=greedy)


@pytest.mark.parametrize("seed,min_new", [(0, 200), (21, 0), (25, 0)])  # seeds 21 and 25 end a row by EOS
def test_token_identity_with_reference(rt, tiny_model, seed, min_new):
    steps = 200
    speaker = np.random.default_rng(seed).standard_normal((2, 64)).astype(np.float16).astype(np.float32)
    params = InferCodeParams(max_new_token=steps, min_new_token=min_new, return_hidden=True)
    noise = _noise(steps, 8, 626, seed)
    gen = rt.generate(TEXTS, params=params, speaker=speaker, noise=noise)
    ref = _reference(tiny_model, rt, TEXTS, params, speaker, noise)
    for b in range(2):
        got = [tuple(x) for x in gen.codes[b].tolist()]
        assert got == ref.frames[b], f"row {b} differs"
        np.testing.assert_allclose(gen.hidden[b], np.array(ref.hidden[b]).reshape(-1, 64), atol=2e-4)
    lengths = [len(f) for f in ref.frames]
    print(f"seed {seed}: frames per row {lengths}, EOS steps {ref.end_step}")
    if min_new == steps:
        assert lengths == [steps, steps]
    else:
        # The EOS frame is dropped, on the same step, in both.
        assert any(e is not None for e in ref.end_step)
        for b in range(2):
            if ref.end_step[b] is not None:
                assert len(gen.codes[b]) == ref.end_step[b]


def test_greedy_identity(rt, tiny_model):
    params = InferCodeParams(max_new_token=60, min_new_token=60, greedy=True)
    gen = rt.generate(TEXTS, params=params)
    ref = _reference(tiny_model, rt, TEXTS, params, None, None, greedy=True)
    for b in range(2):
        assert [tuple(x) for x in gen.codes[b].tolist()] == ref.frames[b]


def test_refine_text_identity(rt, tiny_model):
    params = RefineTextParams(max_new_token=40, manual_seed=0)
    noise = _noise(40, 1, 21178, 3)
    text = rt.refine_text("hello world", params=params, noise=noise)
    ref = _reference(tiny_model, rt, ["hello world"], params, None, noise, mode="text")
    assert rt.last_refine_ids[0] == [f[0] for f in ref.frames[0]]
    assert isinstance(text, str)

