"""The demo's default precision: the fastest whose quantization report passes, chosen once and cached."""
import json


def test_demo_picks_the_fastest_precision_that_passes(_private_cache, capsys):
    from chattts_ort.prepare import DEMO_AGREEMENT, demo_model

    folder, why = demo_model("tiny", progress=False)
    assert why.startswith("precision ")
    prec = why.split()[1].rstrip(":")
    if prec == "fp32":
        assert "no quantized precision passes" in why
    else:
        report = json.loads((folder / "verify.json").read_text())
        assert report["chain"]["steps"] == 200 and report["chain"]["agreement"] >= DEMO_AGREEMENT
        assert folder.name.endswith(prec)
        if prec == "int8":  # int4 was tried first and did not pass
            int4 = json.loads((folder.parent / folder.name.replace("int8", "int4") / "verify.json").read_text())
            assert int4["chain"]["agreement"] < DEMO_AGREEMENT and "int4" in why
    mtime = (folder / "verify.json").stat().st_mtime_ns if prec != "fp32" else None
    again, why2 = demo_model("tiny", progress=False)
    assert (again, why2) == (folder, why)
    if mtime is not None:
        assert (folder / "verify.json").stat().st_mtime_ns == mtime  # the report is not made twice
