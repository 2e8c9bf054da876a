"""The concept axis: a per-speaker difference of class means, averaged over speakers, and two
checks that it is a real direction rather than a fit to the clips it came from.

- Leave-one-speaker-out generalisation: the axis from all other speakers, the held-out speaker's
  clips projected on it, AUROC of `target` above `source` (0.5 = no separation).
- Interpolation: held-out `source` clips moved along the axis, x + t * axis for t on a grid,
  and read by a k-nearest-neighbour vote among the training clips of the two classes. (A linear
  probe would be no test: its p(target) is a logistic function of t for any direction.) The vote
  only says `target` once the moved clip lands among real target clips, so p(target) near 1 at
  t = 1 means the axis carries a held-out clip into the target class, not off the data; a rise
  without a jump (small max_step_share) and monotone per-clip curves mean the class is reached
  gradually along the axis (the seed's "you can interpolate smoothly").

`diff_of_means` (here) is also the steering stage's vector, so what is checked here
is what gets added during steering.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from affectlens.probes.linear import standardise
from affectlens.probes.stats import fold_ci


def diff_of_means(X: np.ndarray, labels, speakers, source: str, target: str) -> np.ndarray:
    """[d]: mean over speakers of (mean of the speaker's `target` clips - mean of their `source`
    clips), for X [clip, d]. Speakers lacking either class are skipped; none having both is an
    error."""
    X = np.asarray(X, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    speakers = np.asarray(speakers).astype(str)
    if X.ndim != 2 or not (len(X) == len(labels) == len(speakers)):
        raise ValueError(f"X must be [clip, d] with one label and speaker per clip; got X {X.shape}, "
                         f"{len(labels)} labels, {len(speakers)} speakers")
    if source == target:
        raise ValueError(f"source and target are the same class {source!r}")
    diffs = []
    for spk in np.unique(speakers):
        mine = speakers == spk
        s, t = mine & (labels == source), mine & (labels == target)
        if s.any() and t.any():
            diffs.append(X[t].mean(0) - X[s].mean(0))
    if not diffs:
        present = sorted(set(labels.tolist()))
        raise ValueError(f"no speaker has clips of both {source!r} and {target!r} (labels present: {present}); "
                         "check the study's concept names against the manifest's label column")
    return np.mean(diffs, axis=0).astype(np.float32)


INTERPOLATION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


class ConceptAxis(ClassifierMixin, TransformerMixin, BaseEstimator):
    """Direction from `source` to `target` (per-speaker difference of means, averaged); as a
    classifier, the side of the midpoint a clip projects to.

    Parameters
    ----------
    source, target : the two classes; None takes the two classes of y in sorted order (y must
        then hold exactly two).

    `fit(X, y, groups=None)`: groups are speakers (None = one speaker). Learned state: classes_
    ([source, target]), direction_ [d] (the averaged difference, unnormalised), unit_ [d],
    threshold_ (midpoint of the two class means' projections), n_speakers_ (speakers that said
    both). `transform(X)` -> [n, 1] projection on unit_ minus threshold_; `decision_function` the
    same as [n] (positive = towards target); `predict` the class on that side.
    """

    def __init__(self, source=None, target=None):
        self.source = source
        self.target = target

    def fit(self, X, y, groups=None):
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        y = np.asarray(y)
        if (self.source is None) != (self.target is None):
            raise ValueError("give both source and target, or neither")
        if self.source is None:
            classes = np.unique(y)
            if len(classes) != 2:
                raise ValueError(f"Only binary classification is supported: ConceptAxis without source/target "
                                 f"needs exactly two classes in y; got {len(classes)} class(es)")
            source, target = classes
        else:
            source, target = self.source, self.target
        groups = np.zeros(len(y), dtype=int) if groups is None else np.asarray(groups)
        self.direction_ = diff_of_means(X, y.astype(str), groups.astype(str), str(source), str(target)).astype(np.float64)
        norm = np.linalg.norm(self.direction_)
        if norm == 0:
            raise ValueError(f"the {source!r} and {target!r} class means coincide: the axis is zero")
        self.unit_ = self.direction_ / norm
        ys = y.astype(str)
        both = [g for g in np.unique(groups) if ((groups == g) & (ys == str(source))).any()
                and ((groups == g) & (ys == str(target))).any()]
        self.n_speakers_ = len(both)
        proj = X @ self.unit_
        self.threshold_ = 0.5 * (proj[ys == str(source)].mean() + proj[ys == str(target)].mean())
        self.classes_ = np.array([source, target])
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return X @ self.unit_ - self.threshold_

    def transform(self, X) -> np.ndarray:
        return self.decision_function(X)[:, None]

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[(self.decision_function(X) > 0).astype(int)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False  # one axis joins two classes
        return tags


def speaker_differences(X: np.ndarray, labels, groups, source, target) -> tuple[np.ndarray, np.ndarray]:
    """(speakers [S], differences [S, d]): for every speaker with clips of both classes, the mean
    of their `target` clips minus the mean of their `source` clips."""
    X = np.asarray(X, dtype=np.float64)
    labels, groups = np.asarray(labels).astype(str), np.asarray(groups).astype(str)
    speakers, diffs = [], []
    for g in np.unique(groups):
        mine = groups == g
        s, t = mine & (labels == str(source)), mine & (labels == str(target))
        if s.any() and t.any():
            speakers.append(g)
            diffs.append(X[t].mean(0) - X[s].mean(0))
    if not diffs:
        raise ValueError(f"no speaker has clips of both {source!r} and {target!r}")
    return np.array(speakers), np.stack(diffs)


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """P(positive score > negative score) + 0.5 P(tie): the Mann-Whitney form of the ROC area."""
    negative, positive = np.asarray(negative, float), np.asarray(positive, float)
    if len(negative) == 0 or len(positive) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([negative, positive]))
    u = ranks[len(negative):].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(negative) * len(positive)))


def loso_auroc(X: np.ndarray, labels, groups, source, target) -> pd.DataFrame:
    """One row per speaker with clips of both classes: AUROC of their clips' projections on the
    axis built from every *other* speaker (target should project higher than source)."""
    X = np.asarray(X, dtype=np.float64)
    labels, groups = np.asarray(labels).astype(str), np.asarray(groups).astype(str)
    speakers, diffs = speaker_differences(X, labels, groups, source, target)
    if len(speakers) < 2:
        raise ValueError(f"leave-one-speaker-out needs at least 2 speakers with both {source!r} and "
                         f"{target!r}; found {len(speakers)}")
    total = diffs.sum(0)
    rows = []
    for i, spk in enumerate(speakers):
        axis = (total - diffs[i]) / (len(speakers) - 1)
        mine = groups == spk
        proj = X[mine] @ axis
        lab = labels[mine]
        rows.append({"speaker": spk, "auroc": auroc(proj[lab == str(source)], proj[lab == str(target)]),
                     "n_source": int((lab == str(source)).sum()), "n_target": int((lab == str(target)).sum())})
    return pd.DataFrame(rows)


def interpolation_check(X: np.ndarray, labels, groups, source, target, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                        grid: Sequence[float] = INTERPOLATION_GRID, k: int = 15) -> pd.DataFrame:
    """Move each held-out `source` clip along the axis fit on the training side of its fold,
    x + t * axis for t in `grid`, and read p(target) as the share of `target` clips among its k
    nearest training clips of the two classes (standardised on the training side). One row per
    (clip, t): fold, clip row, t, p_target, projection."""
    from sklearn.neighbors import KNeighborsClassifier

    X = np.asarray(X, dtype=np.float64)
    labels, groups = np.asarray(labels).astype(str), np.asarray(groups).astype(str)
    pair = np.isin(labels, [str(source), str(target)])
    rows = []
    for f, (tr, te) in enumerate(folds):
        tr = tr[pair[tr]]
        moved = te[labels[te] == str(source)]
        if len(moved) == 0 or len(np.unique(labels[tr])) < 2:
            continue
        try:
            axis = ConceptAxis(str(source), str(target)).fit(X[tr], labels[tr], groups[tr])
        except ValueError:  # no training speaker said both
            continue
        mean, scale = standardise(X[tr])
        reader = KNeighborsClassifier(n_neighbors=min(k, len(tr))).fit((X[tr] - mean) / scale, labels[tr])
        col = list(reader.classes_).index(str(target))
        for t in grid:
            Xt = X[moved] + t * axis.direction_
            p = reader.predict_proba((Xt - mean) / scale)[:, col]
            proj = axis.decision_function(Xt)
            rows += [{"fold": f, "clip": int(c), "t": float(t), "p_target": float(pi), "projection": float(q)}
                     for c, pi, q in zip(moved, p, proj)]
    return pd.DataFrame(rows, columns=["fold", "clip", "t", "p_target", "projection"])


def interpolation_summary(curves: pd.DataFrame) -> dict[str, float]:
    """From `interpolation_check` rows: p_target at t = 0 and t = 1 (means over clips), the share
    of clips whose p_target never falls as t grows (monotone_fraction), the largest rise of the
    mean curve between neighbouring grid points as a share of its whole rise (max_step_share:
    1/(grid points - 1) for an even rise, near 1 for a jump), and the median t at which a clip's
    p_target first reaches 0.5 (NaN when none does within the grid)."""
    if curves.empty:
        return {k: float("nan") for k in ("p_target_t0", "p_target_t1", "monotone_fraction", "max_step_share",
                                          "midpoint_t")}
    wide = curves.pivot_table(index=["fold", "clip"], columns="t", values="p_target")
    grid = wide.columns.to_numpy(float)
    P = wide.to_numpy()
    mean = P.mean(0)
    steps = np.diff(mean)
    rise = mean[-1] - mean[0]
    crossed = P >= 0.5
    first = np.where(crossed.any(1), grid[np.argmax(crossed, axis=1)], np.nan)
    at = lambda t: float(mean[np.argmin(np.abs(grid - t))])  # noqa: E731
    return {
        "p_target_t0": at(0.0), "p_target_t1": at(1.0),
        "monotone_fraction": float(np.mean((np.diff(P, axis=1) >= -1e-9).all(1))),
        "max_step_share": float(steps.max() / rise) if rise > 0 else float("nan"),
        "midpoint_t": float(np.nanmedian(first)) if np.isfinite(first).any() else float("nan"),
    }


def axis_metrics(X: np.ndarray, labels, groups, source, target, folds) -> list[dict]:
    """The axis checks of one site and pair as tidy rows {metric, value, ci_low, ci_high, ci_method,
    n_speakers}: loso_auroc (mean over held-out speakers with a t-interval), then the
    interpolation summary (interp_*)."""
    per_speaker = loso_auroc(X, labels, groups, source, target)
    m, lo, hi = fold_ci(per_speaker["auroc"].to_numpy())
    rows = [{"metric": "loso_auroc", "value": m, "ci_low": lo, "ci_high": hi, "ci_method": "t over held-out speakers",
             "n_speakers": len(per_speaker), "chance": 0.5}]
    summary = interpolation_summary(interpolation_check(X, labels, groups, source, target, folds))
    rows += [{"metric": f"interp_{k}", "value": v, "ci_low": np.nan, "ci_high": np.nan, "ci_method": "",
              "n_speakers": len(per_speaker), "chance": np.nan} for k, v in summary.items()]
    return rows
