"""The CLI refuses what it cannot use before any model loads (issue 20.6): every `steer`/`tts`
argument is checked first, with a message that names the flag or file and the fix; `--watermark-db`
and the workflow's `steer.watermark_snr_db` are bounded to where the mark is detectable and not
audible; `watermark check` fails closed (exit 2 "cannot check", one line) on anything it cannot read."""

from pathlib import Path

import jsonschema
import numpy as np
import pytest
import soundfile as sf
import yaml

import affectlens.data.espeak
import affectlens.models
from affectlens.cli import main
from affectlens.steering import watermark as wm

SR = 16000
SITE = "encoder.blocks.1.resid_post"
SCHEMA = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())


class ModelLoaded(Exception):
    """Raised instead of loading a model: reaching it means every argument passed the checks."""


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise ModelLoaded

    monkeypatch.setattr(affectlens.models, "load_adapter", refuse)
    monkeypatch.setattr(affectlens.data.espeak, "synthesize", refuse)


def _tone(path, seconds=1.0, f=220.0):
    t = np.arange(int(seconds * SR)) / SR
    sf.write(path, (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), SR)
    return str(path)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "text.wav").write_text("not audio\n")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "adir").mkdir()
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), SR)
    np.save(tmp_path / "v.npy", np.ones(64, np.float32))
    (tmp_path / "v.txt").write_text("1 2 3\n")
    (tmp_path / "mapper").mkdir()
    (tmp_path / "mapper" / "cfg.json").write_text("{}")
    return {"voice": _tone(tmp_path / "voice.wav"), "calm": _tone(tmp_path / "calm.wav", f=180.0),
            "angry": _tone(tmp_path / "angry.wav", f=300.0), "vector": str(tmp_path / "v.npy"), "dir": tmp_path}


def _steer(files, *extra, output=None):
    args = ["steer", "--input", files["voice"], "--model", "tiny-random", "--site", SITE, "--vector", files["vector"],
            "--output", output or str(files["dir"] / "out.wav")]
    return main(args + list(extra))


