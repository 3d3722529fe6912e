"""bench/run.py --quick on the tiny model: the results have the promised structure and every number in them is
a finite positive measurement that can be recomputed from the raw per-run data stored beside it."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench_module():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _has_genai():
    return importlib.util.find_spec("onnxruntime_genai") is not None


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _numbers(v):
    """Every float inside a (nested) JSON value."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return []
    if isinstance(v, (int, float)):
        return [v]
    if isinstance(v, dict):
        return [x for w in v.values() for x in _numbers(w)]
    return [x for w in v for x in _numbers(w)]


def test_context_windows():
    run = _bench_module()
    # step i of a run after a 30-token prompt attends over 31 + i positions
    steps = [list(range(1, 1501)), list(range(1, 1501))]
    w = run.window(steps, 30, 450, 550)
    assert len(w) == 200 and w[0] == 450 - 30 and w[99] == 549 - 30
    assert run.window(steps, 30, 1450, 1530) is not None
    assert run.window([list(range(100))], 30, 1450, 1530) is None  # not reached: no number


def test_summarize_long_runs():
    run = _bench_module()
    rng = np.random.default_rng(0)

    def fake(steps, plen, slope):
        ctx = plen + 1 + np.arange(steps)
        return {"step_ms": (10 + slope * ctx + rng.random(steps)).tolist(), "prefill_ms": [50.0], "cold_ttff_ms": 80.0,
                "decode_prefill_ms": 50.0, "load_s": 1.0, "rss_peak_mb": 500.0, "rss_after_load_mb": 400.0}

    raw = {"short": [fake(150, 30, 0.0)], "prefill100": [dict(fake(1, 100, 0.0), step_ms=[])],
           "long": [fake(1500, 30, 0.01), fake(1500, 30, 0.01)]}
    s = run.summarize(raw)
    assert 19.5 < s["decode_ms_at_1500"] < 25.5 and 14.5 < s["decode_ms_at_500"] < 16.5
    assert _close(s["ratio_1500_vs_short"], s["decode_ms_at_1500"] / s["decode_ms_at_short"])
    per = [(50.0 + sum(x["step_ms"][:499])) / 500 for x in raw["long"]]
    assert _close(s["ms_per_frame_500_utterance"], float(np.mean(per)))
    assert s["cold_ttff_ms_samples"] == [80.0, 80.0, 80.0] and len(s["load_s_samples"]) == 4


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory, _private_cache):
    out = tmp_path_factory.mktemp("bench")
    systems = ["chattts-ort", "ort-python", "torch-eager"] + (["onnxruntime-genai"] if _has_genai() else [])
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--model", "tiny",
           "--systems", ",".join(systems), "--precisions", "fp32,int8", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, files
    assert "| chattts-ort | fp32 |" in r.stdout  # the table is printed
    return files[0], json.loads(files[0].read_text()), systems


def test_quick_bench_files(quick_report):
    path, rep, systems = quick_report
    assert path.name.endswith("-tiny-quick.json")
    assert path.with_suffix(".md").is_file()
    for suffix in ("-context.png", "-precision.png"):
        png = path.with_name(path.stem + suffix)
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert rep["mode"] == "quick" and rep["model"] == "tiny" and rep["systems"] == systems
    m = rep["machine"]
    assert m["cores"] >= 1 and m["cpu"] and all(isinstance(m[f], bool) for f in ("avx2", "fma", "avx512f"))
    v = rep["versions"]
    assert v["onnxruntime"] and v["chattts-ort"] and v["torch"] and v["transformers"] and m["python"]
    assert rep["date"][:4].isdigit()


