"""The layer sweep: every probe of a study at every site, held out by speaker, with a
permutation test and a random-label control, in one tidy table.

A *task* is one probe run at every site: a multiclass probe of the label column, a binary probe
of a concept pair (sad vs happy), a ridge probe of a continuous column (valence), or a probe of
patching outcomes. A task fixes its clips, its folds and its label rows once:
[observed, control, permutation 1..n], so every site sees the same folds and the same null.

Held out how: speaker-grouped stratified folds (no speaker on both sides), or a dataset's official
splits (fit on train, scored on each other split, each reported as its own `split`).

Metrics per split: `value` is the metric of the pooled out-of-fold predictions (for classification,
of the confusion matrix summed over folds), as published SER numbers are; the mean of the per-fold
values, a biased estimate for F1 (Forman & Scholz 2010: well below the pooled one when a fold misses
a rare class) and weighted by fold rather than by clip, stands beside it as `fold_mean`, and the
per-fold values themselves are the `folds` table. The interval is a percentile
bootstrap of the pooled value that resamples whole speakers of the test clips (clips, when a split
holds a single speaker; `ci_method` says which), with the fitted probes held fixed.

Significance: labels are shuffled among the clips of each speaker (and within each official
split, so the training side keeps its class counts), and the whole fit is repeated per shuffle;
p = (1 + #{null >= observed}) / (1 + n), never below its resolution 1 / (1 + n), each permuted
label row's out-of-fold predictions pooled exactly as the observed ones.
The control task (one such shuffle, refit like the rest) gives selectivity = score - control.
Within one fit, the observed labels, the control labels and all permuted labels are fit together
(`fit_multinomial`, `ridge_cv`), each label row by its own solver: the null distribution comes
from exactly the procedure that produced the observed score.

Sites are read once each (in row chunks) and fit in parallel threads, up to `n_threads`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold
from threadpoolctl import threadpool_limits

from affectlens.io import atomic_path
from affectlens.models.sites import parse_site
from affectlens.probes.baseline import is_pseudo_site
from affectlens.probes.linear import LinearProbe, fit_multinomial, standardise
from affectlens.probes.regression import (
    DEFAULT_ALPHAS,
    REGRESSION_METRICS,
    group_moments,
    metrics_from_moments,
    regression_metrics,
    ridge_cv,
)
from affectlens.probes.stats import (
    confusion,
    group_bootstrap_sums,
    group_confusions,
    metrics_from_confusion,
    percentile_interval,
    permutation_p_value,
    trivial_scores,
    within_group_permutations,
)
from affectlens.store import Store

log = logging.getLogger(__name__)

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1")
CV = "cv"  # the `split` of cross-validated rows
_LABEL_BATCH = 64  # label rows fit together, at most
_BATCH_BYTES = 2**28  # and no more than this much solver state (logits, L-BFGS history) per batch
_READ_ROWS = 8192  # pooled rows read from HDF5 at a time
_BOUNDS = {**{m: (0.0, 1.0) for m in METRICS}, "control_accuracy": (0.0, 1.0), "r2": (-np.inf, 1.0),
           "ccc": (-1.0, 1.0), "pearson": (-1.0, 1.0), "control_r2": (-np.inf, 1.0)}


class SweepResult(NamedTuple):
    metrics: pd.DataFrame    # one row per site x probe x split x metric
    confusion: pd.DataFrame  # one row per site x probe x split x true class x predicted class (summed over folds)
    folds: pd.DataFrame      # one row per site x probe x split x fold x metric, with the fold's test speakers


@dataclass(frozen=True)
class Fold:
    split: str         # "cv" for cross-validation folds, else the official split scored ("dev", "test")
    index: int         # fold number within the split
    fit: int           # folds with the same fit share one training run (official splits share train)
    train: np.ndarray  # positions within the task's clips
    test: np.ndarray


@dataclass
class Task:
    """One probe, run at every site. Build with `classification_task` / `regression_task`."""

    name: str
    kind: str                  # "classification" | "regression"
    rows: np.ndarray           # [clip] rows of the site matrices this task reads
    groups: np.ndarray         # [clip] speakers
    folds: list[Fold]
    label_rows: np.ndarray     # [1 + control + n_permutations, clip]: class codes, or target values
    control: bool
    n_permutations: int
    classes: np.ndarray | None = None     # classification: the class of each code
    pair: tuple | None = None              # binary concept pairs: (source, target), enables the axis checks
    chance: dict = field(default_factory=dict)  # split -> metric -> chance level

    @property
    def target(self) -> np.ndarray:
        return self.classes[self.label_rows[0]] if self.kind == "classification" else self.label_rows[0]

    @property
    def primary(self) -> str:
        return "accuracy" if self.kind == "classification" else "r2"

    @property
    def metric_names(self) -> tuple[str, ...]:
        return METRICS if self.kind == "classification" else REGRESSION_METRICS


def grouped_splits(y, groups, n_splits: int = 4, seed: int = 0,
                   unit: str = "speakers") -> list[tuple[np.ndarray, np.ndarray]]:
    """Folds with every group (`unit`: speakers, songs, ...) wholly on one side, stratified by `y`
    (None: unstratified, e.g. for regression targets). `n_splits` is capped at the number of groups,
    with a warning. Raises if any group lands on both sides of a fold."""
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"grouped cross-validation needs at least 2 {unit}; the clips hold {n_groups}")
    if n_splits < 2:
        raise ValueError(f"n_splits={n_splits}: cross-validation needs at least 2 folds")
    if n_splits > n_groups:
        warnings.warn(f"n_splits={n_splits} is more than the {n_groups} {unit}; using {n_groups} folds",
                      stacklevel=2)
        n_splits = n_groups
    if y is None:
        cv, y = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed), np.zeros(len(groups))
    else:
        cv, y = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed), np.asarray(y)
    splits = [(tr, te) for tr, te in cv.split(np.zeros((len(y), 1)), y, groups)]
    tested = np.zeros(len(y), dtype=int)
    for k, (tr, te) in enumerate(splits):
        shared = set(groups[tr]) & set(groups[te])
        if shared:
            raise RuntimeError(f"fold {k}: {unit} {sorted(map(str, shared))[:5]} are on both sides")
        tested[te] += 1
    if not np.all(tested == 1):
        raise RuntimeError("the folds do not test every clip exactly once")
    return splits


def official_folds(split: np.ndarray, train: str = "train") -> list[Fold]:
    """One fold per split value other than `train`, all sharing one fit on the `train` clips."""
    split = np.asarray(split).astype(str)
    tr = np.flatnonzero(split == train)
    if len(tr) == 0:
        raise ValueError(f"official splits need clips with split = {train!r}; the split column holds "
                         f"{sorted(set(split.tolist()))}")
    order = {"dev": 0, "validation": 0, "val": 0, "test": 1}
    names = sorted((s for s in set(split.tolist()) if s != train), key=lambda s: (order.get(s, 2), s))
    if not names:
        raise ValueError("official splits need at least one split besides train to score on")
    return [Fold(s, 0, 0, tr, np.flatnonzero(split == s)) for s in names]


def has_official_splits(split_values) -> bool:
    """True when a split column names a train split and at least one other (MELD's train/dev/test)."""
    values = set(pd.Series(split_values).dropna().astype(str))
    return "train" in values and len(values - {"train"}) > 0


def _cv_folds(strata, groups, n_splits: int, seed: int) -> list[Fold]:
    return [Fold(CV, f, f, tr, te) for f, (tr, te) in enumerate(grouped_splits(strata, groups, n_splits, seed))]


def _label_rows(values, perm_groups, control: bool, n_permutations: int, seed: int) -> np.ndarray:
    if n_permutations < 0:
        raise ValueError(f"n_permutations={n_permutations}: use 0 (no test) or a positive count")
    ss = np.random.SeedSequence(seed)
    control_rng, perm_rng = (np.random.default_rng(s) for s in ss.spawn(2))
    rows = [np.asarray(values)[None]]
    if control:
        rows.append(within_group_permutations(values, perm_groups, 1, control_rng))
    rows.append(within_group_permutations(values, perm_groups, n_permutations, perm_rng))
    return np.concatenate(rows)


def _check_task_inputs(name, target, groups, rows, split):
    target, groups = np.asarray(target), np.asarray(groups)
    if len(target) != len(groups):
        raise ValueError(f"probe {name!r}: labels has {len(target)} rows but groups has {len(groups)}")
    rows = np.arange(len(target)) if rows is None else np.asarray(rows)
    if len(rows) != len(target):
        raise ValueError(f"probe {name!r}: {len(rows)} rows for {len(target)} labels")
    if split is not None and len(split) != len(target):
        raise ValueError(f"probe {name!r}: split has {len(split)} rows for {len(target)} labels")
    return target, groups, rows


def classification_task(name: str, labels, groups, rows=None, split=None, n_splits: int = 4, seed: int = 0,
                        n_permutations: int = 0, control: bool = True, pair: tuple | None = None) -> Task:
    """A classification probe of `labels` (one per clip) for clips `rows` of the site matrices
    (default: all, in order). `split` (one value per clip) switches from speaker-grouped folds to
    official splits (see `official_folds`)."""
    y, groups, rows = _check_task_inputs(name, labels, groups, rows, split)
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"probe {name!r} needs at least two classes; the labels hold only {classes.tolist()}")
    if split is None:
        folds, perm_groups = _cv_folds(y, groups, n_splits, seed), groups
    else:
        folds = official_folds(split)
        perm_groups = np.char.add(np.asarray(groups).astype(str), np.char.add("|", np.asarray(split).astype(str)))
    task = Task(name, "classification", rows, groups, folds, _label_rows(codes, perm_groups, control, n_permutations, seed),
                control, n_permutations, classes=classes, pair=pair)
    for s in dict.fromkeys(f.split for f in folds):  # chance of the pooled test clips, as the scores
        test = np.concatenate([f.test for f in folds if f.split == s])
        task.chance[s] = trivial_scores(codes[test], len(classes))
    return task


