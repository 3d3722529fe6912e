"""format.py: the manifest schema, safe atomic folder writes, and refusing folders that do not match."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chattts_ort.errors import ExportError
from chattts_ort.format import (MANIFEST, atomic_folder, check_manifest, open_export, read_manifest,
                                remove_leftovers)


def _sentinel_tree(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    (root / "keep.txt").write_text("precious")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "data.bin").write_bytes(b"\x00" * 10)


def _intact(root: Path) -> bool:
    return (root / "keep.txt").read_text() == "precious" and (root / "sub" / "data.bin").is_file()


@pytest.mark.parametrize("target", ["", ".", "..", "CWD", "PARENT", "/", "HOME"])
def test_force_never_touches_cwd_home_root(tmp_path, monkeypatch, target):
    work = tmp_path / "work" / "here"
    _sentinel_tree(work)
    _sentinel_tree(tmp_path / "home")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = {"CWD": str(work), "PARENT": str(work.parent), "HOME": str(tmp_path / "home")}.get(target, target)
    with pytest.raises(ExportError, match="refusing|not a folder name"):
        with atomic_folder(out, force=True):
            pass
    assert _intact(work) and _intact(tmp_path / "home")


def test_cli_export_empty_out_with_force_deletes_nothing(tmp_path, monkeypatch, capsys):
    from chattts_ort.cli import main

    _sentinel_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["export", "random-tiny", "", "--force", "--quiet"]) == 2
    assert "not a folder name" in capsys.readouterr().err
    assert _intact(tmp_path)


def test_force_replaces_only_exports_or_empty_folders(tmp_path):
    other = tmp_path / "photos"
    _sentinel_tree(other)
    with pytest.raises(ExportError, match="not a chattts-ort export"):
        with atomic_folder(other, force=True) as tmp:
            (tmp / "x").write_text("new")
    assert _intact(other)
    # no temporary sibling is left behind by the refusal
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_folder(empty, force=True) as tmp:
        (tmp / "x").write_text("new")
    assert (empty / "x").read_text() == "new"


def test_replacing_an_export_swaps_it(tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"format": "chattts-ort/1"}))
    (out / "old.onnx").write_text("old")
    with pytest.raises(ExportError, match="already exists"):
        with atomic_folder(out):
            pass
    with pytest.raises(ExportError, match="does not name: old.onnx"):  # not a file this manifest names
        with atomic_folder(out, force=True):
            pass
    (out / "old.onnx").rename(out / "verify.json")  # a report chattts-ort writes: replaced with the export
    with atomic_folder(out, force=True) as tmp:
        (tmp / "new.onnx").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]  # the old one renamed aside is gone too


def test_failed_write_leaves_old_folder_and_nothing_else(tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"format": "chattts-ort/1"}))
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(out, force=True) as tmp:
            (tmp / "half.onnx").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]


_WRITER = r"""
import sys, time
from chattts_ort.format import atomic_folder
with atomic_folder(sys.argv[1]) as tmp:
    (tmp / "big.bin").write_bytes(b"\0" * 1000)
    print("writing", flush=True)
    time.sleep(60)
