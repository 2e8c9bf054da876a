"""Regression probes for continuous labels (valence, arousal): standardise + ridge, with the
penalty chosen per fit by cross-validation inside the training clips: speaker-grouped folds when
speakers are given (clip-level leave-one-out would let a speaker's other clips vouch for a weak
penalty), exact leave-one-out (the hat-matrix shortcut) otherwise.

One solver serves a single fit (`RidgeProbe.fit`) and the permutation test: `ridge_cv` fits many
target columns against one design matrix at once, and each column picks its own penalty, so the
permuted targets go through exactly the procedure the observed target does.

Metrics: R² (against the test clips' own mean, as scikit-learn's `r2_score`), Pearson r, and
Lin's concordance correlation coefficient (CCC), which unlike r also punishes a shifted or
rescaled prediction: the customary score of continuous emotion recognition.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from affectlens.probes.linear import standardise

DEFAULT_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
REGRESSION_METRICS = ("r2", "ccc", "pearson")


def _thin_svd(Xc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U [n, r], s² [r], V [d, r] of centred Xc [n, d] via the eigendecomposition of the smaller
    Gram matrix; directions with negligible singular value are dropped."""
    n, d = Xc.shape
    if n >= d:
        s2, V = np.linalg.eigh(Xc.T @ Xc)
        keep = s2 > 1e-10 * max(s2.max(), 1e-300)
        s2, V = s2[keep], V[:, keep]
        U = (Xc @ V) / np.sqrt(s2)
    else:
        s2, U = np.linalg.eigh(Xc @ Xc.T)
        keep = s2 > 1e-10 * max(s2.max(), 1e-300)
        s2, U = s2[keep], U[:, keep]
        V = (Xc.T @ U) / np.sqrt(s2)
    return U, s2, V


def ridge_gcv(Xs: np.ndarray, Y: np.ndarray, alphas=DEFAULT_ALPHAS):
    """Ridge regression with intercept for every column of Y, the penalty chosen per column by
    exact leave-one-out error (the hat-matrix shortcut, as scikit-learn's RidgeCV).

    Xs [n, d] (standardised), Y [n, P] -> W [P, d], b [P], alpha [P], loo_mse [P].
    Objective per column: ||y - Xw - b||² + alpha ||w||²."""
    Xs = np.asarray(Xs, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    n = Xs.shape[0]
    if Y.shape[0] != n:
        raise ValueError(f"Xs has {n} rows but Y has {Y.shape[0]}")
    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    if len(alphas) == 0 or (alphas <= 0).any():
        raise ValueError(f"alphas={alphas.tolist()}: give at least one positive penalty")
    x_mean, y_mean = Xs.mean(0), Y.mean(0)
    Xc, Yc = Xs - x_mean, Y - y_mean
    U, s2, V = _thin_svd(Xc)
    UtY = U.T @ Yc  # [r, P]
    U2 = U * U
    best = np.full(Y.shape[1], np.inf)
    best_alpha = np.full(Y.shape[1], alphas[0])
    for a in alphas:
        f = s2 / (s2 + a)
        h = U2 @ f + 1.0 / n  # hat diagonal, intercept included
        resid = Yc - U @ (f[:, None] * UtY)
        loo = ((resid / np.maximum(1.0 - h, 1e-12)[:, None]) ** 2).mean(0)
        better = loo < best
        best[better], best_alpha[better] = loo[better], a
    # coefficients: w = V diag(s / (s² + alpha)) U^T y, per column with its own alpha
    s = np.sqrt(s2)
    W = ((s / (s2[None, :] + best_alpha[:, None])) * UtY.T) @ V.T  # [P, d]
    b = y_mean - W @ x_mean
    return W, b, best_alpha, best


def _ridge_predict(U, s2, V, x_mean, Y, alphas, X_new) -> np.ndarray:
    """Predictions [alpha, n_new, P] for every penalty, from the thin SVD of the centred design."""
    y_mean = Y.mean(0)
    UtY = U.T @ (Y - y_mean)  # [r, P]
    Z = (X_new - x_mean) @ V  # [n_new, r]
    s = np.sqrt(s2)
    return np.stack([Z @ ((s / (s2 + a))[:, None] * UtY) + y_mean for a in alphas])


def ridge_cv(Xs: np.ndarray, Y: np.ndarray, alphas=DEFAULT_ALPHAS, groups=None, n_inner: int = 3, seed: int = 0):
    """`ridge_gcv`, except that with `groups` (speakers; at least 2) the penalty of each column is
    the one with the least squared error over `n_inner` speaker-grouped folds of the training
    clips. Returns W [P, d], b [P], alpha [P], cv_mse [P]."""
    Xs = np.asarray(Xs, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    Y = Y[:, None] if Y.ndim == 1 else Y
    if groups is None or len(np.unique(groups)) < 2:
        return ridge_gcv(Xs, Y, alphas)
    from sklearn.model_selection import GroupKFold

    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    if len(alphas) == 0 or (alphas <= 0).any():
        raise ValueError(f"alphas={alphas.tolist()}: give at least one positive penalty")
    groups = np.asarray(groups)
    k = min(n_inner, len(np.unique(groups)))
    sse = np.zeros((len(alphas), Y.shape[1]))
    splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for tr, te in splitter.split(Xs, groups=groups):
        x_mean = Xs[tr].mean(0)
        U, s2, V = _thin_svd(Xs[tr] - x_mean)
        pred = _ridge_predict(U, s2, V, x_mean, Y[tr], alphas, Xs[te])
        sse += ((pred - Y[te]) ** 2).sum(1)
    best = sse.argmin(0)
    chosen = alphas[best]
    x_mean, y_mean = Xs.mean(0), Y.mean(0)
    U, s2, V = _thin_svd(Xs - x_mean)
    UtY = U.T @ (Y - y_mean)
    s = np.sqrt(s2)
    W = ((s / (s2[None, :] + chosen[:, None])) * UtY.T) @ V.T
    return W, y_mean - W @ x_mean, chosen, sse[best, np.arange(Y.shape[1])] / len(Y)


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, np.ndarray]:
    """r2, ccc and pearson of predictions [..., n] against y_true [..., n] (broadcast). A constant
    prediction has pearson = ccc = 0."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    t, p = np.broadcast_arrays(t, p)
    tm, pm = t.mean(-1, keepdims=True), p.mean(-1, keepdims=True)
    vt, vp = ((t - tm) ** 2).mean(-1), ((p - pm) ** 2).mean(-1)
    cov = ((t - tm) * (p - pm)).mean(-1)
    sse = ((t - p) ** 2).mean(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(vt > 0, 1.0 - sse / np.where(vt > 0, vt, 1.0), np.nan)
        denom = np.sqrt(vt * vp)
        pearson = np.where(denom > 0, cov / np.where(denom > 0, denom, 1.0), 0.0)
        ccc_den = vt + vp + (tm[..., 0] - pm[..., 0]) ** 2
        ccc = np.where(ccc_den > 0, 2 * cov / np.where(ccc_den > 0, ccc_den, 1.0), 0.0)
    return {"r2": r2, "ccc": ccc, "pearson": pearson}


def group_moments(y_true: np.ndarray, y_pred: np.ndarray, groups) -> np.ndarray:
    """[G, ..., 6] additive moments (n, sum t, sum p, sum t², sum p², sum tp) of each group's clips
    (groups in `np.unique` order), for predictions [..., n] against y_true [..., n]. Both are
    first shifted by the mean of y_true, which leaves every metric unchanged and keeps the sums
    of squares well conditioned. Sums of such moments over any set of groups give that set's
    metrics through `metrics_from_moments` (the speaker bootstrap of pooled R², CCC and r)."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    t, p = np.broadcast_arrays(t, p)
    shift = t.mean(-1, keepdims=True)
    t, p = t - shift, p - shift
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(g, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(g[order]) != 0])
    t, p = t[..., order], p[..., order]
    sums = [np.add.reduceat(q, starts, axis=-1) for q in (np.ones_like(t), t, p, t * t, p * p, t * p)]
    return np.moveaxis(np.stack(sums, axis=-1), -2, 0)  # [..., G, 6] -> [G, ..., 6]