def regression_task(name: str, values, groups, rows=None, split=None, n_splits: int = 4, seed: int = 0,
                    n_permutations: int = 0, control: bool = True) -> Task:
    """A ridge probe of continuous `values` (finite, one per clip). Folds are stratified on the
    quartile of the value so each fold spans the range."""
    t, groups, rows = _check_task_inputs(name, values, groups, rows, split)
    t = t.astype(np.float64)
    if not np.isfinite(t).all():
        raise ValueError(f"probe {name!r}: {int((~np.isfinite(t)).sum())} values are not finite; drop those clips")
    if np.ptp(t) == 0:
        raise ValueError(f"probe {name!r}: every value is {t[0]}; nothing to regress")
    if split is None:
        strata = np.searchsorted(np.quantile(t, [0.25, 0.5, 0.75]), t)
        folds, perm_groups = _cv_folds(strata, groups, n_splits, seed), groups
    else:
        folds = official_folds(split)
        perm_groups = np.char.add(np.asarray(groups).astype(str), np.char.add("|", np.asarray(split).astype(str)))
    task = Task(name, "regression", rows, groups, folds, _label_rows(t, perm_groups, control, n_permutations, seed),
                control, n_permutations)
    for s in dict.fromkeys(f.split for f in folds):
        task.chance[s] = {"r2": 0.0, "ccc": 0.0, "pearson": 0.0}
    return task


