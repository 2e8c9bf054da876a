"""Probes beyond the multiclass sweep: the shared estimator contract, regression probes, binary
concept pairs, official splits, the acoustic pseudo-site, representation statistics, the concept
axis, time-resolved probes, patch- and trace-outcome probes, the figures and the stage, on planted
data with known answers."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import RidgeCV
from sklearn.metrics import f1_score, r2_score
from threadpoolctl import threadpool_limits

from affectlens.probes.axis import ConceptAxis, auroc, axis_metrics, loso_auroc, speaker_differences
from affectlens.probes.baseline import ACOUSTIC_SITE, read_acoustic_features
from affectlens.probes.frames import bin_frames, time_resolved
from affectlens.probes.linear import LinearProbe
from affectlens.probes.outcomes import (TRACE, outcome_tasks, patch_outcomes, read_table, run_trace_outcome_probe,
                                        trace_outcomes)
from affectlens.probes.regression import RidgeProbe, regression_metrics, ridge_cv, ridge_gcv
from affectlens.probes.representation import cohens_d, representation_stats
from affectlens.probes.stats import confusion, metrics_from_confusion, trivial_scores
from affectlens.stages.probe import run_probe_study
from affectlens.probes.sweep import (FitSettings, build_tasks, classification_task, probe_sweep, probe_task,
                                     sweep_arrays, sweep_tasks)
from affectlens.probes.axis import diff_of_means
from affectlens.data.manifest import read_manifest, write_manifest
from affectlens.store import Store, write_store

SITES = ["encoder.embed"] + [f"encoder.blocks.{b}.resid_post" for b in range(4)]
SIGNAL = {"encoder.blocks.1.resid_post", "encoder.blocks.2.resid_post"}
EMOTIONS = np.array(["angry", "happy", "neutral", "sad"])
FRAME_RATE = 50.0
SPAN = (10, 20)  # frames that carry the concept: 0.2-0.4 s


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def planted(seed=0, d=12, n_speakers=6, per_class=4, offset=0.0):
    """Clips of `n_speakers` speakers x 4 classes x `per_class`. At the SIGNAL sites a class mean
    and a valence direction (happy +1, sad -1, others 0, plus noise) are written in; every site
    carries a per-speaker offset, noise, and a common `offset` shared by all clips."""
    rng = np.random.default_rng(seed)
    y = np.tile(np.repeat(np.arange(4), per_class), n_speakers)
    speaker = np.repeat(np.arange(n_speakers), 4 * per_class)
    valence = np.select([y == 1, y == 3], [1.0, -1.0], 0.0) + rng.normal(0, 0.3, len(y))
    v_dir = rng.normal(size=d)
    acts = {}
    for site in SITES:
        x = rng.normal(size=(len(y), d)) + rng.normal(0, 1.5, (n_speakers, d))[speaker] + offset
        if site in SIGNAL:
            x += 1.2 * rng.normal(size=(4, d))[y] + np.outer(valence, v_dir)
        acts[site] = x
    manifest = pd.DataFrame({"clip_id": [f"c{i:04d}" for i in range(len(y))], "label": EMOTIONS[y],
                             "speaker": [f"spk{s}" for s in speaker], "valence": valence})
    return acts, manifest


def frame_store(path, acts, manifest, rng_seed=1):
    """A store whose clips have 30 frames each; the pooled signal of SIGNAL sites lives only in
    frames SPAN (elsewhere the frames hold noise around the speaker offset)."""
    rng = np.random.default_rng(rng_seed)
    n_frames = 30
    with write_store(path, {s: a.shape[1] for s, a in acts.items()}, manifest["clip_id"].tolist(),
                     {"model_id": "planted", "frame_rate": FRAME_RATE}, storage_dtype="float32") as w:
        frames = {}
        for s, a in acts.items():
            per_clip = []
            base = acts["encoder.embed"]  # signal-free reference: speaker offset + noise
            for i in range(len(a)):
                f = base[i] + rng.normal(0, 1.0, (n_frames, a.shape[1]))
                f[SPAN[0]:SPAN[1]] += (a[i] - base[i]) * n_frames / (SPAN[1] - SPAN[0])
                per_clip.append(f.astype(np.float32))
            frames[s] = per_clip
        w.append(frames)
    return path


# --- the shared estimator contract -------------------------------------------------------------
# Every estimator of the package follows scikit-learn's conventions: __init__ stores the
# hyperparameters as given (get_params, set_params and clone work), fit returns the estimator,
# what it learns ends in `_` and a refit replaces it. The probes take (X, y) and also pass
# check_estimator; the steering judge fits on waves and the mel mapper on activations with their
# waves, so check_estimator's (X, y) checks do not apply to them (None).

def _arrays(variant):
    rng = np.random.default_rng(0)
    return rng.normal(size=(40, (5, 3)[variant])), np.repeat([0, 1], 20)


def _tones(variant):
    """Waves (0.5 s harmonic tones at three pitches) and their labels, for the acoustic judge."""
    rng = np.random.default_rng(variant)
    t = np.arange(8000) / 16000
    labels = (["low", "high"], ["low", "mid", "high"])[variant]
    f0 = {"low": 110.0, "mid": 170.0, "high": 240.0}
    waves = [(0.3 * sum(np.sin(2 * np.pi * k * f0[label] * (1 + 0.02 * rng.normal()) * t) / k for k in (1, 2, 3))
              + 0.01 * rng.normal(size=t.size)).astype(np.float32) for label in labels for _ in range(4)]
    return waves, [label for label in labels for _ in range(4)]


def _activations(variant):
    """Activations [frame, d] at 50 frames/s and their 0.5 s waves, for the mel mapper."""
    rng = np.random.default_rng(variant)
    waves = [(0.1 * rng.normal(size=8000)).astype(np.float32) for _ in range(6)]
    return [rng.normal(size=(25, (6, 4)[variant])).astype(np.float32) for _ in waves], waves


def _estimators():
    from affectlens.acoustics import ACOUSTIC_FEATURE_NAMES
    from affectlens.steering.inversion import MelMapper
    from affectlens.steering.judge import AcousticJudge

    n_acoustic = len(ACOUSTIC_FEATURE_NAMES)
    # name: (estimator, fit arguments of a first and a second fit, n_features_in_ after each,
    #        check_estimator's expected failures or None where it does not apply)
    return {
        "LinearProbe": (LinearProbe(C=0.5), _arrays, (5, 3), {
            "check_classifiers_train": "decision_function returns [n, 2] logits for two classes, by design",
            "check_classifiers_classes": "decision_function returns [n, 2] logits for two classes, by design"}),
        "RidgeProbe": (RidgeProbe(alphas=(0.1, 10.0)), _arrays, (5, 3), {}),
        "ConceptAxis": (ConceptAxis(), _arrays, (5, 3), {}),
        "AcousticJudge": (AcousticJudge(C=0.5, level_free=False), _tones, (n_acoustic, n_acoustic), None),
        # alphas as a list: clone fails on an __init__ that converts what it is given
        "MelMapper": (MelMapper(context=1, n_mels=16, alphas=[0.1, 1.0]), _activations, (6, 4), None),
    }


ESTIMATORS = _estimators()


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.SkipTestWarning")
def test_every_estimator_follows_the_sklearn_contract(name):
    from sklearn.utils.estimator_checks import check_estimator

    est, data, n_features, expected_failures = ESTIMATORS[name]
    est = clone(est)
    params = est.get_params()
    assert clone(est).get_params() == params and est.set_params(**params) is est
    assert set(vars(est)) == set(params)  # __init__ stores hyperparameters only
    with pytest.raises(NotFittedError):
        est.transform(np.zeros((2, 3))) if hasattr(est, "transform") else est.predict(np.zeros((2, 3)))
    assert est.fit(*data(0)) is est
    first = {k: v for k, v in vars(est).items() if k not in params}
    assert first and all(k.endswith("_") for k in first)  # learned state ends in `_`
    assert est.get_params() == params  # fitting leaves the hyperparameters as they were
    est.fit(*data(1))  # a refit replaces the state
    assert set(vars(est)) - set(params) == set(first)
    assert any(getattr(est, k) is not v for k, v in first.items())
    assert (first["n_features_in_"], est.n_features_in_) == n_features
    fresh = clone(est)
    assert fresh.get_params() == params and not any(k.endswith("_") for k in vars(fresh))
    if expected_failures is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_estimator(fresh, expected_failed_checks=expected_failures)


# --- statistics and regression ---------------------------------------------------------------

def test_weighted_f1_and_trivial_chance():
    rng = np.random.default_rng(0)
    t = rng.choice(4, 400, p=[0.5, 0.2, 0.2, 0.1])
    pr = np.where(rng.random(400) < 0.6, t, rng.integers(0, 4, 400))
    m = metrics_from_confusion(confusion(t, pr, 4))
    assert m["weighted_f1"] == pytest.approx(f1_score(t, pr, average="weighted"))
    chance = trivial_scores(t, 4)
    p = np.bincount(t) / len(t)
    assert chance["accuracy"] == pytest.approx(p.max())
    assert chance["balanced_accuracy"] == pytest.approx(0.25)
    majority = f1_score(t, np.full(400, np.argmax(p)), average="weighted")  # the majority class's own score
    assert chance["weighted_f1"] == pytest.approx(max(majority, (p ** 2).sum()))


def test_ridge_matches_sklearn_and_batches_columns():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(70, 15))
    Y = np.stack([X[:, 0] * 2 + rng.normal(size=70), rng.normal(size=70)], 1)
    alphas = (0.1, 1.0, 10.0, 100.0)
    W, b, a, _ = ridge_gcv(X, Y, alphas)
    for j in range(2):
        ref = RidgeCV(alphas=alphas).fit(X, Y[:, j])
        assert a[j] == ref.alpha_
        np.testing.assert_allclose(W[j], ref.coef_, atol=1e-9)
        np.testing.assert_allclose(b[j], ref.intercept_, atol=1e-9)
    groups = np.repeat(np.arange(7), 10)
    Wg, bg, ag, _ = ridge_cv(X, Y, alphas, groups)
    for j in range(2):  # each column alone gives what the batch gives
        W1, b1, a1, _ = ridge_cv(X, Y[:, j], alphas, groups)
        assert a1[0] == ag[j]
        np.testing.assert_allclose(W1[0], Wg[j], atol=1e-10)
    probe = RidgeProbe(alphas=alphas).fit(X * 30 + 5, Y[:, 0], groups=groups)
    w, c = probe.readout()
    np.testing.assert_allclose((X * 30 + 5) @ w + c, probe.predict(X * 30 + 5), atol=1e-8)
    t, p = Y[:, 0], probe.predict(X * 30 + 5)
    m = regression_metrics(t, p)
    assert m["r2"] == pytest.approx(r2_score(t, p))
    ccc = 2 * np.cov(t, p, bias=True)[0, 1] / (t.var() + p.var() + (t.mean() - p.mean()) ** 2)
    assert m["ccc"] == pytest.approx(ccc) and m["pearson"] == pytest.approx(np.corrcoef(t, p)[0, 1])
    assert regression_metrics(t, t + 1.0)["pearson"] == pytest.approx(1.0)
    assert regression_metrics(t, t + 1.0)["ccc"] < 0.9  # a shifted prediction is not concordant


# --- known answers on planted data -----------------------------------------------------------

@pytest.fixture(scope="module")
def planted_tables():
    acts, manifest = planted()
    tasks = build_tasks(manifest, pairs=[("sad", "happy")], regression_columns=["valence"], n_permutations=19)
    result, _ = sweep_tasks(lambda s: acts[s], SITES, tasks)
    return acts, manifest, result


def test_binary_and_regression_probes_find_exactly_the_planted_sites(planted_tables):
    _, _, result = planted_tables
    m = result.metrics
    pair = m[(m.probe == "sad_vs_happy") & (m.metric == "accuracy")].set_index("site")
    assert (pair.chance == 0.5).all() and (pair.n_classes == 2).all()
    assert set(pair.index[(pair.value > 0.8) & (pair.p_value == pair.p_resolution)]) == SIGNAL
    assert (pair.drop(index=list(SIGNAL)).value < 0.7).all()
    reg = m[(m.probe == "valence") & (m.kind == "regression")]
    r2 = reg[reg.metric == "r2"].set_index("site")
    ccc = reg[reg.metric == "ccc"].set_index("site")
    assert set(r2.index[(r2.value > 0.3) & (r2.p_value == r2.p_resolution)]) == SIGNAL
    assert (r2.drop(index=list(SIGNAL)).value < 0.1).all() and (ccc.loc[list(SIGNAL)].value > 0.5).all()
    assert set(reg.metric) == {"r2", "ccc", "pearson", "control_r2", "selectivity"}
    axis = m[(m.kind == "axis") & (m.metric == "loso_auroc")].set_index("site")
    assert (axis.loc[list(SIGNAL)].value > 0.9).all() and (axis.drop(index=list(SIGNAL)).value < 0.8).all()
    t1 = m[(m.kind == "axis") & (m.metric == "interp_p_target_t1")].set_index("site")
    assert (t1.loc[list(SIGNAL)].value > 0.6).all()


def test_parallel_sites_give_the_serial_tables(planted_tables):
    acts, manifest, serial = planted_tables
    tasks = build_tasks(manifest, pairs=[("sad", "happy")], regression_columns=["valence"], n_permutations=19)
    parallel, _ = sweep_tasks(lambda s: acts[s], SITES, tasks, n_threads=2)
    pd.testing.assert_frame_equal(serial.metrics, parallel.metrics)
    pd.testing.assert_frame_equal(serial.confusion, parallel.confusion)


def test_official_splits_fit_train_and_score_each_split_apart():
    acts, manifest = planted(seed=2)
    split = np.where(manifest.speaker.isin(["spk0", "spk2"]), "test",
                     np.where(manifest.speaker == "spk1", "dev", "train"))
    site = "encoder.blocks.1.resid_post"
    r = sweep_arrays(acts, manifest.label.to_numpy(), manifest.speaker.to_numpy(), [site], split=split,
                     n_permutations=9)
    acc = r.metrics[r.metrics.metric == "accuracy"].set_index("split")
    assert list(acc.index) == ["dev", "test"] and (acc.n_folds == 1).all()
    # the interval resamples the split's speakers; a split of one speaker falls back to its clips
    assert acc.ci_method.to_dict() == {"dev": "bootstrap over clips (a single speaker)",
                                       "test": "bootstrap over speakers"}
    assert (acc.ci_low <= acc.value).all() and (acc.value <= acc.ci_high).all()
    assert (acc.value == acc.fold_mean).all()  # one fit per split: pooled = its only fold
    tr = split == "train"
    probe = LinearProbe().fit(acts[site][tr], manifest.label[tr])
    for s in ("dev", "test"):
        te = split == s
        assert acc.loc[s, "value"] == np.mean(probe.predict(acts[site][te]) == manifest.label[te])
        assert acc.loc[s, "n_clips"] == te.sum()


def test_acoustic_pseudo_site_runs_through_the_same_sweep(tmp_path):
    acts, manifest = planted(seed=4)
    path = frame_store(tmp_path / "s.h5", acts, manifest)
    feats = pd.DataFrame(acts["encoder.blocks.2.resid_post"]).add_prefix("f")  # audio that carries the label
    feats.insert(0, "clip_id", manifest.clip_id)
    feats.sample(frac=1.0, random_state=0).to_csv(tmp_path / "acoustic.tsv", sep="\t", index=False)
    baseline = read_acoustic_features(tmp_path / "acoustic.tsv", manifest.clip_id)
    with pytest.raises(KeyError, match="ghost"):
        read_acoustic_features(tmp_path / "acoustic.tsv", ["ghost"])
    m = probe_sweep(path, manifest, SITES[:2], baseline=baseline, n_permutations=9)
    acc = m[m.metric == "accuracy"].set_index("site")
    assert list(acc.index) == [ACOUSTIC_SITE] + SITES[:2]
    assert acc.loc[ACOUSTIC_SITE, "depth"] == -1 and acc.loc[ACOUSTIC_SITE, "value"] > 0.5
    assert acc.loc[ACOUSTIC_SITE, "p_value"] == pytest.approx(0.1)


# --- representation statistics and the axis ----------------------------------------------------

def test_centring_removes_the_common_direction_that_makes_raw_cosines_one():
    acts, manifest = planted(seed=5, d=40, offset=60.0)
    X = acts["encoder.blocks.1.resid_post"]
    st = representation_stats(X, manifest.label, manifest.speaker).set_index(["statistic", "class_a", "class_b"])
    raw = st.loc["cosine_raw"].value
    centred = st.loc["cosine_centred"].value
    assert (raw > 0.99).all()  # the seed's "0.9999": all class means point along the shared offset
    assert (centred < 0.5).all() and centred.mean() < 0  # centred class means spread out
    noise = representation_stats(acts["encoder.blocks.0.resid_post"], manifest.label).set_index("statistic")
    signal_frac = st.loc["effect_fraction"].value.mean()
    assert signal_frac > noise.loc["effect_fraction", "value"].mean() + 0.3
    d = cohens_d(X, manifest.label.to_numpy(), "sad", "happy")
    assert st.loc[("max_abs_effect", "happy", "sad"), "value"] == pytest.approx(np.abs(d).max())


def test_concept_axis_generalises_to_held_out_speakers_only_where_planted():
    acts, manifest = planted(seed=6)
    y, g = manifest.label.to_numpy(), manifest.speaker.to_numpy()
    X = acts["encoder.blocks.2.resid_post"]
    axis = ConceptAxis("sad", "happy").fit(X, y, g)
    np.testing.assert_allclose(axis.direction_, diff_of_means(X, y, g, "sad", "happy"), rtol=1e-5)
    speakers, diffs = speaker_differences(X, y, g, "sad", "happy")
    np.testing.assert_allclose(diffs.mean(0), axis.direction_, rtol=1e-5)
    keep = np.isin(y, ["sad", "happy"])
    assert (axis.decision_function(X[y == "happy"]) > axis.decision_function(X[y == "sad"]).mean()).mean() > 0.9
    assert auroc([0, 1], [2, 3]) == 1.0 and auroc([0, 1], [0, 1]) == 0.5
    held = loso_auroc(X[keep], y[keep], g[keep], "sad", "happy")
    assert len(held) == 6 and held.auroc.mean() > 0.9
    noise = loso_auroc(acts["encoder.embed"][keep], y[keep], g[keep], "sad", "happy")
    assert abs(noise.auroc.mean() - 0.5) < 0.2
    task = classification_task("p", y[keep], g[keep], n_splits=3)
    rows = {r["metric"]: r["value"] for r in axis_metrics(X[keep], y[keep], g[keep], "sad", "happy",
                                                          [(f.train, f.test) for f in task.folds])}
    assert rows["interp_p_target_t0"] < 0.3 < 0.7 < rows["interp_p_target_t1"]
    assert rows["interp_monotone_fraction"] > 0.8


# --- frames and time --------------------------------------------------------------------------

def test_bin_frames_and_time_resolved_probe_find_the_planted_span(tmp_path):
    acts, manifest = planted(seed=7, n_speakers=5)
    path = frame_store(tmp_path / "f.h5", acts, manifest)
    with Store(path) as st:
        means, counts, used = bin_frames(st, "encoder.blocks.1.resid_post", 0.1, 4, chunk_rows=37)
        assert used == pytest.approx(0.1) and (counts == 5).all()
        np.testing.assert_allclose(means[3, 2], st.clip_frames("encoder.blocks.1.resid_post", 3)[10:15].mean(0),
                                   rtol=1e-5, atol=1e-5)
        rows = np.arange(len(manifest))[::-1]
        flipped, _, _ = bin_frames(st, "encoder.blocks.1.resid_post", 0.1, 4, rows=rows)
        np.testing.assert_allclose(flipped, means[rows])
        curves, rep = time_resolved(st, manifest, ["encoder.blocks.1.resid_post"], bin_s=0.1, max_bins=6,
                                    n_splits=5)
    acc = curves[curves.metric == "accuracy"].set_index("time_s").value
    assert list(np.round(acc.index, 2)) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    # each bin pooled like the sweep: value from the pooled predictions, the fold mean beside it
    assert {"value", "fold_mean"} <= set(curves.columns) and (curves.ci_method == "bootstrap over speakers").all()
    inside = acc[np.isclose(acc.index, 0.2) | np.isclose(acc.index, 0.3)]
    outside = acc.drop(index=inside.index)
    assert (inside > 0.6).all() and (outside < 0.45).all(), acc
    assert {"cosine_centred", "effect_fraction"} <= set(rep.statistic)
    # a frame-level target (2 Hz-style annotations) makes each bin a ridge probe of that target
    ft = pd.DataFrame([{"clip_id": c, "time_s": t, "value": v + 0.1 * t}
                       for c, v in zip(manifest.clip_id, manifest.valence) for t in (0.05, 0.15, 0.25, 0.35)])
    with Store(path) as st:
        dyn, _ = time_resolved(st, manifest, ["encoder.blocks.1.resid_post"], bin_s=0.1, max_bins=6, n_splits=5,
                               frame_targets=ft)
    r2 = dyn[dyn.metric == "r2"].set_index("time_s").value
    assert len(r2) == 4  # the annotations stop at 0.4 s
    assert (r2[r2.index > 0.15] > 0.15).all() and (r2[r2.index < 0.15] < 0.05).all(), r2


# --- patching outcomes --------------------------------------------------------------------------

def test_patch_outcomes_label_flipping_clips_and_feed_the_sweep():
    acts, manifest = planted(seed=8)
    rng = np.random.default_rng(0)
    sad = manifest[manifest.label == "sad"].reset_index(drop=True)
    pairs = pd.DataFrame({"pair_id": [f"p{i}" for i in range(len(sad))], "corrupt_clip": sad.clip_id,
                          "clean_clip": sad.clip_id})
    site = "encoder.blocks.1.resid_post"
    # flips exactly where the planted probe axis is strong: the first coordinate of the signal site
    strong = acts[site][manifest.label == "sad"][:, 0] > np.median(acts[site][manifest.label == "sad"][:, 0])
    effects = pd.DataFrame([{"pair_id": p, "direction": d, "site": site, "frame_start": w, "raw": raw, "clean": 2.0,
                             "corrupt": -1.0, "normalised": (raw + 1) / 3}
                            for p, s in zip(pairs.pair_id, strong) for d in ("denoising", "noising")
                            for w, raw in ((0, rng.uniform(-0.9, -0.1)), (10, 1.0 if s else -0.5))])
    estimated = effects.assign(method="attribution", raw=5.0)  # estimates of a patch never count as a flip
    out = patch_outcomes(pd.concat([effects.assign(method="exact"), estimated]), pairs)
    assert len(out) == len(sad) and out.flipped.to_numpy().tolist() == strong.tolist()
    tasks, skipped = outcome_tasks(out, manifest, n_splits=3, n_permutations=0)
    assert [t.name for t in tasks] == [f"flip@{site}"] and len(tasks[0].rows) == len(sad) and skipped == []
    m, _, _ = probe_task(acts[site], tasks[0], FitSettings())
    assert {r["metric"] for r in m} >= {"accuracy", "control_accuracy"}
    # the outcome is driven by a known feature: read off the site that carries it, not off noise
    accuracy = {s: next(r["value"] for r in probe_task(acts[s], tasks[0], FitSettings())[0] if r["metric"] == "accuracy")
                for s in (site, "encoder.embed")}
    assert accuracy[site] >= 0.7 and accuracy[site] - accuracy["encoder.embed"] >= 0.2, accuracy  # 0.75 vs 0.46
    # too few clips of an outcome: no task, a row saying why
    few = out.assign(flipped=[True] + [False] * (len(out) - 1))
    tasks, skipped = outcome_tasks(few, manifest, n_splits=3)
    assert tasks == [] and skipped[0]["probe"] == f"flip@{site}" and "1 clips flip" in skipped[0]["reason"]
    with pytest.raises(ValueError, match="direction"):
        patch_outcomes(effects, pairs, direction="sideways")


# --- tracing outcomes (video QA) -----------------------------------------------------------------
TRACED = ["decoder.embed", "decoder.blocks.0.resid_post", "decoder.blocks.1.resid_post"]  # stored and patched
FEATURE_SITE = TRACED[2]


def traced_questions(tmp_path, n_videos=6, per_video=4, seed=0):
    """(manifest, store, f): a video_qa manifest (ids such as 007; `speaker` = the video, as
    videoqa.build_manifest writes it) and a store of the questions' activations in which
    FEATURE_SITE carries a feature f of each question in its first coordinate and every site a
    per-video offset and noise."""
    rng = np.random.default_rng(seed)
    n, d = n_videos * per_video, 8
    video = np.repeat([f"v{k}" for k in range(n_videos)], per_video)
    ids = [f"{i:03d}" for i in range(n)]
    manifest = pd.DataFrame({"clip_id": ids, "dataset": "vqa", "path": [f"{v}.mp4" for v in video], "split": "all",
                             "label": "a", "speaker": video, "pair_key": np.nan, "text": "What happens?",
                             "start": np.nan, "end": np.nan, "duration": np.nan, "video_name": [f"{v}.mp4" for v in video]})
    manifest = read_manifest(write_manifest(manifest, tmp_path / "manifest.tsv"))
    signs = np.concatenate([rng.permutation(np.resize([1.0, -1.0], per_video)) for _ in range(n_videos)])
    f = signs * rng.uniform(1.0, 2.0, n)  # its sign decides, clear of 0; both signs on every video
    offsets = rng.normal(size=(n_videos, d))[np.arange(n) // per_video]
    acts = {s: rng.normal(size=(n, d)) + offsets for s in TRACED}
    acts[FEATURE_SITE][:, 0] += 3 * f
    with write_store(tmp_path / "store.h5", {s: d for s in TRACED}, ids, {"model_id": "planted", "frame_rate": 2.0},
                     storage_dtype="float32") as w:
        w.append({s: [(a[i] + rng.normal(0, 0.01, (3, d))).astype(np.float32) for i in range(n)]
                  for s, a in acts.items()})
    return manifest, tmp_path / "store.h5", f


def trace_tables(tmp_path, manifest, restored: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The trace stage's per-question table and pairs (its own layout, written and read back as the
    rule reads them): every counterfactual changed every answer (corrupt metric -1, clean 2), and
    denoising the visual slice at `site` under `counterfactual` restores it for the questions where
    restored[(counterfactual, site)] is True; nothing else restores anything."""
    from affectlens.patching.video import TRACE_COLUMNS, trace_pairs

    rows = []
    for i, (q, video) in enumerate(zip(manifest.clip_id, manifest.video_name)):
        for cf in ("reverse", "mean"):
            for direction in ("denoising", "noising"):
                for site in TRACED:
                    for slc in ("visual", "text"):
                        flip = direction == "denoising" and slc == "visual" and restored.get((cf, site), [False] * (i + 1))[i]
                        raw = 1.0 if flip else (-0.5 if direction == "denoising" else 1.5)
                        rows.append({"pair_id": f"{q}:{cf}", "question_id": q, "video": video, "counterfactual": cf,
                                     "site": site, "depth": TRACED.index(site) - 1, "slice": slc, "direction": direction,
                                     "n_positions": 4, "answer": "a", "alternative": "b", "gold": "a", "raw": raw,
                                     "clean": 2.0, "corrupt": -1.0, "normalised": (raw + 1.0) / 3.0})
    table = pd.DataFrame(rows, columns=TRACE_COLUMNS)
    table.to_csv(tmp_path / "per_question.tsv", sep="\t", index=False)
    trace_pairs(table).to_csv(tmp_path / "pairs.tsv", sep="\t", index=False)
    return read_table(tmp_path / "per_question.tsv"), read_table(tmp_path / "pairs.tsv")


