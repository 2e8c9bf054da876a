"""The sweep's headline numbers come from the pooled out-of-fold predictions (issue 21, item 1).

Known answer: three speakers held out in turn (one fold each), a rare class missed entirely in one
fold. The mean of the per-fold macro-F1 values then falls 0.139 below the macro-F1 of the pooled
confusion matrix (Forman & Scholz 2010); the sweep must report the pooled one as `value`, the
fold mean beside it, pool the permutation null the same way, and resample speakers for its
interval."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from affectlens.probes.regression import (
    RidgeProbe,
    group_moments,
    metrics_from_moments,
    regression_metrics,
)
from affectlens.probes.stats import (
    confusion,
    group_bootstrap_sums,
    group_confusions,
    metrics_from_confusion,
    percentile_interval,
)
from affectlens.probes.sweep import (
    FitSettings,
    _classify,
    classification_task,
    grouped_splits,
    probe_task,
    regression_task,
    sweep_arrays,
)

SITE = "encoder.blocks.0.resid_post"
CLASSES = ("angry", "neutral")  # codes 0, 1


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with threadpool_limits(1):  # tiny matrices: threads only fight over the cores
        yield


# speaker -> [(true, predicted, clips)]: what each held-out speaker's clips are and what the probe
# says. The activations show the *predicted* class; every training side holds at least 5 true
# clips per shown class for each mislabelled one, so the probe answers the shown class.
PLAN = {
    "A": [("angry", "angry", 6), ("neutral", "neutral", 6)],
    "B": [("angry", "neutral", 1), ("neutral", "neutral", 11)],  # the rare class missed: its F1 = 0
    "C": [("angry", "angry", 5), ("neutral", "angry", 1), ("neutral", "neutral", 6)],
}

# By hand, per fold (F1 = 2 TP / (2 TP + FP + FN); macro = mean over the classes present):
#   A: angry 12/12, neutral 12/12                            -> 1
#   B: angry 0 (TP 0),      neutral 22/(22 + 1)   = 22/23     -> 11/23
#   C: angry 10/(10 + 1) = 10/11, neutral 12/(12 + 1) = 12/13 -> 131/143
# Pooled confusion (rows true angry, neutral): [[11, 1], [1, 23]]
#   angry 22/24 = 11/12, neutral 46/48 = 23/24                -> 15/16
FOLD_F1 = {"A": Fraction(1), "B": Fraction(11, 23), "C": Fraction(131, 143)}
POOLED_F1 = Fraction(15, 16)
FOLD_MEAN_F1 = sum(FOLD_F1.values()) / 3  # 0.79811
GAP = 0.13939  # POOLED_F1 - FOLD_MEAN_F1
# balanced accuracy: folds 1, (0 + 1)/2, (1 + 6/7)/2; pooled (11/12 + 23/24)/2
FOLD_BACC = {"A": Fraction(1), "B": Fraction(1, 2), "C": Fraction(13, 14)}
POOLED_BACC = Fraction(15, 16)
POOLED_CM = np.array([[11, 1], [1, 23]])


def planted_clips(d: int = 2, seed: int = 0):
    """(X [clip, d], labels, speakers, shown class) of PLAN; X = 3 x one-hot of the shown class
    plus small noise."""
    rng = np.random.default_rng(seed)
    labels, speakers, shown = [], [], []
    for spk, rows in PLAN.items():
        for true, pred, n in rows:
            labels += [true] * n
            shown += [CLASSES.index(pred)] * n
            speakers += [spk] * n
    shown = np.array(shown)
    X = np.zeros((len(shown), d))
    X[np.arange(len(shown)), shown] = 3.0
    X += rng.normal(0, 0.05, X.shape)
    return X, np.array(labels), np.array(speakers), shown


def test_the_hand_computed_numbers_are_what_the_metric_code_gives():
    X, y, g, shown = planted_clips()
    codes = np.searchsorted(CLASSES, y)
    per_fold = {s: metrics_from_confusion(confusion(codes[g == s], shown[g == s], 2)) for s in PLAN}
    for s in PLAN:
        assert per_fold[s]["macro_f1"] == pytest.approx(float(FOLD_F1[s]), abs=1e-12)
        assert per_fold[s]["balanced_accuracy"] == pytest.approx(float(FOLD_BACC[s]), abs=1e-12)
    np.testing.assert_array_equal(confusion(codes, shown, 2), POOLED_CM)
    assert metrics_from_confusion(POOLED_CM)["macro_f1"] == pytest.approx(float(POOLED_F1), abs=1e-12)
    # the gap the issue is about: 15/16 - (1 + 11/23 + 131/143) / 3 = 0.13939
    assert float(POOLED_F1 - FOLD_MEAN_F1) == pytest.approx(GAP, abs=1e-5)


def test_sweep_reports_the_pooled_value_and_the_fold_mean_beside_it():
    X, y, g, shown = planted_clips()
    r = sweep_arrays({SITE: X}, y, g, [SITE], n_splits=3, n_permutations=19, seed=0)
    m = r.metrics.set_index("metric")
    # the probe answers the shown class on every held-out clip: the planted confusion matrix
    conf = r.confusion.pivot(index="true", columns="predicted", values="count").loc[list(CLASSES), list(CLASSES)]
    np.testing.assert_array_equal(conf.to_numpy(), POOLED_CM)
    folds = r.folds[r.folds.metric == "macro_f1"].set_index("test_speakers")["value"]
    assert folds.to_dict() == pytest.approx({s: float(f) for s, f in FOLD_F1.items()}, abs=1e-12)

    assert m.loc["macro_f1", "value"] == pytest.approx(float(POOLED_F1), abs=1e-12)
    assert m.loc["macro_f1", "fold_mean"] == pytest.approx(float(FOLD_MEAN_F1), abs=1e-12)
    assert m.loc["macro_f1", "value"] - m.loc["macro_f1", "fold_mean"] == pytest.approx(GAP, abs=1e-5)
    assert m.loc["balanced_accuracy", "value"] == pytest.approx(float(POOLED_BACC), abs=1e-12)
    assert m.loc["balanced_accuracy", "fold_mean"] == pytest.approx(float(sum(FOLD_BACC.values()) / 3), abs=1e-12)
    # equal folds: pooled accuracy is the mean of the fold accuracies
    assert m.loc["accuracy", "value"] == pytest.approx(34 / 36, abs=1e-12)
    assert m.loc["accuracy", "fold_mean"] == pytest.approx(34 / 36, abs=1e-12)
    assert (m.loc[["accuracy", "macro_f1"], "value_method"] == "pooled out-of-fold predictions").all()
    assert (m.loc[["accuracy", "macro_f1"], "ci_method"] == "bootstrap over speakers").all()
    assert list(r.metrics.columns[r.metrics.columns.get_loc("value"):][:2]) == ["value", "fold_mean"]
    # chance from the pooled test clips: 24 of 36 are neutral
    assert m.loc["accuracy", "chance"] == pytest.approx(24 / 36)


def test_speaker_bootstrap_draws_whole_speakers():
    """With three speakers, every bootstrap draw pools a multiset of three speakers' confusion
    matrices; the interval's ends are pooled macro-F1 values of such multisets."""
    X, y, g, shown = planted_clips()
    r = sweep_arrays({SITE: X}, y, g, [SITE], n_splits=3, seed=0)
    row = r.metrics.set_index("metric").loc["macro_f1"]
    codes = np.searchsorted(CLASSES, y)
    per_speaker = {s: confusion(codes[g == s], shown[g == s], 2) for s in PLAN}
    reachable = {round(float(metrics_from_confusion(sum(per_speaker[s] for s in combo))["macro_f1"]), 12)
                 for combo in itertools.combinations_with_replacement(PLAN, 3)}
    assert round(row.ci_low, 12) in reachable and round(row.ci_high, 12) in reachable
    assert row.ci_low < row.value <= row.ci_high
    assert row.ci_low == pytest.approx(float(FOLD_F1["B"]), abs=1e-12)  # B drawn three times: 11/23


