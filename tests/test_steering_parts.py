"""Known-answer tests of the steering parts: vectors, the activation -> mel inversion, evaluation."""

import numpy as np
import pytest
import soundfile as sf
import torch

from affectlens.io_audio import write_wav
from affectlens.acoustics import ACOUSTIC_FEATURE_NAMES, acoustic_features, prosody
from affectlens.steering.judge import AcousticJudge
from affectlens.steering.inversion import (
    MelMapper, apply_mel_change, invert, log_mel, mel_to_wave, round_trip_quality, stack_context, steered_log_mel, target_mel)
from affectlens.probes.axis import diff_of_means
from affectlens.steering.vectors import add_vector, project
from affectlens.steering.vocoder import GriffinLim

SR = 16000


def harmonic_tone(f0, seconds=1.0, sr=SR, glide=0.0, seed=0):
    """A voiced, speech-like tone: harmonics up to 4 kHz with a 1/k roll-off and a smooth
    loudness envelope; f0 glides linearly by `glide` (relative) over the clip."""
    t = np.arange(int(seconds * sr)) / sr
    f = f0 * (1 + glide * (t / seconds - 0.5))
    phase = 2 * np.pi * np.cumsum(f) / sr
    rng = np.random.default_rng(seed)
    w = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, int(4000 // (f0 * (1 + glide))) + 1))
    env = np.sin(np.pi * t / seconds) ** 0.5
    return (0.3 * env * w / np.abs(w).max()).astype(np.float32)


# --- vectors -------------------------------------------------------------------------------------
def test_diff_of_means_recovers_planted_direction_despite_speaker_offsets():
    rng = np.random.default_rng(0)
    d = 64
    direction = rng.normal(size=d)
    X, labels, speakers = [], [], []
    for s in range(8):
        offset = 10 * rng.normal(size=d)  # a speaker's voice: far larger than the concept
        n_sad, n_happy = 2 + s, 12 - s  # unbalanced classes per speaker
        for label, n in (("sad", n_sad), ("happy", n_happy)):
            X.append(offset + rng.normal(size=(n, d)) * 0.5 + (label == "happy") * direction)
            labels += [label] * n
            speakers += [f"spk{s}"] * n
    X.append(rng.normal(size=(5, d)) + 50)  # a speaker with only one class must be skipped
    labels += ["happy"] * 5
    speakers += ["lonely"] * 5
    v = diff_of_means(np.concatenate(X), labels, speakers, "sad", "happy")
    cos = v @ direction / (np.linalg.norm(v) * np.linalg.norm(direction))
    assert v.shape == (d,) and cos > 0.99
    assert abs(np.linalg.norm(v) / np.linalg.norm(direction) - 1) < 0.1


def test_diff_of_means_without_shared_speaker_is_an_error():
    X = np.zeros((4, 3))
    with pytest.raises(ValueError, match="no speaker"):
        diff_of_means(X, ["sad", "sad", "happy", "happy"], ["a", "a", "b", "b"], "sad", "happy")


def test_add_vector_identity_shift_and_span():
    act = torch.randn(2, 10, 6)
    v = np.arange(6, dtype=np.float32)
    assert torch.equal(add_vector(v, 0.0)(act, "encoder.blocks.1.resid_post"), act)
    assert torch.allclose(add_vector(v, 2.0)(act, "s"), act + 2 * torch.from_numpy(v))
    out = add_vector(v, 1.0, frames=(3, 5))(act, "s")
    assert torch.equal(out[:, :3], act[:, :3]) and torch.equal(out[:, 5:], act[:, 5:])
    assert torch.allclose(out[:, 3:5], act[:, 3:5] + torch.from_numpy(v))
    with pytest.raises(ValueError, match="d=6"):
        add_vector(v, 1.0)(torch.zeros(1, 2, 5), "s")


def test_project_is_the_scalar_projection():
    X = np.array([[3.0, 4.0], [1.0, 0.0]])
    np.testing.assert_allclose(project(X, np.array([0.0, 2.0])), [4.0, 0.0])


# --- inversion -----------------------------------------------------------------------------------
def test_mapper_recovers_a_known_linear_map_and_survives_save_load(tmp_path):
    rng = np.random.default_rng(1)
    d, context, n_mels = 12, 2, 8
    W = rng.normal(size=((2 * context + 1) * d, 2 * n_mels)) * 0.3
    b = rng.normal(size=2 * n_mels)
    frames = [rng.normal(size=(int(n), d)).astype(np.float32) * 3 + 1 for n in rng.integers(20, 60, 30)]
    targets = [stack_context(f, context) @ W + b for f in frames]
    m = MelMapper(n_mels=n_mels, context=context).fit_targets(frames, targets)
    test = rng.normal(size=(40, d)).astype(np.float32) * 3 + 1
    want = (stack_context(test, context) @ W + b).reshape(80, n_mels)
    got = m.predict(test)
    assert got.shape == (80, n_mels)
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()
    m.save(tmp_path / "ridge")
    assert sorted(p.name for p in (tmp_path / "ridge").iterdir()) == ["cfg.json", "weights.safetensors"]
    np.testing.assert_array_equal(MelMapper.load(tmp_path / "ridge").predict(test), got)

    mlp = MelMapper(kind="mlp", n_mels=n_mels, hidden=16, epochs=2).fit_targets(frames, targets)
    mlp.save(tmp_path / "mlp")
    np.testing.assert_allclose(MelMapper.load(tmp_path / "mlp").predict(test), mlp.predict(test), atol=1e-6)


def _projected_log_mel_features(waves, mapper, proj):
    """A stand-in 'site': a fixed random projection of the clip's log-mel at 50 frames/s."""
    out = []
    for w in waves:
        n = int(np.ceil(len(w) / (2 * mapper.hop_length)))
        out.append(target_mel(w, n, 2, mapper.mel_config).reshape(n, -1) @ proj)
    return out


def test_mapper_round_trip_on_harmonic_sounds_keeps_f0():
    rng = np.random.default_rng(2)
    mapper = MelMapper(context=0)  # 300 training frames: too few for 5 x 256 stacked features
    train = [harmonic_tone(f0, glide=g, seed=i)
             for i, (f0, g) in enumerate([(100, 0.3), (130, -0.2), (160, 0.2), (200, -0.3), (240, 0.2), (280, -0.1)])]
    proj = rng.normal(size=(2 * mapper.n_mels, 256)).astype(np.float32) / 16
    mapper.fit(_projected_log_mel_features(train, mapper, proj), train)
    wave = harmonic_tone(180, glide=0.1, seed=9)
    frames = _projected_log_mel_features([wave], mapper, proj)[0]
    q = round_trip_quality(mapper, frames, wave, vocoder=GriffinLim(n_iter=32))
    assert q["mapper_log_mel_l1"] < 0.15
    assert q["resynth_f0_rel_err"] < 0.05 and q["vocoder_f0_rel_err"] < 0.05
    assert abs(q["f0_mean_hz"] - 180) / 180 < 0.02
    assert abs(q["resynth_f0_mean_hz"] - q["f0_mean_hz"]) / q["f0_mean_hz"] < 0.05
    # residual mode: unsteered, it is the clip itself (mel and wave)
    np.testing.assert_array_equal(steered_log_mel(mapper, frames, frames, wave), target_mel(wave, len(frames), 2, mapper.mel_config))
    np.testing.assert_allclose(invert(mapper, frames, frames, wave), wave, atol=1e-5)
    assert len(invert(mapper, frames, frames + 0.1, wave, mode="direct", n_iter=2)) == 2 * len(frames) * mapper.hop_length


def test_apply_mel_change_is_a_filter_on_the_clip():
    w = harmonic_tone(150, seconds=0.5)
    n = len(log_mel(w))
    np.testing.assert_allclose(apply_mel_change(w, np.zeros((n, 80))), w, atol=1e-5)
    np.testing.assert_allclose(apply_mel_change(w, np.full((n, 80), np.log(2.0))), 2 * w, atol=1e-4)
    low_cut = np.zeros((n, 80))
    low_cut[:, :20] = np.log(0.1)  # the bands below ~1 kHz 20 dB down: the fundamental fades
    spec_in, spec_out = (np.abs(np.fft.rfft(x)) for x in (w, apply_mel_change(w, low_cut)))
    f0_bin = int(150 * len(w) / SR)
    assert spec_out[f0_bin - 2:f0_bin + 3].max() < 0.15 * spec_in[f0_bin - 2:f0_bin + 3].max()


def test_griffin_lim_output_length_and_determinism():
    w = harmonic_tone(150, seconds=0.5)
    m = log_mel(w)
    a, b = mel_to_wave(m, n_iter=4), mel_to_wave(m, n_iter=4)
    assert len(a) == len(m) * 160 and np.array_equal(a, b)


# --- evaluation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("f0", [110.0, 220.0])
def test_prosody_of_a_harmonic_tone(f0):
    p = prosody(harmonic_tone(f0, seconds=1.0), SR)
    assert abs(p["f0_mean_hz"] - f0) / f0 < 0.02
    assert p["f0_range_st"] < 0.5 and p["voiced_fraction"] > 0.8
    assert p["duration_s"] == pytest.approx(1.0)
    assert -30 < p["rms_db"] < 0


def test_prosody_of_silence_is_unvoiced():
    p = prosody(np.zeros(SR // 2, dtype=np.float32), SR)
    assert np.isnan(p["f0_mean_hz"]) and p["voiced_fraction"] == 0


def test_acoustic_judge_separates_high_from_low_pitch():
    rng = np.random.default_rng(3)

    def clips(lo, hi, n, seed):
        return [harmonic_tone(f, seconds=0.5, glide=0.1, seed=seed + i) for i, f in enumerate(rng.uniform(lo, hi, n))]

    low, high = clips(90, 130, 6, 0), clips(200, 280, 6, 100)
    assert acoustic_features(low[0], SR).shape == (len(ACOUSTIC_FEATURE_NAMES),)
    judge = AcousticJudge().fit(low + high, ["low"] * 6 + ["high"] * 6)
    proba = judge.predict_proba(clips(95, 125, 3, 200) + clips(210, 270, 3, 300))
    high_col = list(judge.classes_).index("high")
    assert (proba[:3, high_col] < 0.5).all() and (proba[3:, high_col] > 0.5).all()


# --- audio files ---------------------------------------------------------------------------------
def test_write_wav_is_16_bit_pcm_and_clips(tmp_path):
    w = np.array([0.0, 0.5, -0.5, 2.0, -2.0], dtype=np.float32)
    path = write_wav(tmp_path / "a" / "x.wav", w, SR)
    info = sf.info(path)
    assert info.subtype == "PCM_16" and info.samplerate == SR
    back, _ = sf.read(path)
    np.testing.assert_allclose(back, [0, 0.5, -0.5, 1, -1], atol=1e-4)
    assert [p.name for p in path.parent.iterdir()] == ["x.wav"]
    with pytest.raises(ValueError, match="NaN"):
        write_wav(tmp_path / "y.wav", np.array([np.nan]), SR)
