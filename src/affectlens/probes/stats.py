"""Honest statistics for probes: chance levels, metrics from confusion matrices, the
within-speaker permutation test, and intervals.

The permutation null for speaker-grouped cross-validation shuffles labels among the clips of each
speaker. That keeps every speaker's label mix (and so any speaker-label confound, and the
stratified folds) as observed, and breaks only the clip-level link between activation and label.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats as sps


def chance_levels(y_test, n_classes: int | None = None) -> dict[str, float]:
    """{"majority": share of the most frequent class in `y_test`, "uniform": 1 / K}.

    `majority` is what always answering the commonest test class scores: the bar for accuracy.
    `uniform` is the bar for balanced accuracy and (balanced classes) macro-F1. K defaults to the
    number of distinct classes in `y_test`."""
    y = np.asarray(y_test)
    if y.size == 0:
        raise ValueError("chance_levels: y_test is empty")
    _, counts = np.unique(y, return_counts=True)
    k = len(counts) if n_classes is None else n_classes
    return {"majority": float(counts.max() / counts.sum()), "uniform": 1.0 / k}


def confusion(true_codes: np.ndarray, pred_codes: np.ndarray, n_classes: int) -> np.ndarray:
    """[..., K, K] counts (rows true, columns predicted); leading axes of `pred_codes` are
    batched (one confusion matrix per row of predictions)."""
    pred = np.asarray(pred_codes)
    true = np.broadcast_to(np.asarray(true_codes), pred.shape)
    kk = n_classes * n_classes
    flat = (true * n_classes + pred).reshape(-1, pred.shape[-1])
    flat = flat + kk * np.arange(len(flat))[:, None]  # one bin range per row of predictions
    out = np.bincount(flat.ravel(), minlength=kk * len(flat))
    return out.reshape(*pred.shape[:-1], n_classes, n_classes)


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, balanced_accuracy, macro_f1 and weighted_f1 of [..., K, K] confusion matrices
    (rows true, columns predicted; real-valued expected confusions are fine too).

    Classes absent from the true labels are left out of the balanced accuracy and macro-F1
    averages (as scikit-learn does for balanced accuracy); an unpredicted class has F1 = 0.
    weighted_f1 weights each class's F1 by its support (MELD's customary metric)."""
    cm = np.asarray(cm, dtype=np.float64)
    diag = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(-1)
    predicted = cm.sum(-2)
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, diag / np.where(present, support, 1), 0.0)
        precision = np.where(predicted > 0, diag / np.where(predicted > 0, predicted, 1), 0.0)
        both = precision + recall
        f1 = np.where(both > 0, 2 * precision * recall / np.where(both > 0, both, 1), 0.0)
    n_present = present.sum(-1)
    return {
        "accuracy": diag.sum(-1) / cm.sum((-2, -1)),
        "balanced_accuracy": (recall * present).sum(-1) / n_present,
        "macro_f1": (f1 * present).sum(-1) / n_present,
        "weighted_f1": (f1 * support).sum(-1) / support.sum(-1),
    }


def trivial_scores(test_codes, n_classes: int) -> dict[str, float]:
    """Chance, per metric: the best score of a predictor that never looks at the clip, among
    always answering the commonest test class, guessing uniformly, and guessing with the test
    class frequencies (scored on their expected confusion matrices). Accuracy's bar is then the
    majority share; balanced accuracy's is 1/K; weighted-F1's is max(p * 2p / (1 + p), sum p_k^2)
    with p the majority share."""
    counts = np.bincount(np.asarray(test_codes), minlength=n_classes).astype(np.float64)
    if counts.sum() == 0:
        raise ValueError("trivial_scores: no test clips")
    prior = counts / counts.sum()
    guesses = np.stack([np.eye(n_classes)[np.argmax(counts)], np.full(n_classes, 1.0 / n_classes), prior])
    expected = counts[None, :, None] * guesses[:, None, :]  # [predictor, true, predicted]
    return {m: float(v.max()) for m, v in metrics_from_confusion(expected).items()}


