"""Corrupt runs without a parallel clip: embedding noise (ROME) and prosody neutralisation."""

import numpy as np
import pytest
import torch

from affectlens.patching.counterfactuals import (NOISE_FACTOR, corpus_std, embedding_noise, equalise_rate,
                                                 f0_track, flatten_energy, frame_rms, prosody_neutral,
                                                 speaking_rate)
from affectlens.patching.patch import patch_pair, time_windows
from planted import PlantedAdapter, planted_clip
from test_patching import SITES, planted_metric

SR = 16000


def voice(f0_start, f0_end, seconds=1.0, am=0.0, sr=SR):
    """A harmonic 'voice' gliding in pitch, optionally with a loudness contour (am)."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = np.geomspace(f0_start, f0_end, len(t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = 1 + am * np.sin(2 * np.pi * 1.5 * t)
    return (0.1 * x * env).astype(np.float32)


def bursts(per_second, seconds=2.0, sr=SR):
    """Tone bursts at a fixed rate: a 'speaking rate' we know."""
    t = np.arange(int(seconds * sr)) / sr
    gate = (np.mod(t * per_second, 1.0) < 0.5).astype(np.float32)
    return (0.2 * np.sin(2 * np.pi * 200 * t) * gate).astype(np.float32)


def test_corpus_std_streams_like_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(1000, 4))
    assert corpus_std(np.array_split(x, 7)) == pytest.approx(x.std(), rel=1e-9)
    with pytest.raises(ValueError, match="embedding site"):
        corpus_std([])


def test_embedding_noise_touches_real_frames_only_and_repeats():
    add = embedding_noise(2.0, [30, 10], seed=1)
    act = torch.zeros(2, 40, 64)
    out = add(act, "encoder.embed")
    assert out[0, 30:].eq(0).all() and out[1, 10:].eq(0).all()
    assert out[0, :30].std().item() == pytest.approx(2.0, rel=0.1)
    assert torch.equal(out, add(act, "encoder.embed"))  # the same corrupt run every time


def test_noise_corruption_on_the_planted_model():
    """The corrupt run is the clean clip with noise on the embedding. In the planted model noise in
    channel 1 reaches the readout unchanged, so every window of the embedding restores its own
    share and the shares add up to the whole (denoising), and patching all of it back is exact."""
    adapter = PlantedAdapter()
    clean = adapter.prepare([planted_clip(adapter, 40, +1.0, seed=0)])
    noise = {"encoder.embed": embedding_noise(NOISE_FACTOR * 1.0, clean.n_frames, seed=3)}
    metric = planted_metric(adapter)
    grid = patch_pair(adapter, clean, clean, SITES, time_windows(40, 10, 10), metric, corrupt_interventions=noise)
    whole = patch_pair(adapter, clean, clean, SITES, time_windows(40, 0, 10), metric, corrupt_interventions=noise)
    assert abs(grid["clean"][0] - grid["corrupt"][0]) > 1e-2  # the noise moved the metric
    den = grid[(grid.direction == "denoising") & (grid.site == "encoder.embed")]
    assert den["normalised"].sum() == pytest.approx(1.0, abs=1e-4)
    w = whole.set_index(["direction", "site"])["normalised"]
    assert w[("denoising", "encoder.embed")] == pytest.approx(1.0, abs=1e-5)
    assert w[("noising", "encoder.blocks.3.resid_post")] == pytest.approx(0.0, abs=1e-5)


def test_flatten_pitch_removes_the_glide_and_keeps_the_median():
    x = voice(120, 240, seconds=1.0)
    y = prosody_neutral(x, SR)
    fx, fy = f0_track(x, SR), f0_track(y, SR)
    spread = lambda f: np.nanstd(np.log2(f[np.isfinite(f)]))  # noqa: E731  octaves
    assert spread(fx) > 0.25
    assert spread(fy) < 0.35 * spread(fx)
    assert np.nanmedian(fy) == pytest.approx(np.nanmedian(fx), rel=0.06)
    assert len(y) == len(x) and np.isfinite(y).all()


def test_flatten_energy_flattens_the_contour():
    x = voice(150, 150, seconds=1.0, am=0.8)
    y = flatten_energy(x, SR)
    cv = lambda r: r[r > 0.05 * r.max()].std() / r[r > 0.05 * r.max()].mean()  # noqa: E731
    assert cv(frame_rms(y, SR)) < 0.4 * cv(frame_rms(x, SR))
    assert np.sqrt(np.mean(y**2)) == pytest.approx(np.sqrt(np.mean(x**2)), rel=1e-3)


def test_rate_is_equalised_toward_the_reference():
    fast = bursts(6.0)
    # Onsets per second of sounding time (an articulation rate): 6 bursts/s at 50 % duty -> 12.
    assert speaking_rate(fast, SR) == pytest.approx(12.0, rel=0.15)
    slow, factor = equalise_rate(fast, SR, reference_rate=8.0)
    assert factor == pytest.approx(8.0 / speaking_rate(fast, SR))
    assert len(slow) == pytest.approx(len(fast) / factor, rel=0.02)
    # The phase vocoder softens attacks, so the onset count is a rough check: it moved toward 8.
    assert abs(speaking_rate(slow, SR) - 8.0) < abs(speaking_rate(fast, SR) - 8.0) / 2


# --- the patch stage with a corrupt run made from the clean clip ------------------------------
@pytest.fixture(scope="module")
def stage_setup(tmp_path_factory):
    """The workflow's patch stage on a tiny real setup: a synthetic corpus (FLAC clips, manifest),
    a tiny wav2vec2 in a local folder, its store (bench/bench_scale.py builds all three)."""
    import sys
    from pathlib import Path

    from affectlens import stages

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_scale

    work = tmp_path_factory.mktemp("patch_stage")
    model = bench_scale.make_model(work / "model")
    manifest = bench_scale.make_corpus(work / "corpus", n_speakers=2, n_sentences=2)
    cfg = bench_scale.workflow_config(model)
    stages.extract.extract(manifest, cfg["models"]["tiny"], work / "store.h5")
    return work, manifest, cfg


def run_patch_stage(stage_setup, corruption):
    import pandas as pd

    from affectlens import stages

    work, manifest, cfg = stage_setup
    out = work / corruption
    params = {**cfg["patch"], "corruption": corruption, "attribution": False, "seed": cfg["patch"].get("seed", 0)}
    stages.patch.patch(work / "store.h5", manifest, cfg["models"]["tiny"], {"source": "sad", "target": "happy"}, params,
                 "label", out / "pairs.tsv", out / "effects.tsv", out / "summary.tsv")
    return tuple(pd.read_csv(out / name, sep="\t") for name in ("pairs.tsv", "effects.tsv", "summary.tsv"))


def assert_normalised_on_the_clean_corrupt_scale(effects):
    """normalised = (raw - corrupt) / (clean - corrupt): clean = 1, corrupt = 0, raw kept."""
    assert np.isfinite(effects[["raw", "clean", "corrupt", "normalised"]].to_numpy()).all()
    assert ((effects["clean"] - effects["corrupt"]).abs() > 1e-3).all()  # the corruption moved the readout
    want = (effects["raw"] - effects["corrupt"]) / (effects["clean"] - effects["corrupt"])
    np.testing.assert_allclose(effects["normalised"], want, rtol=1e-6, atol=1e-9)


def test_patch_stage_with_noise_states_sigma_and_restores_the_clean_run_window_by_window(stage_setup):
    from affectlens.store import Store

    work, _, cfg = stage_setup
    pairs, effects, summary = run_patch_stage(stage_setup, "noise")
    with Store(work / "store.h5") as s:
        sigma = NOISE_FACTOR * corpus_std(s.frame_chunks("encoder.embed"))
    for table in (pairs, summary):
        assert set(table["corruption"]) == {"noise"}
        np.testing.assert_allclose(table["noise_sigma"], sigma, rtol=1e-6)
    assert (pairs["clean_clip"] == pairs["corrupt_clip"]).all() and len(pairs) == cfg["patch"]["n_pairs"]
    assert_normalised_on_the_clean_corrupt_scale(effects)
    # Same length in both runs and a mean-pooled linear readout: the windows of the readout site
    # partition the clip, so their denoising effects add up to the whole clean run.
    readout = cfg["models"]["tiny"]["readout_site"]
    den = effects[(effects["direction"] == "denoising") & (effects["site"] == readout)]
    np.testing.assert_allclose(den.groupby("pair_id")["normalised"].sum(), 1.0, atol=1e-4)
    assert np.isfinite(summary["mean"]).all() and set(summary["method"]) == {"exact"}


def test_patch_stage_with_prosody_neutral_states_the_corruption_and_keeps_the_scale(stage_setup):
    pairs, effects, summary = run_patch_stage(stage_setup, "prosody_neutral")
    for table in (pairs, summary):
        assert set(table["corruption"]) == {"prosody_neutral"}
        assert table["noise_sigma"].isna().all()  # no noise in this corruption
    assert (pairs["reference_rate"] > 0).all() and pairs["reference_rate"].nunique() == 1
    assert_normalised_on_the_clean_corrupt_scale(effects)
    # Rate equalisation changes the length: each pair has its own grid of windows, so late windows
    # hold only the longer pairs; the first window holds every pair.
    assert np.isfinite(summary["mean"]).all() and summary["n_pairs"].between(1, len(pairs)).all()
    assert (summary.loc[summary["frame_start"] == 0, "n_pairs"] == len(pairs)).all()


def test_the_corruption_registry_is_the_schemas_and_names_each_strategy():
    """One registry (patching.corruptions): the schema's `patch.corruption` enum lists its names,
    and each strategy names its corrupt run in a heatmap title from the summary it wrote."""
    from pathlib import Path

    import pandas as pd
    import yaml

    from affectlens.patching.corruptions import CORRUPTIONS, corruption_heading, corruption_strategy

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    assert list(CORRUPTIONS) == schema["properties"]["patch"]["properties"]["corruption"]["enum"]
    with pytest.raises(ValueError, match="not one of"):
        corruption_strategy("shuffle")
    heading = {name: corruption_heading(pd.DataFrame({"corruption": [name], "noise_sigma": [0.1234]}))
               for name in CORRUPTIONS}
    assert heading == {"pairs": "paired clips", "noise": "embedding noise, sigma 0.123",
                       "prosody_neutral": "prosody-neutralised clips"}
    assert corruption_heading(pd.DataFrame({"mean": [0.0]})) == "paired clips"  # written before the column
    assert corruption_heading(pd.DataFrame({"corruption": ["other"]})) == "other"
