"""More ways to find a steering direction, beside `vectors.diff_of_means`, and ways to combine them.

- `probe_direction`: the gradient, in activation space, of a fitted LinearProbe's logit difference
  (target - source); the direction a linear reader of the site is most sensitive to.
- `pca_direction`: the first principal axis of paired differences (same speaker and sentence,
  target minus source: `paired_differences`), as in representation engineering's PCA reading
  vectors; sign-aligned with the mean difference.
- `interpolate`: a vector between two concepts' vectors; `window_frames`: seconds -> frame span
  for `add_vector(..., frames=...)`, to steer one stretch of a clip only.

Every direction is returned at a comparable length: its unit vector times the mean difference of
the classes' projections on it, so alpha = 1 moves a clip as far along it as the classes lie apart.
"""

from __future__ import annotations

import numpy as np


def _scaled(direction: np.ndarray, X: np.ndarray, labels: np.ndarray, source: str, target: str) -> np.ndarray:
    u = direction / np.linalg.norm(direction)
    gap = (X[labels == target] @ u).mean() - (X[labels == source] @ u).mean()
    return (u * gap).astype(np.float32)


def _check(X, labels, source, target):
    X = np.asarray(X, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    if X.ndim != 2 or len(X) != len(labels):
        raise ValueError(f"X must be [clip, d] with one label per clip; got X {X.shape}, {len(labels)} labels")
    for c in (source, target):
        if not (labels == c).any():
            raise ValueError(f"no clip is labelled {c!r} (labels present: {sorted(set(labels.tolist()))})")
    return X, labels


def probe_direction(probe, source: str, target: str) -> np.ndarray:
    """[d] unit vector: d/dx of (logit_target - logit_source) of a fitted LinearProbe (whose coef_
    lives in standardised space, hence the division by scale_)."""
    classes = list(probe.classes_)
    for c in (source, target):
        if c not in classes:
            raise ValueError(f"the probe was not fit on class {c!r} (it knows {classes})")
    w = np.asarray(probe.coef_, dtype=np.float64)
    g = (w[classes.index(target)] - w[classes.index(source)]) / np.asarray(probe.scale_, dtype=np.float64)
    return (g / np.linalg.norm(g)).astype(np.float32)


def probe_vector(X: np.ndarray, labels, source: str, target: str, C: float = 1.0) -> np.ndarray:
    """[d] steering vector along a LinearProbe fit on the source and target clips of X [clip, d]."""
    from affectlens.probes.linear import LinearProbe

    X, labels = _check(X, labels, source, target)
    keep = np.isin(labels, [source, target])
    probe = LinearProbe(C=C).fit(X[keep], labels[keep])
    return _scaled(probe_direction(probe, source, target).astype(np.float64), X, labels, source, target)


def paired_differences(X: np.ndarray, labels, pair_keys, source: str, target: str) -> np.ndarray:
    """[pair, d]: per pair_key having both classes, mean of its target rows - mean of its source rows."""
    X, labels = _check(X, labels, source, target)
    pair_keys = np.asarray(pair_keys).astype(str)
    diffs = []
    for k in np.unique(pair_keys):
        mine = pair_keys == k
        s, t = mine & (labels == source), mine & (labels == target)
        if s.any() and t.any():
            diffs.append(X[t].mean(0) - X[s].mean(0))
    if len(diffs) < 2:
        raise ValueError(f"{len(diffs)} pair_key(s) have clips of both {source!r} and {target!r}; "
                         "PCA of paired differences needs at least 2 pairs (check the manifest's pair_key)")
    return np.stack(diffs)


def pca_direction(diffs: np.ndarray) -> np.ndarray:
    """[d] unit vector: first right singular vector of the (uncentred) differences [pair, d], i.e.
    the axis with the largest mean squared projection of the differences, signed so that the mean
    difference projects positively on it."""
    D = np.asarray(diffs, dtype=np.float64)
    _, _, vt = np.linalg.svd(D, full_matrices=False)
    u = vt[0]
    if D.mean(0) @ u < 0:
        u = -u
    return u.astype(np.float32)


def pca_vector(X: np.ndarray, labels, pair_keys, source: str, target: str) -> np.ndarray:
    """[d] steering vector along the first PC of paired differences, scaled by their mean projection."""
    D = paired_differences(X, labels, pair_keys, source, target)
    u = pca_direction(D).astype(np.float64)
    return (u * (D @ u).mean()).astype(np.float32)


def interpolate(vector_a: np.ndarray, vector_b: np.ndarray, t: float) -> np.ndarray:
    """(1 - t) a + t b: t = 0 is concept a, t = 1 concept b, between them a blend (e.g. calm->angry
    and calm->happy at t = 0.5); outside [0, 1] extrapolates."""
    a, b = np.asarray(vector_a, dtype=np.float64), np.asarray(vector_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"interpolate needs two [d] vectors of one size, got {a.shape} and {b.shape}")
    return ((1 - t) * a + t * b).astype(np.float32)


def window_frames(start_s: float, stop_s: float, frame_rate: float) -> tuple[int, int]:
    """Seconds [start_s, stop_s) -> activation frames [start, stop) at `frame_rate` (Whisper: 50/s)."""
    if not 0 <= start_s < stop_s:
        raise ValueError(f"time window [{start_s}, {stop_s}) s must satisfy 0 <= start < stop")
    return int(np.floor(start_s * frame_rate)), max(int(np.ceil(stop_s * frame_rate)), int(np.floor(start_s * frame_rate)) + 1)


METHODS = ("diff_of_means", "probe", "pca", "sae")


def fit_steerer(method: str, X: np.ndarray, labels, speakers, source: str, target: str, pair_keys=None,
                sae=None, latents: np.ndarray | None = None, k_features: int = 4):
    """alpha -> Intervention for one steering method, fit on pooled site
    activations X [clip, d] of labelled clips (the workflow passes the other speakers' clips).

    diff_of_means: per-speaker averaged difference of means; probe: `probe_vector`; pca:
    `pca_vector` of paired differences (needs `pair_keys`); sae: `concept_edits` of the SAE's
    pooled `latents` [clip, n_latents] (k_features clamped on, k_features zeroed) applied by
    `sae_edit`."""
    from affectlens.probes.axis import diff_of_means
    from affectlens.steering.vectors import add_vector

    if method == "sae":
        from affectlens.steering.sae_edit import concept_edits, sae_edit

        if sae is None or latents is None:
            raise ValueError("method sae needs an SAE at the steer site (list the steer_site among the model's "
                             "sae_sites) and its pooled latents")
        edits = concept_edits(latents, labels, source, target, k=k_features)
        return lambda alpha: sae_edit(sae, edits, alpha)
    if method == "diff_of_means":
        v = diff_of_means(X, labels, speakers, source, target)
    elif method == "probe":
        v = probe_vector(X, labels, source, target)
    elif method == "pca":
        if pair_keys is None:
            raise ValueError("method pca needs the manifest's pair_key column (clips paired across emotions)")
        v = pca_vector(X, labels, pair_keys, source, target)
    else:
        raise ValueError(f"steering method {method!r}: choose from {METHODS}")
    return lambda alpha: add_vector(v, alpha)