def test_trace_outcomes_are_read_off_the_site_that_carries_them_and_not_off_noise(tmp_path):
    """Planted: under `reverse`, FEATURE_SITE restores the answers of the questions whose stored
    feature is positive; under `mean`, decoder.blocks.0 restores a random half. Over five draws the
    first is read off FEATURE_SITE every time (accuracy >= 0.9, the smallest permutation p) and off
    the noise sites at chance, as is the second everywhere; the (counterfactual, site) pairs where
    nothing flips get `skipped` rows; folds are grouped by video."""
    cells = []
    for seed in range(5):
        folder = tmp_path / str(seed)
        folder.mkdir()
        manifest, store, f = traced_questions(folder, seed=seed)
        coin = np.random.default_rng(seed + 100).random(len(f)) < 0.5
        table, pairs = trace_tables(folder, manifest, {("reverse", FEATURE_SITE): f > 0, ("mean", TRACED[1]): coin})
        outcomes = trace_outcomes(table, pairs)
        tasks, skipped = outcome_tasks(outcomes, manifest, n_splits=4, wording=TRACE)
        out = run_trace_outcome_probe(store, manifest, table, pairs, {"n_permutations": 49}, folder / "trace.tsv")
        written = pd.read_csv(folder / "trace.tsv", sep="\t")
        assert len(written) == len(out) and set(written.probe) == {t.name for t in tasks} | {r["probe"] for r in skipped}
        cells.append(written[written.metric == "accuracy"].assign(seed=seed))
    # the last draw in detail: ids as the manifest's, one outcome per question x counterfactual x site
    assert set(table.question_id) == set(pairs.clean_clip) == set(manifest.clip_id) and "007" in set(pairs.clean_clip)
    assert len(outcomes) == len(f) * 2 * len(TRACED)
    got = outcomes[(outcomes.counterfactual == "reverse") & (outcomes.site == FEATURE_SITE)].set_index("clip_id")
    assert got.flipped.loc[manifest.clip_id].tolist() == (f > 0).tolist()
    assert [t.name for t in tasks] == [f"flip[reverse]@{FEATURE_SITE}", f"flip[mean]@{TRACED[1]}"]
    videos = manifest.speaker.to_numpy()
    assert set(tasks[0].groups) == set(videos) and (tasks[0].groups == videos[tasks[0].rows]).all()
    assert all(not set(tasks[0].groups[k.train]) & set(tasks[0].groups[k.test]) for k in tasks[0].folds)
    assert len(skipped) == 4 and all("0 questions flip and 24 hold over 6 videos" in r["reason"] for r in skipped)
    # every draw: the feature's probe reads it off its site; elsewhere, and for the coin, chance
    acc = pd.concat(cells)
    feature = (acc.probe == f"flip[reverse]@{FEATURE_SITE}") & (acc.site == FEATURE_SITE)
    assert (acc.value[feature] >= 0.9).all() and np.allclose(acc.p_value[feature], 1 / 50), acc[feature]
    noise = acc[~feature]
    assert len(noise) == 5 * 5 and abs(noise.value.mean() - 0.5) < 0.1, noise
    assert noise.p_value.median() >= 0.3 and (noise.p_value <= 0.05).mean() <= 0.2, noise


