"""The quantization error report: every block of a quantized export against its fp32 counterpart on the
same random inputs (max abs, relative L2, cosine), then the chain teacher-forced on the fp32 greedy tokens
(greedy agreement and mean KL of the code distributions), the block that loses most, JSON and a PNG."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import QuantizeError
from ..format import AUDIO_BLOCKS, iter_all_graphs, iter_graphs, open_export
from .report import Report


@dataclass
class CompareReport(Report):
    # blocks: dicts of block, precision, output, max_abs, rel_l2, cosine
    against: Path = None
    plot: Path = None
    goal_agreement: float = 0.95      # None: reported, not enforced (plans with int4 blocks)

    @property
    def worst_block(self) -> str:
        cand = [b for b in self.blocks if b["block"] not in ("sample",) and b["output"] in ("hidden", "hidden_out", "logits")]
        return max(cand, key=lambda b: b["rel_l2"])["block"] if cand else ""

    @property
    def failed(self) -> list:
        bad = []
        if self.goal_agreement is not None and self.chain.get("agreement", 0) < self.goal_agreement:
            bad.append("chain agreement")
        bad += sorted({b["block"] for b in self.blocks if not np.isfinite(b["rel_l2"])})
        return bad

    @property
    def ok(self) -> bool:
        return not self.failed

    def table(self) -> str:
        lines = [f"{'block':<10} {'prec':<12} {'output':<14} {'max abs':>10} {'rel L2':>10} {'cosine':>10}"]
        for b in self.blocks:
            lines.append(f"{b['block']:<10} {b['precision']:<12} {b['output']:<14} {b['max_abs']:10.3e} "
                         f"{b['rel_l2']:10.3e} {b['cosine']:10.6f}")
        c = self.chain
        lines.append(f"chain ({c['steps']} steps, teacher-forced on the fp32 greedy tokens): greedy agreement "
                     f"{100 * c['agreement']:.2f}% "
                     f"({'goal >= %.0f%%' % (100 * self.goal_agreement) if self.goal_agreement else 'no goal for int4'}), "
                     f"mean KL(fp32 || this) {c['mean_kl']:.3e}")
        lines.append(f"block that loses most: {self.worst_block}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "against": str(self.against), "ok": self.ok, "failed": self.failed,
                "blocks": self.blocks, "chain": self.chain, "worst_block": self.worst_block,
                "seconds": self.seconds, "plot": str(self.plot) if self.plot else None}


def _block_feeds(manifest: dict, cfg, name: str, seed: int):
    """Named inputs for one block (numpy), the same for both folders."""
    from ..export.blocks import example_inputs

    if name.startswith("layer_") and manifest.get("layer_form") == "fused":
        from ..export.fused import run_fused_group_reference_inputs
        from ..format import manifest_layer_groups

        n = len(manifest_layer_groups(manifest)[int(name[6:])])
        feed, _ = run_fused_group_reference_inputs(cfg, n, manifest.get("layers_per_graph", 1), B=1, S=1, P=8, M=16,
                                                   seed=seed)
        return feed
    block = "layer" if name.startswith("layer_") else name
    args = example_inputs(cfg, block, seed=seed)
    entry = dict(iter_graphs(manifest))[name]
    return {i["name"]: a.numpy() for i, a in zip(entry["inputs"], args)}


def _audio_feeds(manifest: dict, against: Path, name: str, seed: int):
    """Inputs for an audio block: random hidden states (the step: from silence), a random mel, and for the flush
    the state the fp32 step graph leaves after 60 random frames."""
    import onnxruntime as ort

    a = manifest["audio"]
    rng = np.random.default_rng(seed)
    E = manifest["config"]["hidden_size"]
    hidden = rng.standard_normal((1, 60, E)).astype(np.float32)
    state = np.zeros((1, a["state_size"]), np.float32)
    if name == "decoder":
        return {"hidden": hidden}
    if name == "vocos":
        return {"mel": rng.standard_normal((1, a["config"]["n_mels"], 120)).astype(np.float32)}
    if name == "audio_step":
        return {"hidden": hidden, "state": state, "frames_done": np.array([0], np.int64)}
    step = ort.InferenceSession(str(against / a["graphs"]["audio_step"]["file"]), providers=["CPUExecutionProvider"])
    _, state, _ = step.run(None, {"hidden": hidden, "state": state, "frames_done": np.array([0], np.int64)})
    return {"state": state, "frames_done": np.array([60], np.int64)}


def compare_exports(folder, against, steps: int = 200, progress: bool = False, seed: int = 0) -> CompareReport:
    import onnxruntime as ort

    from ..config import GPTConfig

    t0 = time.perf_counter()
    folder, against = Path(folder), Path(against)
    mq, mf = open_export(folder), open_export(against)  # verify refuses what Runtime.load refuses
    if (mq["config"] != mf["config"] or mq.get("layer_form") != mf.get("layer_form")
            or mq.get("layers_per_graph", 1) != mf.get("layers_per_graph", 1)):
        raise QuantizeError(f"{folder} and {against} are not exports of the same model, layer form and layers per "
                            "graph")
    cfg = GPTConfig.from_dict(mq["config"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    blocks = []
    if bool(mq.get("audio")) != bool(mf.get("audio")):
        raise QuantizeError(f"{folder} and {against}: one has the audio graphs, the other not")
    entries_q, entries_f = dict(iter_all_graphs(mq)), dict(iter_all_graphs(mf))
    for i, (name, eq) in enumerate(entries_q.items()):
        if name in AUDIO_BLOCKS:
            feed = _audio_feeds(mf, against, name, seed + i)
        else:
            feed = _block_feeds(mq, cfg, name, seed + i)
        sq = ort.InferenceSession(str(folder / eq["file"]), so, providers=["CPUExecutionProvider"])
        sf = ort.InferenceSession(str(against / entries_f[name]["file"]), so, providers=["CPUExecutionProvider"])
        if progress:
            print(f"compare {name} ({eq.get('precision', 'fp32')})", file=sys.stderr, flush=True)
        got = sq.run(None, {k: v.copy() for k, v in feed.items()})
        want = sf.run(None, {k: v.copy() for k, v in feed.items()})
        for out, g, w in zip(sq.get_outputs(), got, want):
            g64, w64 = g.astype(np.float64).ravel(), w.astype(np.float64).ravel()
            fin = np.isfinite(w64) & np.isfinite(g64)
            g64, w64 = g64[fin], w64[fin]
            nw = np.linalg.norm(w64)
            blocks.append({
                "block": name, "precision": eq.get("precision", "fp32"), "output": out.name,
                "max_abs": float(np.abs(g64 - w64).max()) if g64.size else 0.0,
                "rel_l2": float(np.linalg.norm(g64 - w64) / nw) if nw > 0 else 0.0,
                "cosine": float(g64 @ w64 / (np.linalg.norm(g64) * nw)) if nw > 0 and np.linalg.norm(g64) > 0 else 1.0,
            })
    if progress:
        print(f"compare chain: {steps} teacher-forced steps", file=sys.stderr, flush=True)
    chain = _chain_agreement(folder, against, cfg, steps, seed)
    has_int4 = any(e.get("precision") == "int4" for e in entries_q.values())
    rep = CompareReport(folder, blocks, chain, against=against, goal_agreement=None if has_int4 else 0.95)
    rep.seconds = time.perf_counter() - t0
    rep.plot = _plot(rep, folder / "quant_report.png")
    return rep


def _chain_agreement(folder: Path, against: Path, cfg, steps: int, seed: int) -> dict:
    """Greedy tokens of the fp32 chain, fed to both chains (teacher forcing); per step and codebook: does the
    argmax of the logits agree, and KL(softmax fp32 || softmax this)."""
    from .ortloop import OrtLoop

    rng = np.random.default_rng(seed)
    prompt = [[21131, 21144, 21173] + rng.integers(1000, 20000, 12).tolist() + [21132]]
    ref = OrtLoop(against, threads=2).generate(prompt, greedy=True, max_new_token=steps, min_new_token=steps,
                                               record_logits=True)
    forced = np.array([f for f in ref.frames[0]], np.int64)
    got = OrtLoop(folder, threads=2).generate(prompt, greedy=True, max_new_token=len(forced), min_new_token=len(forced),
                                              record_logits=True, forced=forced)
    a = np.stack(ref.logits[: len(forced)]).astype(np.float64)  # [steps, N, V]
    b = np.stack(got.logits[: len(forced)]).astype(np.float64)
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())

    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    la, lb = logsoftmax(a), logsoftmax(b)
    kl = float((np.exp(la) * (la - lb)).sum(-1).mean())
    return {"steps": int(len(forced)), "agreement": agree, "mean_kl": kl}


def _plot(rep: CompareReport, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is optional
        return None
    rows = [b for b in rep.blocks if b["output"] in ("hidden", "hidden_out", "logits", "mel", "audio")]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 3.5))
    ax.bar(range(len(rows)), [max(b["rel_l2"], 1e-12) for b in rows],
           color=["C3" if b["block"] == rep.worst_block else "C0" for b in rows])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([b["block"].replace("layer_", "L") for b in rows], rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("relative L2 error vs fp32")
    ax.set_title(f"{rep.folder.name}: greedy agreement {100 * rep.chain['agreement']:.1f}%, "
                 f"mean KL {rep.chain['mean_kl']:.2e}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


