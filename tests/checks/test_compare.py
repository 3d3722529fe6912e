"""The quantization error report: per-block error against fp32, chain agreement and KL, the CLI."""
import json

import numpy as np
import pytest

from chattts_ort.checks.compare import compare_exports
from chattts_ort.export.quantize import quantize_export


@pytest.fixture(scope="module")
def fp32(tiny_export):
    return tiny_export


def test_report_numbers_are_measured(fp32, tmp_path):
    reports = {}
    for plan in ("int8", "int4"):
        quantize_export(fp32, tmp_path / plan, plan=plan, progress=False)
        reports[plan] = compare_exports(tmp_path / plan, fp32, steps=40)
    same = compare_exports(fp32, fp32, steps=40)
    assert same.chain["agreement"] == 1.0 and same.chain["mean_kl"] == pytest.approx(0, abs=1e-12)
    assert all(b["rel_l2"] == 0 for b in same.blocks)
    def err(rep):
        return max(b["rel_l2"] for b in rep.blocks if b["block"].startswith("layer_") and b["output"] == "hidden_out")
    assert 0 < err(reports["int8"]) < err(reports["int4"]) < 0.2
    layer_errs = [b["rel_l2"] for b in reports["int4"].blocks if b["block"].startswith("layer_")]
    assert len(set(layer_errs)) > 1  # computed per block, not a constant
    for rep in reports.values():
        assert 0 <= rep.chain["agreement"] <= 1 and np.isfinite(rep.chain["mean_kl"]) and rep.chain["mean_kl"] > 0
        assert rep.worst_block in {b["block"] for b in rep.blocks if b["precision"] != "fp32"}
        assert "block that loses most" in rep.table()
    assert reports["int8"].chain["agreement"] >= 0.95 and reports["int8"].ok
    if reports["int8"].plot is not None:
        assert reports["int8"].plot.stat().st_size > 1000


def test_cli_verify_against(fp32, tmp_path):
    from chattts_ort.cli import main

    quantize_export(fp32, tmp_path / "q", plan="int8", progress=False)
    assert main(["verify", str(tmp_path / "q"), "--against", str(fp32), "--quiet"]) == 0
    saved = json.loads((tmp_path / "q" / "verify.json").read_text())
    assert saved["worst_block"] and saved["chain"]["steps"] == 200  # the report's default: 200 steps
    assert main(["verify", str(tmp_path / "q"), "--against", str(fp32), "--steps", "20", "--quiet"]) == 0
    assert json.loads((tmp_path / "q" / "verify.json").read_text())["chain"]["steps"] == 20