def test_trace_outcome_probe_says_why_when_too_few_questions_flip(tmp_path, caplog):
    """Too few questions (the draw's `trace.n_questions`): every probe is a `skipped` row with the
    counts and the setting to raise, and the log says so; a table without any denoising outcome
    gets one row saying that; questions the manifest lacks are refused by name."""
    manifest, store, f = traced_questions(tmp_path, n_videos=3, per_video=1)
    table, pairs = trace_tables(tmp_path, manifest, {("reverse", FEATURE_SITE): f > 0})
    with caplog.at_level("INFO", logger="affectlens.probes.outcomes"):
        run_trace_outcome_probe(store, manifest, table, pairs, {"n_permutations": 9}, tmp_path / "few.tsv")
    written = pd.read_csv(tmp_path / "few.tsv", sep="\t")
    assert len(written) == 2 * len(TRACED) and (written.metric == "skipped").all()
    assert written.reason.str.contains("questions flip and").all() and written.reason.str.contains("over 3 videos").all()
    assert written.reason.str.contains("raise trace.n_questions").all()
    assert "trace.n_questions" in caplog.text
    run_trace_outcome_probe(store, manifest, table[table.direction == "noising"], pairs, None, tmp_path / "none.tsv")
    written = pd.read_csv(tmp_path / "none.tsv", sep="\t")
    assert written.metric.tolist() == ["skipped"]
    assert written.reason.tolist() == ["no denoising tracing outcome in the per-question table"]
    other = pairs.assign(clean_clip="q9", corrupt_clip="q9")
    with pytest.raises(KeyError, match="patched questions are not in the manifest, e.g. \\['q9'\\]"):
        run_trace_outcome_probe(store, manifest, table, other, None, tmp_path / "bad.tsv")


