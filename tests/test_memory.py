"""chattts-ort memory: resident bytes of loading an export, in a fresh process."""
import numpy as np
import pytest

from chattts_ort.format import iter_graphs, read_manifest as load_manifest
from chattts_ort.memory import load_rss


@pytest.fixture(scope="module")
def fp32(tiny_export):
    return tiny_export


def test_load_rss(fp32):
    weights = sum((fp32 / e["file"]).stat().st_size for _, e in iter_graphs(load_manifest(fp32)))
    for via, off in (("runtime", False), ("ort", True)):
        rep = load_rss(fp32, via=via, disable_prepacking=off)
        assert rep.weight_bytes == weights and rep.prepacking is not off
        assert 0 < rep.rss_before <= rep.peak_rss and rep.rss_after <= rep.peak_rss
        assert np.isfinite(rep.ratio) and "MB" in rep.summary() and rep.to_json()["via"] == via
    with pytest.raises(ValueError, match="via"):
        load_rss(fp32, via="torch")


def test_cli_memory(fp32, tmp_path, capsys):
    from chattts_ort.cli import main

    assert main(["memory", str(fp32), "--via", "ort", "--no-prepacking"]) == 0
    out = capsys.readouterr().out
    assert f"{fp32.name} via ort, prepacking off: weights" in out and "x)" in out
    assert main(["memory", str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().err