"""


def test_kill_9_leftovers_are_removed_by_the_next_write(tmp_path):
    out = tmp_path / "exp"
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    left = [x.name for x in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".exp.tmp-")
    # a live writer's folder is never touched
    alive = tmp_path / f".exp.tmp-{os.getpid()}-abc"
    alive.mkdir()
    assert remove_leftovers(out) == [tmp_path / left[0]]
    assert alive.is_dir()
    alive.rmdir()
    with atomic_folder(out) as tmp:
        (tmp / "x").write_text("ok")
    assert [x.name for x in tmp_path.iterdir()] == ["exp"]


# ----------------------------------------------------------------------------------------------------------
# The manifest schema names the field.

def _manifest(tiny_export):
    return json.loads((tiny_export / MANIFEST).read_text())


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("graphs"), "missing key 'graphs'"),
    (lambda m: m["config"].pop("hidden_size"), "config.hidden_size is missing"),
    (lambda m: m["config"].update(rope_theta=0), "config.rope_theta"),
    (lambda m: m["config"].update(num_heads=0), "config.num_heads"),
    (lambda m: m["config"].update(num_layers="2"), "config.num_layers"),
    (lambda m: m["config"].update(hidden_size=63), "config.hidden_size"),
    (lambda m: m["graphs"]["layers"].pop(), "graphs.layers lists 1 graphs, but config.num_layers 2 at 1 layers per graph makes 2"),
    (lambda m: m["graphs"]["layers"].append(m["graphs"]["layers"][0]), "graphs.layers lists 3"),
    (lambda m: m["graphs"]["layers"].__setitem__(1, dict(m["graphs"]["layers"][0])), "also the file of layer_00"),
    (lambda m: m["graphs"]["embed"].update(file="/etc/passwd"), "plain file name"),
    (lambda m: m["graphs"]["embed"].update(file="../embed.onnx"), "plain file name"),
    (lambda m: m["graphs"]["sample"].pop("sha256"), r"graphs.sample.sha256 is missing"),
    (lambda m: m["graphs"]["head_code"].update(bytes="12"), r"graphs.head_code.bytes must be of type int"),
    (lambda m: m.update(layer_form="mystery"), "layer_form"),
    (lambda m: m.update(tokenizer="../../tok.json"), "plain file name"),
    (lambda m: m.update(format="chattts-ort/99"), "format"),
])
def test_manifest_schema_errors_name_the_field(tiny_export, edit, match):
    m = _manifest(tiny_export)
    edit(m)
    with pytest.raises(ExportError, match=match):
        check_manifest(m, "manifest.json")


@pytest.mark.parametrize("raw,match", [(b"{not json", "not valid JSON"), (b"\xff\xfe\x00", "UTF-8"),
                                       (b"[1, 2]", "JSON object")])
def test_unreadable_manifests(tmp_path, raw, match):
    (tmp_path / MANIFEST).write_bytes(raw)
    with pytest.raises(ExportError, match=match):
        read_manifest(tmp_path)


def test_open_export_checks_sizes_and_hashes(tiny_export, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_export, bad)
    open_export(bad)
    # swap two layer files: sizes are equal (same shape), hashes are not
    a, b = bad / "layer_00.onnx", bad / "layer_01.onnx"
    a.rename(tmp_path / "t")
    b.rename(a)
    (tmp_path / "t").rename(b)
    with pytest.raises(ExportError, match="sha256"):
        open_export(bad)
    open_export(bad, hashes=False)  # sizes alone cannot see the swap; Runtime.load's block tags do


def test_quantize_and_verify_refuse_a_tampered_export(tiny_export, tmp_path):
    from chattts_ort.export.quantize import quantize_export
    from chattts_ort.checks.verify import verify_export

    bad = tmp_path / "bad"
    shutil.copytree(tiny_export, bad)
    a, b = bad / "layer_00.onnx", bad / "layer_01.onnx"
    a.rename(tmp_path / "t")
    b.rename(a)
    (tmp_path / "t").rename(b)
    with pytest.raises(ExportError, match="sha256"):
        quantize_export(bad, tmp_path / "q", plan="int8", progress=False)
    assert not (tmp_path / "q").exists()
    with pytest.raises(ExportError, match="sha256"):
        verify_export(bad)
    with pytest.raises(ExportError, match="sha256"):
        verify_export(tiny_export, against=bad)


def test_quantize_force_refuses_a_foreign_folder(tiny_export, tmp_path):
    from chattts_ort.export.quantize import quantize_export

    other = tmp_path / "notes"
    _sentinel_tree(other)
    with pytest.raises(ExportError, match="not a chattts-ort export"):
        quantize_export(tiny_export, other, plan="int8", force=True, progress=False)
    assert _intact(other)


def test_cli_verify_steps_must_be_positive(tiny_export, capsys):
    from chattts_ort.cli import main

    with pytest.raises(SystemExit):
        main(["verify", str(tiny_export), "--steps", "0"])
    assert "--steps" in capsys.readouterr().err