# --- fitting one site ------------------------------------------------------------------------

@dataclass(frozen=True)
class FitSettings:
    C: float = 1.0                 # logistic probes: inverse L2 strength
    class_weight: object = None    # None | "balanced" | {class: weight}
    max_iter: int = 1000
    tol: float = 1e-6
    alphas: tuple = DEFAULT_ALPHAS  # ridge probes: candidate penalties (leave-one-out choice)
    n_boot: int = 1000             # speaker-bootstrap resamples for every interval
    seed: int = 0


def _kept(task: Task) -> int:
    """Label rows whose out-of-fold predictions are kept for the intervals: observed (and control)."""
    return 2 if task.control else 1


def _classify(X: np.ndarray, task: Task, s: FitSettings):
    """Confusion matrices [label row, fold, K, K], the out-of-fold class codes of the observed
    (and control) label rows [kept row, clip] (-1 where a clip is never tested), and the count of
    fits that did not converge."""
    K, R = len(task.classes), len(task.label_rows)
    cm = np.zeros((R, len(task.folds), K, K), dtype=np.int64)
    kept = _kept(task)
    observed = np.full((kept, len(task.rows)), -1, dtype=np.int64)
    not_converged = 0
    cw_all = s.class_weight
    if isinstance(cw_all, dict):
        cw_all = {int(np.flatnonzero(task.classes == c)[0]): w for c, w in cw_all.items() if c in task.classes}
    for fit in dict.fromkeys(f.fit for f in task.folds):
        folds = [(i, f) for i, f in enumerate(task.folds) if f.fit == fit]
        tr = folds[0][1].train
        present = np.unique(task.label_rows[0, tr])  # the same for every label row: shuffles stay within groups
        if len(present) < 2:  # a training side with one class can only answer that class
            for i, f in folds:
                pred = np.full((R, len(f.test)), present[0])
                cm[:, i] = confusion(task.label_rows[:, f.test], pred, K)
                observed[:, f.test] = pred[:kept]
            continue
        local = np.full(K, -1)
        local[present] = np.arange(len(present))
        cw = cw_all
        if isinstance(cw, dict):
            cw = {int(local[k]): w for k, w in cw.items() if local[k] >= 0}
        mean, scale = standardise(X[tr])
        x_tr = (X[tr] - mean) / scale
        x_te = [(X[f.test] - mean) / scale for _, f in folds]
        per_row = 8 * len(present) * (4 * len(tr) + 2 * 10 * (X.shape[1] + 1))  # bytes of state
        batch = int(np.clip(_BATCH_BYTES // per_row, 1, _LABEL_BATCH))
        for start in range(0, R, batch):
            rows = task.label_rows[start:start + batch]
            W, b, _, converged = fit_multinomial(x_tr, local[rows[:, tr]], len(present), C=s.C, class_weight=cw,
                                                 max_iter=s.max_iter, tol=s.tol)
            not_converged += int((~converged).sum())
            for (i, f), xt in zip(folds, x_te):
                pred = present[(np.einsum("nd,pkd->pnk", xt, W) + b[:, None, :]).argmax(-1)]
                cm[start:start + len(rows), i] = confusion(rows[:, f.test], pred, K)
                if start < kept:
                    observed[start:kept, f.test] = pred[:kept - start]
    return cm, observed, not_converged


def _regress(X: np.ndarray, task: Task, s: FitSettings):
    """Metrics {name: [label row, fold]} and the out-of-fold predictions [label row, clip] (NaN
    where a clip is never tested)."""
    R = len(task.label_rows)
    out = {m: np.zeros((R, len(task.folds))) for m in REGRESSION_METRICS}
    predicted = np.full((R, len(task.rows)), np.nan)
    for fit in dict.fromkeys(f.fit for f in task.folds):
        folds = [(i, f) for i, f in enumerate(task.folds) if f.fit == fit]
        tr = folds[0][1].train
        mean, scale = standardise(X[tr])
        W, b, _, _ = ridge_cv((X[tr] - mean) / scale, task.label_rows[:, tr].T, s.alphas, task.groups[tr],
                              seed=s.seed)
        for i, f in folds:
            pred = ((X[f.test] - mean) / scale) @ W.T + b  # [n_test, R]
            for m, v in regression_metrics(task.label_rows[:, f.test], pred.T).items():
                out[m][:, i] = v
            predicted[:, f.test] = pred.T
    return out, predicted


def _interval_draws(task: Task, test: np.ndarray, predicted: np.ndarray, s: FitSettings):
    """Bootstrap draws {metric: [draw, kept row]} of the pooled metrics of the observed (and
    control) predictions on the clips `test`, resampling whole speakers (the task's groups) with
    replacement; with a single speaker, clips instead. Returns (draws, ci_method)."""
    kept = _kept(task)
    groups = task.groups[test]
    unit = "speakers"
    if len(np.unique(groups)) < 2:
        groups, unit = np.arange(len(test)), "clips (a single speaker)"
    truth, pred = task.label_rows[:kept, test], predicted[:kept, test]
    if task.kind == "classification":
        sums = group_bootstrap_sums(group_confusions(truth, pred, groups, len(task.classes)), s.n_boot, s.seed)
        draws = metrics_from_confusion(sums)
    else:
        draws = metrics_from_moments(group_bootstrap_sums(group_moments(truth, pred, groups), s.n_boot, s.seed))
    return draws, f"bootstrap over {unit}"


def probe_task(X: np.ndarray, task: Task, settings: FitSettings = FitSettings(), site: str = ""):
    """Run one task on one site's matrix X [clip, d] (all clips; the task picks its rows).
    Returns (metric rows, confusion rows, fold rows) as lists of dicts.

    Per split, `value` is the metric of the pooled out-of-fold predictions (classification: of
    the confusion matrix summed over folds), `fold_mean` the mean of the per-fold values beside
    it; the interval is a percentile bootstrap of the pooled value over speakers, and the
    permutation null pools each permuted label row's predictions the same way."""
    X = np.asarray(X, dtype=np.float64)[task.rows]
    if task.kind == "classification":
        cm, predicted, not_converged = _classify(X, task, settings)
        if not_converged:
            warnings.warn(f"site {site}, probe {task.name}: {not_converged} probe fits did not converge in "
                          f"max_iter={settings.max_iter}; raise max_iter or lower C", stacklevel=2)
        per_fold = metrics_from_confusion(cm)  # metric -> [label row, fold]
    else:
        per_fold, predicted = _regress(X, task, settings)
        cm = None
    first_perm = 2 if task.control else 1
    primary = task.primary
    metric_rows, confusion_rows, fold_rows = [], [], []
    for split in dict.fromkeys(f.split for f in task.folds):
        idx = [i for i, f in enumerate(task.folds) if f.split == split]
        test = np.concatenate([task.folds[i].test for i in idx])
        if cm is not None:
            pooled = metrics_from_confusion(cm[:, idx].sum(1))  # metric -> [label row]
        else:
            pooled = regression_metrics(task.label_rows[:, test], predicted[:, test])
        draws, ci_method = _interval_draws(task, test, predicted, settings)
        # metric -> (pooled value, per-fold values, bootstrap draws)
        values = {m: (float(pooled[m][0]), per_fold[m][0, idx], draws[m][:, 0]) for m in task.metric_names}
        if task.control:
            values[f"control_{primary}"] = (float(pooled[primary][1]), per_fold[primary][1, idx], draws[primary][:, 1])
            values["selectivity"] = (float(pooled[primary][0] - pooled[primary][1]),
                                     per_fold[primary][0, idx] - per_fold[primary][1, idx],
                                     draws[primary][:, 0] - draws[primary][:, 1])
        chance = dict(task.chance[split])
        chance[f"control_{primary}"], chance["selectivity"] = chance[primary], 0.0
        for metric, (value, v, boot) in values.items():
            low, high = (float(x) for x in percentile_interval(boot))
            if metric in _BOUNDS:
                low, high = (float(np.clip(x, *_BOUNDS[metric])) if np.isfinite(x) else x for x in (low, high))
            p, resolution, null_mean = np.nan, np.nan, np.nan
            if metric in task.metric_names and task.n_permutations > 0:
                null = pooled[metric][first_perm:]
                p, resolution = permutation_p_value(value, null)
                null_mean = float(np.nanmean(null))
            finite = v[np.isfinite(v)]
            metric_rows.append({
                "probe": task.name, "kind": task.kind, "split": split, "metric": metric, "value": value,
                "fold_mean": float(finite.mean()) if len(finite) else np.nan,
                "ci_low": low, "ci_high": high, "ci_method": ci_method,
                "value_method": "pooled out-of-fold predictions" if split == CV else "predictions on the split",
                "fold_std": float(np.std(finite, ddof=1)) if len(finite) > 1 else np.nan, "n_folds": len(idx),
                "chance": chance[metric],
                "chance_uniform": 1.0 / len(task.classes) if task.kind == "classification" else np.nan,
                "null_mean": null_mean, "p_value": p, "p_resolution": resolution,
                "n_permutations": task.n_permutations, "n_boot": settings.n_boot, "n_clips": len(test),
                "n_speakers": len(np.unique(task.groups[test])),
                "n_classes": len(task.classes) if task.kind == "classification" else np.nan,
            })
            for j, i in enumerate(idx):
                f = task.folds[i]
                fold_rows.append({"probe": task.name, "split": split, "fold": f.index, "metric": metric,
                                  "value": float(v[j]), "n_train": len(f.train), "n_test": len(f.test),
                                  "test_speakers": ";".join(sorted(map(str, np.unique(task.groups[f.test]))))})
        if cm is not None:
            total = cm[0, idx].sum(0)
            for a, ca in enumerate(task.classes):
                for b, cb in enumerate(task.classes):
                    confusion_rows.append({"probe": task.name, "split": split, "true": ca, "predicted": cb,
                                           "count": int(total[a, b])})
    return metric_rows, confusion_rows, fold_rows


def _axis_rows(X: np.ndarray, task: Task, settings: FitSettings) -> list[dict]:
    from affectlens.probes.axis import axis_metrics

    source, target = task.pair
    folds = [(f.train, f.test) for f in task.folds]
    try:
        rows = axis_metrics(np.asarray(X, dtype=np.float64)[task.rows], task.target, task.groups, source, target,
                            folds)
    except ValueError as e:  # e.g. fewer than two speakers said both classes
        log.warning("axis checks of %s skipped: %s", task.name, e)
        return []
    return [{"probe": task.name, "kind": "axis", "split": "speakers", **r} for r in rows]


def site_columns(site: str) -> dict:
    """{site, tower, depth} of a model site; a pseudo-site (`acoustic.mfcc_stats`) has depth -1."""
    if is_pseudo_site(site):
        return {"site": site, "tower": site.split(".", 1)[0], "depth": -1}
    parsed = parse_site(site)
    return {"site": site, "tower": parsed.tower, "depth": parsed.depth}


def probe_site(site: str, X: np.ndarray, tasks: Sequence[Task], settings: FitSettings = FitSettings(),
               extra: Callable[[str, np.ndarray], pd.DataFrame] | None = None):
    """Every task at one site: (metric rows, confusion rows, fold rows, extra table or None)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"site {site}: activations have shape {X.shape}, expected [clip, d]")
    bad = ~np.isfinite(X).all(1)
    if bad.any():
        raise ValueError(f"site {site}: {bad.sum()} clips have non-finite activations "
                         f"(first rows {np.flatnonzero(bad)[:5].tolist()}); check the extraction")
    cols = site_columns(site)
    metric_rows, confusion_rows, fold_rows = [], [], []
    for task in tasks:
        if X.shape[0] <= task.rows.max():
            raise ValueError(f"site {site}: activations have {X.shape[0]} rows; probe {task.name} reads row {task.rows.max()}")
        m, c, f = probe_task(X, task, settings, site)
        metric_rows += m
        confusion_rows += c
        fold_rows += f
        if task.pair is not None:
            metric_rows += _axis_rows(X, task, settings)
    for r in metric_rows:
        r.update(cols)
    for r in confusion_rows + fold_rows:
        r.update(site=site, depth=cols["depth"])
    acc = [r["value"] for r in metric_rows if r["metric"] in ("accuracy", "r2") and r["split"] in (CV, "test")]
    log.info("probe %s: %s", site, ", ".join(f"{v:.3f}" for v in acc))
    return metric_rows, confusion_rows, fold_rows, (extra(site, X) if extra is not None else None)


_FRONT = ["site", "tower", "depth", "probe", "kind", "split", "metric", "value"]


def _frame(rows: list[dict], front: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df[[c for c in front if c in df.columns] + [c for c in df.columns if c not in front]]


def sweep_tasks(get: Callable[[str], np.ndarray], sites: Sequence[str], tasks: Sequence[Task],
                settings: FitSettings = FitSettings(), n_threads: int | None = None,
                extra: Callable[[str, np.ndarray], pd.DataFrame] | None = None) -> tuple[SweepResult, list]:
    """Run every task at every site. `get(site)` returns [clip, d] and is called once per site, in
    this thread (reads stay serial); fits run in up to `n_threads` worker threads, each with one
    BLAS thread (None: one worker, BLAS threads left as they are). `extra(site, X)`, when given,
    makes one more table per site from the same read (representation statistics).
    Returns the SweepResult and the list of extra tables in site order."""
    workers = max(1, int(n_threads or 1))
    results = [None] * len(sites)
    with threadpool_limits(1 if workers > 1 else n_threads):
        if workers == 1:
            for i, site in enumerate(sites):
                results[i] = probe_site(site, get(site), tasks, settings, extra)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe") as pool:
                pending = {}
                for i, site in enumerate(sites):
                    X = get(site)  # read while the workers fit the sites read before
                    pending[i] = pool.submit(probe_site, site, X, tasks, settings, extra)
                    del X
                    while len([f for f in pending.values() if not f.done()]) > workers:  # bound memory
                        next(f for f in pending.values() if not f.done()).result()
                for i, fut in pending.items():
                    results[i] = fut.result()
    metrics = _frame([r for res in results for r in res[0]], _FRONT)
    conf = _frame([r for res in results for r in res[1]], ["site", "depth", "probe", "split"])
    folds = _frame([r for res in results for r in res[2]], ["site", "depth", "probe", "split", "fold", "metric"])
    return SweepResult(metrics, conf, folds), [res[3] for res in results]


def sweep_arrays(activations: Mapping[str, np.ndarray] | Callable[[str], np.ndarray], labels, groups,
                 sites: Sequence[str], n_splits: int = 4, C: float = 1.0, class_weight=None,
                 n_permutations: int = 0, seed: int = 0, control: bool = True, max_iter: int = 1000,
                 tol: float = 1e-6, n_threads: int | None = None, name: str = "label", split=None) -> SweepResult:
    """The multiclass sweep on in-memory activations: `activations[site]` (or `activations(site)`)
    is [clip, d], rows aligned with `labels` and `groups` (speakers). Each site is read once.
    `split` (one value per clip) uses official splits instead of grouped folds."""
    get = activations if callable(activations) else (lambda site: activations[site])
    task = classification_task(name, labels, groups, split=split, n_splits=n_splits, seed=seed,
                               n_permutations=n_permutations, control=control)
    settings = FitSettings(C=C, class_weight=class_weight, max_iter=max_iter, tol=tol, seed=seed)
    return sweep_tasks(get, sites, [task], settings, n_threads)[0]


# --- stores and manifests --------------------------------------------------------------------

def align_manifest(clip_ids: Sequence[str], manifest: pd.DataFrame, columns: Sequence[str],
                   where: str = "the store") -> np.ndarray:
    """Row in `clip_ids` of every manifest clip (manifest order). Errors name the missing column,
    the duplicated or missing clip ids, and the clips with empty values."""
    for col in ("clip_id", *columns):
        if col not in manifest.columns:
            raise KeyError(f"manifest has no column {col!r}; its columns are {list(manifest.columns)}")
    ids = manifest["clip_id"].astype(str)
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"manifest lists clip ids more than once: {dup[:10]}")
    for col in columns:
        empty = ids[manifest[col].isna().to_numpy()].tolist()
        if empty:
            raise ValueError(f"manifest column {col!r} is empty for {len(empty)} clips, e.g. {empty[:10]}; "
                             "drop them or fill the column before probing")
    index = {c: i for i, c in enumerate(clip_ids)}
    missing = [c for c in ids if c not in index]
    if missing:
        raise KeyError(f"{len(missing)} manifest clips are not in {where}, e.g. {missing[:10]}; "
                       "rerun extract for this manifest")
    return np.array([index[c] for c in ids], dtype=np.int64)


def read_pooled(store: Store, site: str, rows: np.ndarray, chunk_rows: int = _READ_ROWS) -> np.ndarray:
    """[len(rows), d] float32: the pooled matrix of `site` at store rows `rows`, read once, in
    contiguous chunks of `chunk_rows` store rows (never the whole float16 matrix converted at once)."""
    ds = store.h5[f"sites/{site}/pooled"] if site in store.sites else store.pooled(site)  # the latter raises
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), ds.shape[1]), dtype=np.float32)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    for lo in range(0, ds.shape[0], chunk_rows):
        a, b = np.searchsorted(sorted_rows, [lo, lo + chunk_rows])
        if a == b:
            continue
        block = ds[lo:min(lo + chunk_rows, ds.shape[0])]
        out[order[a:b]] = block[sorted_rows[a:b] - lo]
    return out


def _open(store: Store | str | Path) -> tuple[Store, bool]:
    return (store, False) if isinstance(store, Store) else (Store(store), True)


def _write_tsv(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)


def pair_name(source, target) -> str:
    return f"{source}_vs_{target}"


def build_tasks(manifest: pd.DataFrame, label_column: str = "label", group_column: str = "speaker",
                pairs: Sequence[Sequence[str]] = (), regression_columns: Sequence[str] = (),
                split_column: str | None = None, n_splits: int = 4, n_permutations: int = 0, seed: int = 0,
                control: bool = True) -> list[Task]:
    """The tasks of a study on a manifest: the multiclass probe of `label_column`, one binary probe
    per concept pair (source, target), one ridge probe per continuous column. Rows are manifest
    rows. `split_column` names a column of official splits (None: speaker-grouped folds)."""
    labels = manifest[label_column].to_numpy()
    groups = manifest[group_column].astype(str).to_numpy()
    split = None if split_column is None else manifest[split_column].astype(str).to_numpy()
    common = dict(n_splits=n_splits, seed=seed, n_permutations=n_permutations, control=control)
    tasks = [classification_task(label_column, labels, groups, split=split, **common)]
    present = set(pd.Series(labels).astype(str))
    for pair in pairs:
        source, target = (str(x) for x in pair)
        absent = [c for c in (source, target) if c not in present]
        if absent:
            raise ValueError(f"concept pair {source} -> {target}: {absent} not in manifest column {label_column!r} "
                             f"(it holds {sorted(present)})")
        keep = np.flatnonzero(np.isin(pd.Series(labels).astype(str).to_numpy(), [source, target]))
        tasks.append(classification_task(pair_name(source, target), pd.Series(labels[keep]).astype(str).to_numpy(),
                                         groups[keep], rows=keep, split=None if split is None else split[keep],
                                         pair=(source, target), **common))
    for col in regression_columns:
        if col not in manifest.columns:
            raise KeyError(f"probe.regression_columns names {col!r}, which is not a manifest column "
                           f"({list(manifest.columns)})")
        values = pd.to_numeric(manifest[col], errors="coerce").to_numpy(np.float64)
        keep = np.flatnonzero(np.isfinite(values))
        if len(keep) < len(values):
            log.warning("regression probe %s: %d clips without a value left out", col, len(values) - len(keep))
        tasks.append(regression_task(col, values[keep], groups[keep], rows=keep,
                                     split=None if split is None else split[keep], **common))
    return tasks


def probe_sweep(store: Store | str | Path, manifest: pd.DataFrame, sites: Sequence[str] | None = None,
                label_column: str = "label", group_column: str = "speaker", n_splits: int = 4,
                C: float = 1.0, n_permutations: int = 0, seed: int = 0, control: bool = True,
                class_weight=None, confusion_path: str | Path | None = None,
                folds_path: str | Path | None = None, n_threads: int | None = None,
                pairs: Sequence[Sequence[str]] = (), regression_columns: Sequence[str] = (),
                split_column: str | None = None, baseline: np.ndarray | None = None,
                alphas: Sequence[float] = DEFAULT_ALPHAS, n_boot: int = 1000, max_iter: int = 1000,
                representation_path: str | Path | None = None, effect_size: float = 0.5,
                normalise: str = "none") -> pd.DataFrame:
    """Probe every site of an activation store (all sites when `sites` is None) for the manifest's
    `label_column`, the concept `pairs` and the `regression_columns`, held out by `group_column`
    (speakers) or by the official splits in `split_column`.

    `baseline` [manifest clip, feature] (acoustic features in manifest order) is probed as the
    pseudo-site `acoustic.mfcc_stats`, through the same folds, null and control.

    `normalise` = "speaker" z-scores every site's features (the baseline's too) over each
    `group_column` group's own clips before probing (`probes.normalise`); "none" reads them as stored.

    Returns the tidy metrics table (one row per site x probe x split x metric). The confusion
    matrices (summed over folds), the per-fold values and the representation statistics are
    written as tidy TSVs to the given paths; `sweep_tasks` has them all in memory.
    Cost: (n_permutations + 2) probe fits per site, task and fold, fit in batches that share
    each matrix product."""
    from affectlens.probes.baseline import ACOUSTIC_SITE
    from affectlens.probes.normalise import normalise as normalised
    from affectlens.probes.representation import representation_stats

    if normalise not in ("none", "speaker"):
        raise ValueError(f"probe.normalise = {normalise!r}: the sweep normalises `none` or `speaker`")

    st, owned = _open(store)
    try:
        needed = [label_column, group_column] + ([split_column] if split_column else [])
        rows = align_manifest(st.clip_ids, manifest, needed, where=str(st.path))
        sites = list(st.sites if sites is None else sites)
        for s in sites:
            if s not in st.sites:
                raise KeyError(f"site {s!r} is not in {st.path}; it holds {st.sites}")
        tasks = build_tasks(manifest, label_column, group_column, pairs, regression_columns, split_column,
                            n_splits, n_permutations, seed, control)
        settings = FitSettings(C=C, class_weight=class_weight, max_iter=max_iter, alphas=tuple(alphas),
                               n_boot=n_boot, seed=seed)
        labels = manifest[label_column].astype(str).to_numpy()
        groups = manifest[group_column].astype(str).to_numpy()

        def get(site):
            X = np.asarray(baseline, dtype=np.float64) if site == ACOUSTIC_SITE else read_pooled(st, site, rows)
            return normalised(X, groups, normalise)

        def extra(site, X):
            if representation_path is None:
                return None
            df = representation_stats(X, labels, groups, effect_size=effect_size)
            df.insert(0, "site", site)
            df.insert(1, "depth", site_columns(site)["depth"])
            return df

        all_sites = ([ACOUSTIC_SITE] if baseline is not None else []) + sites
        if baseline is not None and len(baseline) != len(manifest):
            raise ValueError(f"baseline has {len(baseline)} rows for {len(manifest)} manifest clips")
        result, extras = sweep_tasks(get, all_sites, tasks, settings, n_threads, extra)
    finally:
        if owned:
            st.close()
    if confusion_path is not None:
        _write_tsv(result.confusion, confusion_path)
    if folds_path is not None:
        _write_tsv(result.folds, folds_path)
    if representation_path is not None:
        _write_tsv(pd.concat([e for e in extras if e is not None], ignore_index=True), representation_path)
    return result.metrics


def fit_readout(store: Store | str | Path, manifest: pd.DataFrame, site: str, label_column: str = "label",
                classes: Sequence | None = None, C: float = 1.0, class_weight=None) -> LinearProbe:
    """A LinearProbe fit on all manifest clips at `site` (the downstream judge for patching and
    steering). `classes` keeps only clips with those labels (e.g. ["sad", "happy"])."""
    if classes is not None:
        if label_column not in manifest.columns:
            raise KeyError(f"manifest has no column {label_column!r}; its columns are {list(manifest.columns)}")
        absent = [c for c in classes if not (manifest[label_column] == c).any()]
        if absent:
            raise ValueError(f"classes {absent} do not occur in manifest column {label_column!r}; "
                             f"it holds {sorted(map(str, manifest[label_column].dropna().unique()))}")
        manifest = manifest[manifest[label_column].isin(list(classes))]
    st, owned = _open(store)
    try:
        rows = align_manifest(st.clip_ids, manifest, [label_column], where=str(st.path))
        X = st.pooled(site)[rows]
    finally:
        if owned:
            st.close()
    return LinearProbe(C=C, class_weight=class_weight).fit(X, manifest[label_column].to_numpy())
