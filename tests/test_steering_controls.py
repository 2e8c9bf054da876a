"""Known answers for the whole steered-audio path, and for the controls that could beat an edit.

A planted model: its steer site (encoder.blocks.0.resid_post) is a known linear function of the
clip's log-mel (each frame: the standardised log-mel of 80 bands, plus 16 channels that carry no
mel information), and a non-linear block follows before the hear site (encoder.blocks.1.
resid_post). Steering along the planted direction of some mel bands must raise exactly those bands
in the written WAV (measured back from the file); a direction in the silent channels must change
nothing; and the mel change's frame dependence is 0 when the ridge mapper reads the steer site
itself (a fixed equaliser) and > 0 at the hear site after the non-linear block.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from affectlens.models.base import Adapter, Batch
from affectlens.steering import experiment as ex
from affectlens.steering.inversion import MelConfig, MelMapper, change_dependence, log_mel, predicted_change
from affectlens.steering.oneclip import site_frames
from affectlens.steering.vectors import add_vector
from affectlens.steering.watermark import load_any, write_steered_audio

SR = 16000
N_MELS, N_AUX = 80, 16
BANDS = slice(30, 40)  # the planted concept: these bands louder
MEL_CENTRE, MEL_SCALE = -4.0, 2.0  # z = (log-mel - centre) / scale at the steer site


class Bend(nn.Module):
    def forward(self, x):
        return x + 0.5 * torch.tanh(x)


class Planted(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Identity(), Bend()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class PlantedAdapter(Adapter):
    """Frames at 50/s: the mean of each two 100/s log-mel frames, standardised, beside N_AUX
    channels of a fixed pseudo-random sequence (independent of the audio)."""

    family = "planted"
    frame_rate = 50.0

    def __init__(self):
        super().__init__(Planted(), "planted", "0", "cpu")

    @property
    def n_blocks(self):
        return {"encoder": 2}

    def _hook_point(self, site):
        if site.point == "embed":
            return self.model.layers[0], "pre"
        if site.point != "resid_post":
            raise ValueError(f"the planted model has resid_post sites only, not {site}")
        return self.model.layers[site.block], "post"

    def prepare(self, waves):
        feats = []
        for w in waves:
            m = log_mel(w, MelConfig())
            n = self.frames_for(len(w))
            m = np.concatenate([m, np.repeat(m[-1:], max(0, 2 * n - len(m)), 0)])[:2 * n]
            z = (m.reshape(n, 2, N_MELS).mean(1) - MEL_CENTRE) / MEL_SCALE
            aux = np.random.default_rng(int(np.abs(w).sum() * 1e3)).standard_normal((n, N_AUX)).astype(np.float32)
            feats.append(np.concatenate([z, aux], 1))
        T = max(len(f) for f in feats)
        x = np.zeros((len(feats), T, N_MELS + N_AUX), np.float32)
        for i, f in enumerate(feats):
            x[i, :len(f)] = f
        return Batch({"x": torch.from_numpy(x)}, [len(f) for f in feats])

    def forward(self, batch):
        return self.model(batch.inputs["x"])


def speechlike(seed: int, seconds: float = 1.0) -> np.ndarray:
    """A voiced tone with a gliding pitch and two moving formant-like resonances."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    formants = rng.uniform(400, 900), rng.uniform(1200, 2600)
    w = np.zeros_like(t)
    for k in range(1, 40):
        f = k * f0
        gain = sum(np.exp(-((f - c) / 300) ** 2) for c in formants) + 0.05
        w += gain * np.sin(k * phase) / k
    w += 0.01 * rng.standard_normal(len(t))
    return (0.3 * w / np.abs(w).max()).astype(np.float32)


@pytest.fixture(scope="module")
def planted():
    adapter = PlantedAdapter()
    waves = [speechlike(s) for s in range(16)]
    mappers = {}
    for site in ("encoder.blocks.0.resid_post", "encoder.blocks.1.resid_post"):
        frames = [site_frames(adapter, w, site) for w in waves]
        mappers[site] = MelMapper(seed=0).fit(frames, waves, sr=SR)
    return adapter, waves, mappers


def band_direction(scale_nats: float = 1.0) -> np.ndarray:
    v = np.zeros(N_MELS + N_AUX, np.float32)
    v[BANDS] = scale_nats / MEL_SCALE  # 1 nat of log-mel in the planted bands
    return v


def aux_direction() -> np.ndarray:
    v = np.zeros(N_MELS + N_AUX, np.float32)
    v[N_MELS:] = np.random.default_rng(0).standard_normal(N_AUX)
    return v / np.linalg.norm(v) * np.linalg.norm(band_direction())


