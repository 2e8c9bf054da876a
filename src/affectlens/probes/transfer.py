"""Does it transfer? Probes and concept axes fit on one corpus (A) and tested on another (B).

Label alignment: each corpus's labels pass through its `label_map` (e.g. fearful -> fear; labels
not in the map keep their name); the classes of a pair are the labels both sides have after
mapping. Clips of other labels are left out and counted (`alignment_rows`).

The transfer probe is the sweep's probe (`sweep.probe_task`, the LinearProbe's standardise +
multinomial logistic fit) run as one fold: fit on every aligned clip of A, predicted on every
aligned clip of B. So its metrics come from the same pooled predictions as the within-corpus sweep,
its interval is the sweep's percentile bootstrap over speakers (B's: the fitted probe held fixed),
its chance is the best label-blind score on B's class counts, and its p-value comes from the same
refits with A's labels shuffled. Those shuffles run across all of A's clips rather than within
each speaker: B's speakers are never A's, so a probe can only score on B through what A's labels
carry, and a within-speaker shuffle would hold fixed the labels of a corpus whose speakers each
say one emotion (URDU: 26 of its 29 speakers). p = (1 + #{null >= observed}) / (1 + n), never
below its resolution 1 / (1 + n).

The within-corpus scores beside it are the sweep's own (`within_rows`: speaker-grouped folds,
pooled out-of-fold predictions, within-speaker permutations).

Axes: the difference-of-means axis of A (`axis.diff_of_means`: per-speaker differences averaged,
as steering builds it; and the pooled class-mean difference, for corpora where few speakers say
both classes) projects B's clips of the two classes; the AUROC of target over source has an
interval from a bootstrap over B's speakers; the cosine between A's and B's axes says whether the
two corpora point the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from affectlens.probes.axis import diff_of_means, speaker_differences
from affectlens.probes.stats import group_bootstrap_sums, percentile_interval, trivial_scores
from affectlens.probes.sweep import FitSettings, Fold, Task, classification_task, probe_task

TRANSFER = "transfer"  # the `split` of transfer rows (the sweep's cross-validated rows are "cv")
AXES = ("per_speaker", "pooled")


# --- label alignment --------------------------------------------------------------------------

def map_labels(labels, label_map: Mapping[str, str] | None = None) -> np.ndarray:
    """[clip] labels as strings, each renamed by `label_map` where it names them."""
    label_map = dict(label_map or {})
    return np.array([label_map.get(str(x), str(x)) for x in np.asarray(labels)], dtype=object).astype(str)


def shared_labels(*mapped) -> list[str]:
    """The labels every one of the mapped label arrays holds, sorted."""
    sets = [set(np.asarray(m).astype(str).tolist()) for m in mapped]
    return sorted(set.intersection(*sets)) if sets else []


def alignment_rows(dataset: str, labels, mapped, shared: Sequence[str]) -> list[dict]:
    """One row per original label of `dataset`: the label it maps to, its clips, and whether they
    take part (`kept`: the mapped label is shared)."""
    labels, mapped = np.asarray(labels).astype(str), np.asarray(mapped).astype(str)
    rows = []
    for label in sorted(set(labels.tolist())):
        to = str(mapped[labels == label][0])
        rows.append({"dataset": dataset, "label": label, "mapped_to": to, "n_clips": int((labels == label).sum()),
                     "kept": to in set(shared)})
    return rows


# --- probes -----------------------------------------------------------------------------------

def _codes(labels, classes: np.ndarray, side: str) -> np.ndarray:
    labels = np.asarray(labels).astype(str)
    unknown = sorted(set(labels.tolist()) - set(classes.tolist()))
    if unknown:
        raise ValueError(f"transfer: {side} labels {unknown} are not among the shared classes {classes.tolist()}")
    return np.searchsorted(classes, labels)


def transfer_task(name: str, labels_a, groups_a, labels_b, groups_b, classes: Sequence[str] | None = None,
                  n_permutations: int = 0, seed: int = 0, control: bool = True) -> Task:
    """A sweep Task over the rows [A's clips; B's clips] with one fold, fit on A and tested on B.
    Label rows: the observed labels, then (with `control`) one shuffle of A's labels as the
    random-label control, then `n_permutations` shuffles of A's labels across all of A's clips;
    B's labels stay as observed in every row, so each row is scored against B's truth.
    `classes` defaults to the labels both sides hold."""
    labels_a, labels_b = np.asarray(labels_a).astype(str), np.asarray(labels_b).astype(str)
    groups_a, groups_b = np.asarray(groups_a).astype(str), np.asarray(groups_b).astype(str)
    if len(labels_a) != len(groups_a) or len(labels_b) != len(groups_b):
        raise ValueError(f"transfer {name!r}: labels and speakers differ in length "
                         f"(A {len(labels_a)} / {len(groups_a)}, B {len(labels_b)} / {len(groups_b)})")
    classes = np.array(sorted(shared_labels(labels_a, labels_b) if classes is None else map(str, classes)))
    if len(classes) < 2:
        raise ValueError(f"transfer {name!r} needs at least two shared classes; the two sides share {classes.tolist()}")
    if n_permutations < 0:
        raise ValueError(f"n_permutations={n_permutations}: use 0 (no test) or a positive count")
    codes_a, codes_b = _codes(labels_a, classes, "source"), _codes(labels_b, classes, "target")
    n_a, n_b = len(codes_a), len(codes_b)
    control_rng, perm_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    a_rows = [codes_a[None]]
    if control:
        a_rows.append(control_rng.permutation(codes_a)[None])
    if n_permutations:
        a_rows.append(perm_rng.permuted(np.broadcast_to(codes_a, (n_permutations, n_a)), axis=1))
    a_part = np.concatenate(a_rows)
    label_rows = np.concatenate([a_part, np.broadcast_to(codes_b, (len(a_part), n_b))], axis=1)
    fold = Fold(TRANSFER, 0, 0, np.arange(n_a), n_a + np.arange(n_b))
    task = Task(name, "classification", np.arange(n_a + n_b), np.concatenate([groups_a, groups_b]), [fold],
                label_rows, control, n_permutations, classes=classes)
    task.chance[TRANSFER] = trivial_scores(codes_b, len(classes))
    return task


def transfer_rows(X_a: np.ndarray, X_b: np.ndarray, task: Task, settings: FitSettings = FitSettings(),
                  site: str = "") -> list[dict]:
    """The sweep's metric rows (split `transfer`) of `transfer_task` on A's [clip, d] and B's [clip, d]."""
    X_a, X_b = np.asarray(X_a, dtype=np.float64), np.asarray(X_b, dtype=np.float64)
    if X_a.ndim != 2 or X_b.ndim != 2 or X_a.shape[1] != X_b.shape[1]:
        raise ValueError(f"site {site}: source {X_a.shape} and target {X_b.shape} activations must be [clip, d] "
                         "with the same d")
    return probe_task(np.vstack([X_a, X_b]), task, settings, site)[0]