def test_permutation_null_is_pooled_like_the_observed_value():
    X, y, g, _ = planted_clips()
    task = classification_task("label", y, g, n_splits=3, n_permutations=19, seed=0)
    settings = FitSettings()
    rows, _, _ = probe_task(X, task, settings)
    cm, _, _ = _classify(X, task, settings)
    for metric in ("macro_f1", "accuracy", "balanced_accuracy", "weighted_f1"):
        row = next(r for r in rows if r["metric"] == metric)
        null = metrics_from_confusion(cm[2:].sum(1))[metric]  # rows 2..: the permutations, pooled over folds
        assert len(null) == 19
        assert row["p_value"] == pytest.approx((1 + np.sum(null >= row["value"] - 1e-12)) / 20)
        assert row["null_mean"] == pytest.approx(null.mean())
        assert row["p_resolution"] == pytest.approx(0.05)


def test_regression_value_is_the_r2_of_the_pooled_out_of_fold_predictions():
    rng = np.random.default_rng(1)
    g = np.repeat([f"s{i}" for i in range(6)], 10)
    X = rng.normal(size=(60, 5)) + rng.normal(0, 1.0, (6, 5))[np.searchsorted(np.unique(g), g)]
    t = X @ np.array([1.0, -0.5, 0.0, 0.0, 0.3]) + rng.normal(0, 0.8, 60)
    task = regression_task("valence", t, g, n_splits=3, seed=0, control=False)
    rows, _, fold_rows = probe_task(X, task, FitSettings())
    pred = np.full(60, np.nan)
    per_fold = []
    for tr, te in grouped_splits(np.searchsorted(np.quantile(t, [0.25, 0.5, 0.75]), t), g, 3, 0):
        pred[te] = RidgeProbe().fit(X[tr], t[tr], groups=g[tr]).predict(X[te])
        per_fold.append(regression_metrics(t[te], pred[te]))
    pooled = regression_metrics(t, pred)
    for metric in ("r2", "ccc", "pearson"):
        row = next(r for r in rows if r["metric"] == metric)
        assert row["value"] == pytest.approx(float(pooled[metric]), abs=1e-9)
        assert row["fold_mean"] == pytest.approx(np.mean([f[metric] for f in per_fold]), abs=1e-9)
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
    assert row["value"] != pytest.approx(row["fold_mean"], abs=1e-6)  # the two do differ here