def written_change(adapter, mapper, wave, vector, alpha, tmp_path, name) -> np.ndarray:
    """Per mel band, the mean log-mel change of the written, watermarked WAV against the alpha = 0
    file written the same way (the watermark and 16-bit rounding lift near-silent bands of both)."""
    fit = ex.SpeakerFit({"planted": lambda a: add_vector(vector, a)}, [], mapper, np.zeros(N_MELS, np.float32),
                        judges=None)
    outputs = ex.render_clip(adapter, wave, fit, "encoder.blocks.0.resid_post", "encoder.blocks.1.resid_post",
                             [0.0, alpha], controls=[], mode="residual", primary="planted")
    heard = {}
    for o in outputs[1:]:
        write_steered_audio(tmp_path / f"{name}_{o.alpha:g}.wav", o.wave, SR, snr_db=30.0)
        heard[o.alpha] = load_any(tmp_path / f"{name}_{o.alpha:g}.wav")[0]
    voiced = log_mel(wave).max(1) > log_mel(wave).max() - 6  # frames with signal
    return (log_mel(heard[alpha]) - log_mel(heard[0.0]))[voiced].mean(0)


def test_planted_direction_raises_the_planted_bands_in_the_written_file(planted, tmp_path):
    adapter, waves, mappers = planted
    mapper = mappers["encoder.blocks.1.resid_post"]
    changes = np.stack([written_change(adapter, mapper, w, band_direction(), 2.0, tmp_path, f"c{i}")
                        for i, w in enumerate(waves[:3])]).mean(0)
    inside = changes[32:38].mean()
    outside = np.abs(np.r_[changes[:25], changes[45:]]).mean()
    assert 1.4 < inside < 2.6, changes.round(2)  # 2 nats planted (alpha 2 x 1 nat)
    assert outside < 0.25, changes.round(2)


def test_orthogonal_direction_changes_nothing(planted, tmp_path):
    adapter, waves, mappers = planted
    mapper = mappers["encoder.blocks.1.resid_post"]
    changes = np.stack([written_change(adapter, mapper, w, aux_direction(), 2.0, tmp_path, f"o{i}")
                        for i, w in enumerate(waves[:3])]).mean(0)
    assert np.abs(changes).max() < 0.3, changes.round(2)


def test_diagnostic_flags_a_fixed_equaliser(planted):
    adapter, waves, mappers = planted
    v = band_direction()
    deps = {}
    for site, mapper in mappers.items():
        wave = waves[5]
        base = site_frames(adapter, wave, site)
        steered = site_frames(adapter, wave, site, {"encoder.blocks.0.resid_post": add_vector(v, 2.0)})
        deps[site] = change_dependence(predicted_change(mapper, base, steered), mapper.upsample)
    assert deps["encoder.blocks.0.resid_post"] < 1e-4  # hear site = steer site, ridge: one curve for every frame
    assert deps["encoder.blocks.1.resid_post"] > 0.02  # through the non-linear block: frame by frame


def test_controls_render_through_the_same_path(planted):
    """mel_shift raises the planted bands without the model; gain only changes the level; random
    directions have the primary vector's norm and are seeded."""
    adapter, waves, mappers = planted
    mapper = mappers["encoder.blocks.1.resid_post"]
    shift = np.zeros(N_MELS, np.float32)
    shift[BANDS] = 1.0
    randoms = ex.random_directions(N_MELS + N_AUX, float(np.linalg.norm(band_direction())), 2, seed=7)
    assert np.allclose([np.linalg.norm(r) for r in randoms], np.linalg.norm(band_direction()))
    assert not np.allclose(randoms[0], randoms[1])
    np.testing.assert_allclose(randoms[1], ex.random_directions(N_MELS + N_AUX, 1.0, 2, seed=7)[1]
                               * np.linalg.norm(band_direction()), rtol=1e-5)
    fit = ex.SpeakerFit({"diff_of_means": lambda a: add_vector(band_direction(), a)}, randoms, mapper, shift, None)
    wave = waves[2]
    outs = ex.render_clip(adapter, wave, fit, "encoder.blocks.0.resid_post", "encoder.blocks.1.resid_post",
                          [0.0, 2.0], ["gain", "mel_shift", "random"], "residual")
    kinds = [(o.method, o.kind, o.alpha, o.seed) for o in outs]
    assert kinds[:2] == [("none", "original", kinds[0][2], None), ("all", "method", 0.0, None)]
    assert {k[:2] for k in kinds[2:]} == {("diff_of_means", "method"), ("random", "control"),
                                          ("mel_shift", "control"), ("gain", "control")}
    by = {(o.method, o.seed): o for o in outs}
    d = (log_mel(by["mel_shift", None].wave) - log_mel(wave)).mean(0)
    assert d[32:38].mean() > 1.5 and np.abs(d[:25]).mean() < 0.1
    from affectlens.acoustics import active_level_db

    assert active_level_db(by["gain", None].wave, SR) == pytest.approx(active_level_db(by["diff_of_means", None].wave,
                                                                                        SR), abs=0.05)
    spectral = (log_mel(by["gain", None].wave) - log_mel(wave)).mean(0)
    assert np.ptp(spectral[5:75]) < 0.05  # a gain is the same change in every band


