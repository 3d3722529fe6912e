"""`chattts-ort say`: text to a WAV file, streamed, atomically written."""
import json
import shutil

import numpy as np
import pytest

from chattts_ort.cli import main
from chattts_ort.format import MANIFEST


@pytest.fixture(scope="module")
def export(_private_cache):
    from chattts_ort.export.exporter import default_export

    return default_export("tiny", layer_form="fused")


def test_say_writes_a_wav(export, tmp_path, capsys):
    sf = pytest.importorskip("soundfile")
    out = tmp_path / "hello.wav"
    assert main(["say", "hello world", "--model", str(export), "-o", str(out), "--frames", "30", "--min-frames", "30",
                 "--threads", "1", "--voice", "seed:3"]) == 0
    wav, rate = sf.read(str(out), dtype="float32")
    assert rate == 24000 and wav.shape == (512 * 30 - 256,)
    assert np.abs(wav).max() > 0.01
    assert [p.name for p in tmp_path.iterdir()] == ["hello.wav"]  # no temporary file left
    printed = capsys.readouterr().out
    assert "first audio after" in printed and "real-time factor" in printed


def test_say_errors(export, tmp_path, capsys):
    assert main(["say", "hi", "--model", str(export), "-o", str(tmp_path / "x.mp4")]) == 2
    assert main(["say", "hi", "--model", str(export), "-o", str(tmp_path / "nope" / "x.wav")]) == 2
    old = tmp_path / "old"
    shutil.copytree(export, old)
    m = json.loads((old / MANIFEST).read_text())
    m.pop("audio")
    (old / MANIFEST).write_text(json.dumps(m))
    assert main(["say", "hi", "--model", str(old), "-o", str(tmp_path / "x.wav"), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "x.mp4" in err and "does not exist" in err and "no audio graphs" in err
    assert not (tmp_path / "x.wav").exists()


def test_play_without_a_device_is_a_clear_error(export, tmp_path, capsys):
    try:
        import sounddevice  # noqa: F401
        pytest.skip("sounddevice is installed; whether a device exists is up to the machine")
    except (ImportError, OSError):
        pass
    assert main(["say", "hi", "--model", str(export), "-o", str(tmp_path / "x.wav"), "--play"]) == 2
    assert "--play needs the sounddevice package" in capsys.readouterr().err