def within_group_permutations(y, groups, n_permutations: int, rng: np.random.Generator) -> np.ndarray:
    """[n_permutations, n] copies of `y`, each shuffled among the rows of every group."""
    y = np.asarray(y)
    groups = np.asarray(groups)
    out = np.empty((n_permutations, len(y)), dtype=y.dtype)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        out[:, idx] = rng.permuted(np.broadcast_to(y[idx], (n_permutations, len(idx))), axis=1)
    if n_permutations and all(len(np.unique(y[groups == g])) < 2 for g in np.unique(groups)):
        warnings.warn("every group holds a single label, so the within-group permutation null "
                      "cannot move any label (p = 1): labels are confounded with the grouping",
                      stacklevel=2)
    return out


def permutation_p_value(observed: float, null: np.ndarray) -> tuple[float, float]:
    """(p, resolution): p = (1 + #{null >= observed}) / (1 + n_perm), never 0; the smallest p a
    test with n_perm permutations can give is its resolution 1 / (1 + n_perm). Ties count as
    at least as extreme (a tolerance of 1e-12 absorbs floating-point noise)."""
    null = np.asarray(null, dtype=np.float64).ravel()
    n = len(null)
    if n == 0:
        return float("nan"), float("nan")
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + n)), 1.0 / (1 + n)


def fold_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over cross-validation folds.

    Descriptive: folds share training clips, so this interval is narrower than a true sampling
    interval; use the permutation p-value for the question "is there signal at all"."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = float(sps.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - half, m + half


def group_confusions(true_codes, pred_codes, groups, n_classes: int) -> np.ndarray:
    """[G, ..., K, K] confusion matrices of each group's clips (groups in `np.unique` order);
    leading axes of `pred_codes` [..., n] are batched as in `confusion`."""
    pred = np.asarray(pred_codes)
    true = np.broadcast_to(np.asarray(true_codes), pred.shape)
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    G, K = int(g.max()) + 1, n_classes
    lead = pred.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    flat = ((g[None] * rows + np.arange(rows)[:, None]) * K + true.reshape(rows, -1)) * K + pred.reshape(rows, -1)
    return np.bincount(flat.ravel(), minlength=G * rows * K * K).reshape(G, *lead, K, K)


def group_bootstrap_sums(per_group: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """[n_boot, ...] sums of additive per-group statistics [G, ...] (confusion matrices, moments)
    over G groups drawn with replacement: the speaker-level bootstrap of a pooled metric. The
    draws depend on G, `n_boot` and `seed` only, so every statistic sharing them sees the same
    resamples."""
    per_group = np.asarray(per_group, dtype=np.float64)
    G = per_group.shape[0]
    draws = np.random.default_rng(seed).integers(0, G, (n_boot, G))
    weights = np.zeros((n_boot, G))
    np.add.at(weights, (np.arange(n_boot)[:, None], draws), 1.0)
    return (weights @ per_group.reshape(G, -1)).reshape(n_boot, *per_group.shape[1:])


def percentile_interval(draws, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) percentile interval over the first axis of `draws`, NaN draws left out
    (a draw without any clip of some class, say); NaN where every draw is NaN."""
    draws = np.asarray(draws, dtype=np.float64)
    alpha = 100 * (1.0 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
        low, high = np.nanpercentile(draws, [alpha, 100 - alpha], axis=0)
    return low, high


def bootstrap_ci(y_true, y_pred, metric: Callable[[np.ndarray, np.ndarray], float], groups=None,
                 n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, low, high): percentile bootstrap of `metric(y_true, y_pred)` over clips, or over
    whole groups (speakers) when `groups` is given, which respects clips of one speaker being
    correlated."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"bootstrap_ci: y_true has {len(y_true)} rows, y_pred {len(y_pred)}")
    rng = np.random.default_rng(seed)
    if groups is None:
        units = [np.array([i]) for i in range(len(y_true))]
    else:
        groups = np.asarray(groups)
        units = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    draws = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([units[i] for i in rng.integers(0, len(units), len(units))])
        draws[b] = metric(y_true[idx], y_pred[idx])
    alpha = 1.0 - confidence
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return float(metric(y_true, y_pred)), float(low), float(high)