def test_paired_differences_against_controls_have_t_intervals():
    rng = np.random.default_rng(0)
    clips = [f"c{i}" for i in range(10)]
    control = rng.uniform(0.2, 0.4, 10)
    method = control + 0.3 + rng.normal(0, 0.05, 10)
    rows = []
    for i, c in enumerate(clips):
        rows += [{"clip_id": c, "method": "diff_of_means", "kind": "method", "output": "2", "alpha": 2.0,
                  "p_target_acoustic": method[i]},
                 {"clip_id": c, "method": "gain", "kind": "control", "output": "2", "alpha": 2.0,
                  "p_target_acoustic": control[i]},
                 {"clip_id": c, "method": "mel_shift", "kind": "control", "output": "2", "alpha": 2.0,
                  "p_target_acoustic": method[i] + 0.1},
                 *[{"clip_id": c, "method": "random", "kind": "control", "output": "2", "alpha": 2.0,
                    "p_target_acoustic": control[i] + s} for s in (0.0, 0.2)]]
    table = ex.compare_to_controls(pd.DataFrame(rows), ["p_target_acoustic"]).set_index("control")
    diff = method - control
    half = 2.2621571627409915 * diff.std(ddof=1) / np.sqrt(10)  # t(0.975, 9)
    assert table.loc["gain", "difference"] == pytest.approx(diff.mean())
    assert table.loc["gain", "ci_low"] == pytest.approx(diff.mean() - half)
    assert table.loc["gain", "beats"]
    assert table.loc["random", "difference"] == pytest.approx((method - control - 0.1).mean())  # seeds averaged
    assert table.loc["best_control", "best_control"] == "mel_shift"
    assert table.loc["best_control", "difference"] == pytest.approx(-0.1)
    assert not table.loc["best_control", "beats"]  # a control that beats the method is reported as such


def test_judging_a_clips_outputs_together_gives_each_its_own_numbers(planted):
    """judge_many (batched probe forwards, acoustic measures over 2 processes) scores each output
    exactly as judging it alone would: no padding, order or worker leaks between outputs."""
    from affectlens.probes.linear import LinearProbe
    from affectlens.steering.judge import AcousticJudge
    from affectlens.steering.oneclip import pooled_frames

    adapter, waves, _ = planted
    site = "encoder.blocks.1.resid_post"
    labels = np.array(["sad", "happy"] * 8)
    short = [w[: int(len(w) * (0.5 + 0.5 * (i % 2)))] for i, w in enumerate(waves[:5])]  # unequal lengths
    probe = LinearProbe().fit(pooled_frames(adapter, waves, site), labels)
    acoustic = AcousticJudge().fit(waves, labels)
    judges = ex.Judges("happy", adapter, site, probe, acoustic, [], -26.0, SR, n_jobs=2)
    together = judges.judge_many(short, waves[0], "", batch_size=3)
    for w, (numbers, transcript) in zip(short, together):
        alone, _ = ex.Judges("happy", adapter, site, probe, acoustic, [], -26.0, SR).judge(w, waves[0], "")
        assert numbers.keys() == alone.keys() and transcript == ""
        for k in alone:
            np.testing.assert_allclose(numbers[k], alone[k], rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=k)
    assert len({round(n["p_target_model_probe"], 6) for n, _ in together}) > 1  # the outputs differ


def test_batched_transcripts_equal_one_at_a_time(tmp_path):
    """transcribe_many batches only waves of one length, so each transcript is the one the wave gets
    alone (Whisper's token limit follows a batch's longest clip)."""
    from test_workflow import tiny_whisper

    from affectlens.models import build_adapter
    from affectlens.steering.text import transcribe, transcribe_many

    asr = build_adapter({"family": "whisper", "source": str(tiny_whisper(tmp_path / "w")), "sites": ["encoder.embed"]})
    waves = [0.1 * np.random.default_rng(k).standard_normal(SR * (1 + k % 2)).astype(np.float32) for k in range(5)]
    assert transcribe_many(asr, waves, batch_size=2) == [transcribe(asr, w) for w in waves]