def _refused(capsys, code, *expected):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("affectlens: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


def test_valid_arguments_reach_the_model(files, no_model):
    for level in ("auto", "10", "34", "22.5"):
        with pytest.raises(ModelLoaded):
            _steer(files, "--watermark-db", level, "--alpha", "-2", "--window", "0", "1.5")
    with pytest.raises(ModelLoaded):
        _steer(files, "--output", str(files["dir"] / "new" / "sub" / "out.flac"), "--frames", "0", "10")
    with pytest.raises(ModelLoaded):
        main(["steer", "--input", files["voice"], "--ref-from", files["calm"], "--ref-to", files["angry"],
              "--mapper", "mlp", "--hear-site", "last", "--output", str(files["dir"] / "o.wav")])


@pytest.mark.parametrize("level", ["nan", "inf", "-inf", "5", "9.99", "34.01", "40", "loud", ""])
def test_watermark_level_is_bounded_before_the_model_loads(files, no_model, capsys, level):
    err = _refused(capsys, _steer(files, f"--watermark-db={level}"), "--watermark-db", "10", "34", "auto",
                   "not detectable", "audible")
    assert "watermarked" not in err


def test_output_is_checked_before_the_model_loads(files, no_model, capsys, tmp_path):
    _refused(capsys, _steer(files, output=str(tmp_path / "out.mp3")), "--output", "out.mp3", ".wav or .flac", "out.wav")
    _refused(capsys, _steer(files, output=str(tmp_path / "adir")), "--output", "is a folder")
    _refused(capsys, _steer(files, output=str(tmp_path / "v.txt" / "out.wav")), "--output", "cannot write into")
    _refused(capsys, _steer(files, output=files["voice"]), "--output", "is the --input file")
    assert not (tmp_path / "out.mp3").exists()


@pytest.mark.parametrize("name, why", [("missing.wav", "does not exist"), ("adir", "is a folder"),
                                       ("empty.wav", "empty file"), ("text.wav", "not audio"),
                                       ("zero.wav", "holds no samples")])
def test_audio_inputs_are_checked_before_the_model_loads(files, no_model, capsys, name, why):
    bad = str(files["dir"] / name)
    _refused(capsys, main(["steer", "--input", bad, "--vector", files["vector"], "--output", str(files["dir"] / "o.wav")]),
             f"--input {bad}", why)
    for flag in ("--ref-from", "--ref-to"):
        refs = {"--ref-from": files["calm"], "--ref-to": files["angry"], flag: bad}
        _refused(capsys, main(["steer", "--input", files["voice"], "--ref-from", refs["--ref-from"], "--ref-to",
                               refs["--ref-to"], "--output", str(files["dir"] / "o.wav")]), f"{flag} {bad}", why)


def test_vectors_and_mapper_are_checked_before_the_model_loads(files, no_model, capsys):
    d = files["dir"]
    for name, why in [("none.npy", "does not exist"), ("adir", "is a folder"), ("v.txt", ".npy, .npz or .safetensors")]:
        _refused(capsys, _steer(files, "--vector", str(d / name)), f"--vector {d / name}", why)
    _refused(capsys, _steer(files, "--mapper", str(d / "nowhere")), "--mapper", "neither ridge, mlp nor a saved mapper")
    _refused(capsys, _steer(files, "--mapper", str(d / "mapper")), "--mapper", "weights.safetensors")


@pytest.mark.parametrize("extra, expected", [
    (["--alpha", "nan"], "--alpha nan"), (["--alpha", "inf"], "--alpha inf"),
    (["--frames", "5", "2"], "--frames 5 2"), (["--frames", "-1", "3"], "--frames -1 3"),
    (["--window", "2", "1"], "--window 2 1"), (["--window", "nan", "1"], "--window nan 1"),
    (["--window", "-1", "1"], "--window -1 1"), (["--frames", "0", "2", "--window", "0", "1"], "not both"),
    (["--site", "encoder.block.1.resid_post"], "--site"), (["--hear-site", "middle"], "--hear-site"),
    (["--key", ""], "--key"),
])
def test_numbers_windows_and_sites_are_checked_before_the_model_loads(files, no_model, capsys, extra, expected):
    _refused(capsys, _steer(files, *extra), expected)


def test_tts_checks_its_arguments_before_speaking(files, no_model, capsys):
    out = str(files["dir"] / "tts.wav")
    _refused(capsys, main(["tts", "--text", "  ", "--vector", files["vector"], "--output", out]), "--text")
    _refused(capsys, main(["tts", "--text", "Hi.", "--vector", files["vector"], "--watermark-db", "nan",
                           "--output", out]), "--watermark-db")
    _refused(capsys, main(["tts", "--text", "Hi.", "--vector", files["vector"], "--output", out[:-4] + ".ogg"]),
             "--output")
    with pytest.raises(ModelLoaded):  # espeak-ng is the first thing to run once the arguments pass
        main(["tts", "--text", "Hi.", "--vector", files["vector"], "--output", out])


def test_the_schema_and_the_library_share_the_watermark_range(tmp_path):
    lo, hi = wm.SNR_DB_RANGE
    assert (lo, hi) == (10.0, 34.0) == (min(wm.LEVELS_DB), max(wm.LEVELS_DB))
    number = SCHEMA["properties"]["steer"]["properties"]["watermark_snr_db"]["oneOf"][0]
    assert (number["minimum"], number["maximum"]) == (lo, hi)
    for ok in (lo, 22, hi, "auto"):
        jsonschema.validate(ok, {"oneOf": [number, {"type": "string", "enum": ["auto"]}]})
    for bad in (9, 35, 60):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, {"oneOf": [number, {"type": "string", "enum": ["auto"]}]})
    for bad in (float("nan"), float("inf"), 35, 9.5, "loud", True, None):
        with pytest.raises(ValueError, match="10 to 34"):
            wm.check_level(bad)
    with pytest.raises(ValueError, match="not detectable"):
        wm.write_steered_audio(tmp_path / "x.wav", np.ones(SR, np.float32) * 0.1, SR, snr_db=60)
    assert not (tmp_path / "x.wav").exists()


# --- watermark check: fails closed ----------------------------------------------------------------
@pytest.mark.parametrize("name, why", [("missing.wav", "does not exist"), ("adir", "is a folder"),
                                       ("empty.wav", "empty file"), ("text.wav", "not audio"),
                                       ("zero.wav", "holds no samples"), ("nan.wav", "not finite"),
                                       ("rand.bin", "not audio")])
def test_watermark_check_cannot_check_what_it_cannot_read(files, capsys, name, why):
    d = files["dir"]
    (d / "rand.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    x = np.full(SR, 0.1, np.float32)
    x[5] = np.nan
    sf.write(d / "nan.wav", x, SR, subtype="FLOAT")
    err = _refused(capsys, main(["watermark", "check", str(d / name)]), f"cannot check {d / name}", why)
    assert "no watermark" not in err and capsys.readouterr().out == ""


def test_watermark_check_exit_1_only_for_a_readable_unmarked_file(files, capsys, tmp_path):
    noise = (0.1 * np.random.default_rng(1).standard_normal(3 * SR)).astype(np.float32)
    sf.write(tmp_path / "plain.wav", noise, SR)
    wm.write_steered_audio(tmp_path / "marked.wav", noise, SR, snr_db=16)
    assert main(["watermark", "check", str(tmp_path / "plain.wav")]) == 1
    assert "no watermark" in capsys.readouterr().out
    assert main(["watermark", "check", str(tmp_path / "marked.wav")]) == 0
    assert "watermark detected" in capsys.readouterr().out