def within_rows(X: np.ndarray, labels, groups, settings: FitSettings = FitSettings(), n_splits: int = 4,
                n_permutations: int = 0, seed: int = 0, control: bool = True, site: str = "",
                name: str = "label") -> list[dict]:
    """The sweep's metric rows (split `cv`) of the multiclass probe of `labels` on X [clip, d]:
    speaker-grouped folds, pooled out-of-fold predictions, within-speaker permutations."""
    task = classification_task(name, np.asarray(labels).astype(str), np.asarray(groups).astype(str),
                               n_splits=n_splits, seed=seed, n_permutations=n_permutations, control=control)
    return probe_task(np.asarray(X, dtype=np.float64), task, settings, site)[0]


# --- axes -------------------------------------------------------------------------------------

def _auroc_from_counts(counts: np.ndarray) -> np.ndarray:
    """AUROC [...] from counts [..., 2, T] of negative (0) and positive (1) clips per tied score
    value T (ascending): P(positive > negative) + 0.5 P(tie)."""
    neg, pos = counts[..., 0, :], counts[..., 1, :]
    below = np.cumsum(neg, axis=-1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(-1) / (pos.sum(-1) * neg.sum(-1))


def speaker_bootstrap_auroc(scores, positive, groups, n_boot: int = 1000, seed: int = 0,
                            confidence: float = 0.95) -> tuple[float, float, float, str]:
    """(AUROC of `scores` for `positive` over the other clips, low, high, ci_method): the percentile
    interval resamples whole speakers (`groups`) with replacement (clips, with a single speaker); a
    draw without clips of one class is left out of the interval."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    groups = np.asarray(groups).astype(str)
    unit = "speakers"
    if len(np.unique(groups)) < 2:
        groups, unit = np.arange(len(scores)).astype(str), "clips (a single speaker)"
    _, tie = np.unique(scores, return_inverse=True)
    _, g = np.unique(groups, return_inverse=True)
    per_group = np.zeros((g.max() + 1, 2, tie.max() + 1))
    np.add.at(per_group, (g, positive.astype(int), tie), 1.0)
    value = float(_auroc_from_counts(per_group.sum(0)))
    low, high = percentile_interval(_auroc_from_counts(group_bootstrap_sums(per_group, n_boot, seed)), confidence)
    return value, float(low), float(high), f"bootstrap over {unit}"


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def _axis(X, labels, groups, source, target, kind) -> tuple[np.ndarray | None, int, str]:
    """(axis or None, speakers it rests on, why it is None)."""
    if kind == "pooled":
        groups = np.zeros(len(labels), dtype=int)
    try:
        n = len(speaker_differences(X, labels, groups, source, target)[0])
        return diff_of_means(X, labels, groups, source, target).astype(np.float64), n, ""
    except ValueError as e:
        return None, 0, str(e)


def axis_transfer_rows(X_a: np.ndarray, labels_a, groups_a, X_b: np.ndarray, labels_b, groups_b, source: str,
                       target: str, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """One row per axis kind (AXES): A's `source` -> `target` axis scored on B's clips of the two
    classes (AUROC of target over source, with a bootstrap interval over B's speakers) and its
    cosine with B's own axis of the same kind. An axis that cannot be built (no speaker of A with
    both classes) gives NaN scores and the reason in `note`."""
    labels_a, labels_b = np.asarray(labels_a).astype(str), np.asarray(labels_b).astype(str)
    groups_a, groups_b = np.asarray(groups_a).astype(str), np.asarray(groups_b).astype(str)
    in_b = np.isin(labels_b, [source, target])
    rows = []
    for kind in AXES:
        axis_a, n_a, why_a = _axis(X_a, labels_a, groups_a, source, target, kind)
        axis_b, n_b, why_b = _axis(X_b, labels_b, groups_b, source, target, kind)
        row = {"axis": kind, "auroc": np.nan, "ci_low": np.nan, "ci_high": np.nan, "ci_method": "",
               "chance": 0.5, "cosine": np.nan, "n_source_clips": int((labels_b == source).sum()),
               "n_target_clips": int((labels_b == target).sum()), "n_speakers": len(np.unique(groups_b[in_b])),
               "axis_speakers_a": n_a, "axis_speakers_b": n_b, "n_boot": n_boot,
               "note": "; ".join(f"{side}: {why}" for side, why in (("source axis", why_a), ("target axis", why_b))
                                 if why)}
        if axis_a is not None and row["n_source_clips"] and row["n_target_clips"]:
            proj = np.asarray(X_b, dtype=np.float64)[in_b] @ axis_a
            row["auroc"], row["ci_low"], row["ci_high"], row["ci_method"] = speaker_bootstrap_auroc(
                proj, labels_b[in_b] == target, groups_b[in_b], n_boot, seed)
        if axis_a is not None and axis_b is not None:
            row["cosine"] = _cosine(axis_a, axis_b)
        rows.append(row)
    return rows


def frame(rows: list[dict], front: Sequence[str]) -> pd.DataFrame:
    """Rows as a table with the `front` columns first (those present)."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df[[c for c in front if c in df.columns] + [c for c in df.columns if c not in front]]