def metrics_from_moments(moments: np.ndarray) -> dict[str, np.ndarray]:
    """r2, ccc and pearson from summed moments [..., 6] (see `group_moments`): the same numbers
    `regression_metrics` gives on the clips the moments were summed over."""
    M = np.asarray(moments, dtype=np.float64)
    n, st, sp, stt, spp, stp = np.moveaxis(M, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tm, pm = st / n, sp / n
        vt = np.maximum(stt / n - tm * tm, 0.0)
        vp = np.maximum(spp / n - pm * pm, 0.0)
        cov = stp / n - tm * pm
        sse = (stt - 2 * stp + spp) / n
        r2 = np.where(vt > 0, 1.0 - sse / np.where(vt > 0, vt, 1.0), np.nan)
        denom = np.sqrt(vt * vp)
        pearson = np.where(denom > 0, cov / np.where(denom > 0, denom, 1.0), 0.0)
        ccc_den = vt + vp + (tm - pm) ** 2
        ccc = np.where(ccc_den > 0, 2 * cov / np.where(ccc_den > 0, ccc_den, 1.0), 0.0)
    return {"r2": r2, "ccc": ccc, "pearson": pearson}


def concordance_correlation(y_true, y_pred) -> float:
    """Lin's concordance correlation coefficient of two [n] vectors."""
    return float(regression_metrics(y_true, y_pred)["ccc"])


class RidgeProbe(RegressorMixin, BaseEstimator):
    """Standardise + ridge regression, penalty picked from `alphas` by cross-validation within
    the training clips (speaker-grouped when `fit` gets `groups`, else exact leave-one-out).

    Parameters
    ----------
    alphas : candidate penalties (sum-of-squares form: ||y - Xw - b||² + alpha ||w||²).
    n_inner : speaker-grouped folds for the penalty choice (used only with groups).

    Learned state: n_features_in_, mean_, scale_ (the standardisation), coef_ [d] and intercept_
    (in standardised space), alpha_ (the chosen penalty), cv_mse_ (its validation error).
    """

    def __init__(self, alphas=DEFAULT_ALPHAS, n_inner: int = 3):
        self.alphas = alphas
        self.n_inner = n_inner

    def fit(self, X, y, groups=None):
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True)
        self.mean_, self.scale_ = standardise(X)
        W, b, alpha, mse = ridge_cv((X - self.mean_) / self.scale_, y, self.alphas, groups, self.n_inner)
        self.coef_, self.intercept_ = W[0], float(b[0])
        self.alpha_, self.cv_mse_ = float(alpha[0]), float(mse[0])
        return self

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return ((X - self.mean_) / self.scale_) @ self.coef_ + self.intercept_

    def readout(self) -> tuple[np.ndarray, float]:
        """(w [d], b) in the original activation space: prediction = x @ w + b."""
        check_is_fitted(self)
        w = self.coef_ / self.scale_
        return w, float(self.intercept_ - w @ self.mean_)
