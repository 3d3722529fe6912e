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


def _trial(trial):
    """Inputs of one random sampling case: (head args, ChatTTS-way args)."""
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
    head_args = (logits, temp, torch.tensor(pen), hist, torch.tensor(top_p), torch.tensor(top_k),
                 torch.tensor(eos), torch.tensor(block), q)
    return head_args, (logits, temp, pen, hist[:, :n_hist], top_p, top_k, eos, block, q)


@pytest.mark.parametrize("trial", range(40))
def test_sample_head_matches_chattts(trial):
    head_args, chattts_args = _trial(trial)
    assert torch.equal(SampleHead()(*head_args), _chattts_way(*chattts_args))


@pytest.fixture(scope="module")
def sample_graph():
    """The exported sample head (written node by node) in an ONNX Runtime session."""
    import onnxruntime as ort

    from chattts_ort.export.sample_graph import build_sample_graph

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(build_sample_graph().SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run_graph(sess, head_args):
    """Run the graph on SampleHead's arguments (scalars broadcast to per-row values, as the runtime binds them)."""
    from chattts_ort.format import SAMPLE_INPUTS

    N = head_args[0].shape[0]
    feed = {}
    for name, a in zip(SAMPLE_INPUTS, head_args):
        a = a.numpy()
        if name in ("penalty", "top_p", "top_k", "block_eos") and a.ndim == 0:
            a = np.full(N, a, a.dtype)
        feed[name] = a
    return sess.run(None, feed)[0]


@pytest.mark.parametrize("trial", range(40))
def test_sample_graph_matches_chattts(sample_graph, trial):
    """The graph that exports carry draws ChatTTS's token for every case above (ties included)."""
    head_args, chattts_args = _trial(trial)
    assert np.array_equal(_run_graph(sample_graph, head_args), _chattts_way(*chattts_args).numpy())


def test_sample_graph_is_the_traced_graph_bit_for_bit(sample_graph, tmp_path):
    """The hand-written graph keeps the computing ops of SampleHead traced by torch.onnx (what exports before
    0.4 carry): on the same inputs, including many exact ties, tiny vocabularies and out-of-range top_k, both
    ONNX Runtime graphs draw the same ids."""
    import warnings

    import onnxruntime as ort

    from chattts_ort.export.blocks import SAMPLE_IO, example_inputs
    from chattts_ort.config import GPTConfig

    names_in, names_out, axes = SAMPLE_IO
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(SampleHead(), example_inputs(GPTConfig.tiny(), "sample"), str(tmp_path / "traced.onnx"),
                          dynamo=False, opset_version=17, input_names=names_in, output_names=names_out,
                          dynamic_axes=axes)
    traced = ort.InferenceSession(str(tmp_path / "traced.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    for trial in range(150):
        N, V = int(rng.integers(1, 9)), int(rng.choice([4, 7, 626, 1000]))
        logits = (rng.standard_normal((N, V)) * rng.choice([0.5, 3.0, 20.0])).astype(np.float32)
        if trial % 3 == 0:
            logits = np.round(logits)  # many exact ties
        feed = {"logits": logits.astype(np.float32),
                "temperature": rng.uniform(0.05, 1.5, N).astype(np.float32),
                "penalty": rng.uniform(0.8, 1.5, N).astype(np.float32),
                "history": rng.integers(-1, V, (N, 16)),
                "top_p": rng.uniform(0.0, 1.0, N).astype(np.float32),
                "top_k": rng.integers(-2, V + 5, N),
                "eos_id": np.array(int(rng.integers(0, V)), np.int64),
                "block_eos": rng.random(N) < 0.5,
                "noise": (rng.exponential(size=(N, V)) if trial % 4 else np.ones((N, V))).astype(np.float32)}
        assert np.array_equal(sample_graph.run(None, feed)[0], traced.run(None, feed)[0]), trial


def test_sample_graph_is_lean():
    from chattts_ort.export.sample_graph import build_sample_graph

    ops = [n.op_type for n in build_sample_graph().graph.node]
    assert len(ops) <= 45 and not {"Shape", "Constant", "ConstantOfShape", "Reshape"} & set(ops[1:]), ops


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