def test_quick_bench_every_number_is_measured(quick_report):
    _, rep, systems = quick_report
    got = {(x["system"], x["precision"]) for x in rep["results"]}
    want = {("chattts-ort", "fp32"), ("ort-python", "fp32"), ("torch-eager", "fp32")}
    if _has_genai():
        want |= {("onnxruntime-genai", "fp32"), ("onnxruntime-genai", "int8")}
    skipped = {(u["system"], u["precision"]) for u in rep["unavailable"]}
    assert want <= got, (got, rep["unavailable"])
    # int8 chattts-ort is either measured or listed with its reason, never both, never neither
    assert (("chattts-ort", "int8") in got) != (("chattts-ort", "int8") in skipped)
    assert all(u["reason"] for u in rep["unavailable"]) and not (got & skipped)

    rows = {(x["system"], x["precision"]): x for x in rep["results"]}
    torch_ms = rows[("torch-eager", "fp32")]["decode_ms_median"]
    for key, row in rows.items():
        # no placeholders: every number anywhere in the row is a finite positive float (or a count)
        for x in _numbers({k: v for k, v in row.items()}):
            assert math.isfinite(x) and x > 0, (key, x)
        steps = row["step_ms_per_rep"]
        assert len(steps) == 1 and len(steps[0]) == 39  # quick: one repetition of 40 frames -> 39 intervals
        pooled = np.concatenate([np.asarray(s[: row["short_window_steps"]]) for s in steps])
        assert _close(row["decode_ms_median"], float(np.median(pooled))), key
        assert _close(row["decode_ms_p90"], float(np.percentile(pooled, 90))), key
        assert _close(row["frames_per_s"], 1000 / row["decode_ms_median"])
        assert _close(row["rtf"], row["decode_ms_median"] / (1000 / 46.875))
        for name in ("prefill_30_ms", "prefill_100_ms", "cold_ttff_ms", "load_s", "rss_after_load_mb"):
            samples = row[f"{name}_samples"]
            assert len(samples) >= 1 and _close(row[name], float(np.median(samples))), (key, name)
        assert len(row["prefill_30_ms_samples"]) == 2 and len(row["prefill_100_ms_samples"]) == 2
        assert _close(row["rss_peak_mb"], max(row["rss_peak_mb_samples"])) and row["rss_peak_mb"] > 10
        assert _close(row["ratio_vs_torch"], row["decode_ms_median"] / torch_ms)
        genai = rows.get(("onnxruntime-genai", key[1]))
        if genai:
            assert _close(row["ratio_vs_genai"], row["decode_ms_median"] / genai["decode_ms_median"])
        # quick mode has no long runs: no long-context numbers at all
        assert not any(k.startswith("decode_ms_at_") for k in row) and "long_step_ms_per_rep" not in row

    goals = {g["goal"]: g for g in rep["goals"]}
    g = goals["fp32: >= 1.5x faster per step than PyTorch eager (ratio <= 0.667)"]
    assert _close(g["value"], round(rows[("chattts-ort", "fp32")]["ratio_vs_torch"], 3))
    assert g["met"] == (rows[("chattts-ort", "fp32")]["ratio_vs_torch"] <= 1 / 1.5)
    for g in rep["goals"]:
        assert (g["met"] is None) == (g["value"] is None)
        assert g["met"] is not None or g["not_measured"]


@pytest.mark.skipif(not _has_genai(), reason="onnxruntime-genai is not installed (extra: bench)")
def test_gap_bench_measures_every_part(tmp_path, _private_cache):
    """bench/gap.py on the tiny model: the four decodes are measured, the table's ratios are computed from them."""
    cmd = [sys.executable, str(REPO / "bench" / "gap.py"), "--model", "tiny", "--precision", "fp32", "--reps", "1",
           "--steps", "20", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (path,) = tmp_path.glob("*-gap-tiny-fp32.json")
    rep = json.loads(path.read_text())
    med = rep["median_ms"]
    assert set(med) == {"genai", "genai graph", "layers", "chattts-ort"}
    for name, runs in rep["runs"].items():
        assert len(runs) == 1 and _close(med[name], runs[0]["median"]) and 0 < runs[0]["median"] < 1000, name
    prof = rep["runs"]["chattts-ort"][0]["profile"]
    assert prof["steps"] >= 19 and _close(rep["chattts_ort_layers_ms"], prof["layers"])
    md = path.with_suffix(".md").read_text()
    assert f"| chattts-ort (Runtime.stream) | {med['chattts-ort']:.2f} | {med['chattts-ort'] / med['genai']:.2f} |" in md


def _can_limit_memory():
    sys.path.insert(0, str(REPO / "bench"))
    import low_memory

    return low_memory._cgroup_root()[0] is not None


@pytest.mark.skipif(not _can_limit_memory(), reason="needs root and a memory cgroup hierarchy")
def test_low_memory_bench_enforces_the_limit(tmp_path, _private_cache):
    """bench/low_memory.py on the tiny model: without a limit the decode completes and its cgroup's peak is
    recorded; with a limit of half that peak, the peak stays under the limit and the limit is hit (pages reclaimed
    or the process killed), so the limit is really applied to the measured process."""
    import low_memory

    def run(limit, out):
        cmd = [sys.executable, str(REPO / "bench" / "low_memory.py"), "--model", "tiny", "--precisions", "fp32",
               "--forms", "plain", "--limits-mb", str(limit), "--steps", "20", "--timeout", "120", "--out", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        (path,) = out.glob("*-low-memory-tiny.json")
        (row,) = json.loads(path.read_text())["rows"]
        return row

    free = run(0, tmp_path / "free")
    assert free["status"] == "ok" and 0 < free["median"] < 1000 and free["limit_hits"] == 0 and free["peak_mb"] > 8
    limit = int(free["peak_mb"] // 2)
    tight = run(limit, tmp_path / "tight")
    assert tight["peak_mb"] <= limit + 0.5 and tight["limit_hits"] > 0, (free, tight)
    assert tight["status"] in ("ok", "killed (out of memory)"), tight
    assert not list(low_memory._cgroup_root()[1].glob("chattts-low-memory-*"))  # the groups are removed