# --- the additive statistics behind the speaker bootstrap ----------------------------------------

def test_group_bootstrap_draws_count_whole_groups():
    sums = group_bootstrap_sums(np.eye(5), n_boot=400, seed=3)  # row b: how often each group was drawn
    assert sums.shape == (400, 5)
    assert (sums == np.round(sums)).all() and (sums >= 0).all() and (sums.sum(1) == 5).all()
    assert abs(sums.mean() - 1.0) < 0.05
    np.testing.assert_array_equal(sums, group_bootstrap_sums(np.eye(5), n_boot=400, seed=3))
    low, high = percentile_interval(np.array([[np.nan, 1.0], [np.nan, 2.0], [np.nan, 3.0]]))
    assert np.isnan(low[0]) and np.isnan(high[0]) and 1.0 <= low[1] <= high[1] <= 3.0


def test_per_group_statistics_add_up_to_the_pooled_metrics():
    rng = np.random.default_rng(0)
    groups = rng.choice(["x", "y", "z", "w"], 200)
    true, pred = rng.integers(0, 3, 200), rng.integers(0, 3, (2, 200))
    per_group = group_confusions(np.stack([true, true]), pred, groups, 3)
    assert per_group.shape == (4, 2, 3, 3)
    np.testing.assert_array_equal(per_group.sum(0), confusion(true, pred, 3))
    np.testing.assert_array_equal(per_group[1, 0], confusion(true[groups == "x"], pred[0, groups == "x"], 3))
    t = rng.normal(5.0, 2.0, (2, 200))
    p = 0.7 * t + rng.normal(0, 1.0, (2, 200)) + 0.4
    moments = group_moments(t, p, groups)
    assert moments.shape == (4, 2, 6)
    direct, summed = regression_metrics(t, p), metrics_from_moments(moments.sum(0))
    for metric in ("r2", "ccc", "pearson"):
        np.testing.assert_allclose(summed[metric], direct[metric], atol=1e-12)
    keep = groups != "w"  # any set of groups: its own metrics
    sub = metrics_from_moments(moments[[1, 2, 3]].sum(0))  # x, y, z in np.unique order w, x, y, z
    np.testing.assert_allclose(sub["r2"], regression_metrics(t[:, keep], p[:, keep])["r2"], atol=1e-12)


def test_fold_values_stay_in_the_folds_table():
    X, y, g, _ = planted_clips()
    r = sweep_arrays({SITE: X}, y, g, [SITE], n_splits=3, seed=0)
    per_fold = r.folds.pivot(index="test_speakers", columns="metric", values="value")
    means = per_fold.mean()
    m = r.metrics.set_index("metric")
    for metric in m.index:
        assert m.loc[metric, "fold_mean"] == pytest.approx(means[metric], abs=1e-12)
        assert m.loc[metric, "fold_std"] == pytest.approx(per_fold[metric].std(ddof=1), abs=1e-12)
    assert isinstance(r.folds, pd.DataFrame) and set(r.folds.test_speakers) == set(PLAN)