# --- the stage and its figures ------------------------------------------------------------------

def test_run_probe_study_writes_every_table_and_figure(tmp_path):
    acts, manifest = planted(seed=9, n_speakers=4)
    path = frame_store(tmp_path / "s.h5", acts, manifest)
    feats = pd.DataFrame(acts["encoder.blocks.2.resid_post"][:, :4]).add_prefix("f")
    feats.insert(0, "clip_id", manifest.clip_id)
    feats.to_csv(tmp_path / "acoustic.tsv", sep="\t", index=False)
    names = ["sweep", "confusion", "folds", "representation", "time_resolved"]
    outputs = {k: tmp_path / "out" / f"{k}.tsv" for k in names}
    outputs |= {k: tmp_path / "out" / f"{k}.png" for k in ("curve", "confusion_plot", "projection", "time_curve")}
    params = {"n_permutations": 4, "n_splits": 2, "regression_columns": ["valence"], "n_boot": 50,
              "time_resolved": {"bin_s": 0.2, "max_bins": 3}}
    sweep = run_probe_study(path, manifest, params, "label", outputs, pairs=[["sad", "happy"]],
                            readout_site="encoder.blocks.1.resid_post", acoustic_path=tmp_path / "acoustic.tsv")
    for k, p in outputs.items():
        assert p.exists() and p.stat().st_size > 0, k
        if p.suffix == ".png":
            assert p.read_bytes()[:4] == b"\x89PNG"
    assert set(sweep.probe) == {"label", "sad_vs_happy", "valence"}
    assert {"classification", "regression", "axis"} == set(sweep.kind)
    assert (sweep.groupby(["site", "probe", "split", "metric"]).size() == 1).all()  # tidy: one row per key
    rep = pd.read_csv(outputs["representation"], sep="\t")
    assert rep.statistic.str.endswith("_frame_std").any() and rep.time_s.notna().any()
    assert set(pd.read_csv(outputs["time_resolved"], sep="\t").site) == {"encoder.blocks.1.resid_post"}
