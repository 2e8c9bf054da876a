"""Normalising activations before a probe reads them: z-scores per corpus or per speaker.

Speech emotion work across corpora names normalisation as the first remedy for a probe that
learned one corpus's recording conditions or one speaker's voice: each feature is centred and
scaled by statistics of a group of clips (a whole corpus, or one speaker's clips). The statistics
come from the clips themselves, never from their labels, so normalising a test corpus or a held-out
speaker leaks nothing of what is scored.

  none     the activations as they are
  corpus   z-scored over all clips given (one corpus)
  speaker  z-scored over each speaker's clips

A feature constant within a group is centred and left unscaled (`linear.standardise`); a speaker
with a single clip becomes all zeros: it has nothing to be told apart from.
"""

from __future__ import annotations

import numpy as np

from affectlens.probes.linear import standardise

NORMALISATIONS = ("none", "corpus", "speaker")


def normalise(X: np.ndarray, groups=None, how: str = "none") -> np.ndarray:
    """X [clip, d] normalised `how` (one of NORMALISATIONS); `groups` [clip] are the speakers,
    needed for `speaker`. Returns float64 (X itself, unchanged, for `none`)."""
    if how not in NORMALISATIONS:
        raise ValueError(f"normalisation {how!r} is not one of {list(NORMALISATIONS)}")
    if how == "none":
        return X
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"normalise: X must be [clip, d]; got shape {X.shape}")
    if how == "corpus":
        mean, scale = standardise(X)
        return (X - mean) / scale
    if groups is None:
        raise ValueError("speaker normalisation needs the speaker of every clip")
    groups = np.asarray(groups)
    if len(groups) != len(X):
        raise ValueError(f"normalise: {len(groups)} speakers for {len(X)} clips")
    out = np.empty_like(X)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        mean, scale = standardise(X[rows])
        out[rows] = (X[rows] - mean) / scale
    return out
