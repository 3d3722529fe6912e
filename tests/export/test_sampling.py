"""The sample head against ChatTTS's actual processing (transformers' warpers + ChatTTS's penalty)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chattts_ort.checks.reference import repetition_penalty
from chattts_ort.export.sampling import SampleHead, exponential_noise


def _chattts_way(logits, temp, pen, window, top_p, top_k, eos, block, q):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    s = logits / temp.unsqueeze(1)
    if pen != 1:
        s = repetition_penalty(s, window, pen)
    for w in (TopPLogitsWarper(top_p, min_tokens_to_keep=3), TopKLogitsWarper(top_k, min_tokens_to_keep=3)):
        s = w(None, s)
    if block:
        s[:, eos] = -torch.inf
    return torch.argmax(F.softmax(s, -1) / q, 1)


def test_multinomial_is_argmax_over_exponential_noise():
    for seed in range(10):
        p = torch.softmax(torch.randn(8, 626) * 3, -1)
        a = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
        q = exponential_noise(p.shape, torch.Generator().manual_seed(seed))
        assert torch.equal(a, torch.argmax(p / q, 1))


@pytest.mark.parametrize("trial", range(40))
def test_sample_head_matches_chattts(trial):
    g = torch.Generator().manual_seed(trial)
    V = 626 if trial % 5 else 21178
    N = 8 if V == 626 else 2
    logits = torch.randn(N, V, generator=g) * 3
    if trial % 7 == 0:
        logits[:, 10:14] = logits[:, 3:4]  # ties
    temp = torch.rand(N, generator=g) + 0.2
    pen = [1.05, 1.0, 1.5][trial % 3]
    n_hist = trial % 17
    hist = torch.full((N, 16), -1, dtype=torch.int64)
    hist[:, :n_hist] = torch.randint(0, 12, (N, n_hist), generator=g)
    top_p, top_k = [0.7, 1.0, 0.05, 0.9][trial % 4], [20, 1, 3, 600, 40][trial % 5]
    eos, block = V - 1, trial % 2 == 0
    q = exponential_noise((N, V), g) if trial % 6 else torch.ones(N, V)
    got = SampleHead()(logits, temp, torch.tensor(pen), hist, torch.tensor(top_p), torch.tensor(top_k),
                       torch.tensor(eos), torch.tensor(block), q)
    want = _chattts_way(logits, temp, pen, hist[:, :n_hist], top_p, top_k, eos, block, q)
    assert torch.equal(got, want)


def test_eos_gate_blocks_eos():
    logits = torch.zeros(4, 626)
    logits[:, 625] = 50.0
    args = (torch.full((4,), 0.3), torch.tensor(1.0), torch.full((4, 16), -1), torch.tensor(0.7),
            torch.tensor(20), torch.tensor(625))
    head = SampleHead()
    assert (head(logits, *args, torch.tensor(False), torch.ones(4, 626)) == 625).all()
    assert (head(logits, *args, torch.tensor(True), torch.ones(4, 626)) != 625).all()




def test_per_row_values_match_chattts_row_by_row():
    """One call with different penalty / top_p / top_k / EOS gate per row equals ChatTTS's processing of each
    row alone (what lets streams with their own parameters share a step)."""
    g = torch.Generator().manual_seed(7)
    N, V = 8, 626
    logits = torch.randn(N, V, generator=g) * 3
    temp = 0.2 + torch.rand(N, generator=g)
    pen = 1.0 + 0.2 * torch.rand(N, generator=g)
    top_p = 0.3 + 0.7 * torch.rand(N, generator=g)
    top_k = torch.randint(1, 50, (N,), generator=g)
    block = torch.arange(N) % 3 == 0
    hist = torch.randint(0, V, (N, 16), generator=g)
    q = torch.empty(N, V).exponential_(generator=g)
    got = SampleHead()(logits, temp, pen, hist, top_p, top_k, torch.tensor(V - 1), block, q)
    for n in range(N):
        want = _chattts_way(logits[n:n + 1], temp[n:n + 1], float(pen[n]), hist[n:n + 1], float(top_p[n]),
                            int(top_k[n]), V - 1, bool(block[n]), q[n:n + 1])
        assert int(got[n]) == int(want[0]), n
