"""The acoustic emotion judge of steered audio: it sees only hand-made acoustic features (MFCC
statistics, pitch and energy; `affectlens.acoustics`), never the model that was steered, so a change
in its verdict is not the steered model grading itself."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from affectlens.acoustics import ACOUSTIC_FEATURE_NAMES, LEVEL_FEATURES, acoustic_feature_matrix


class AcousticJudge(BaseEstimator):
    """An emotion classifier on acoustic features alone: standardise + logistic regression.

    Fit on the corpus's real clips; then `predict_proba` on steered clips tells whether the sound
    moved toward the target emotion, independently of the model that was steered. `level_free`
    (default) leaves out the features that move with absolute level (`LEVEL_FEATURES`); the
    features it reads are `ACOUSTIC_FEATURE_NAMES` minus those, and `fit_features` /
    `predict_proba_features` take full `acoustic_features` rows and select them.

    A scikit-learn estimator (get_params, clone): `__init__` stores the hyperparameters only, `fit`
    returns the judge and the learned state (`pipeline_`, `classes_`, `n_features_in_`, the number
    of `acoustic_features` columns) ends in `_`.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 2000, sr: int = 16000, n_jobs: int = 1,
                 level_free: bool = True):
        self.C = C
        self.max_iter = max_iter
        self.sr = sr
        self.n_jobs = n_jobs
        self.level_free = level_free

    @property
    def columns(self) -> np.ndarray:
        """Indices into ACOUSTIC_FEATURE_NAMES of the features the judge reads."""
        drop = LEVEL_FEATURES if self.level_free else ()
        return np.array([i for i, n in enumerate(ACOUSTIC_FEATURE_NAMES) if n not in drop])

    def features(self, waves: list[np.ndarray]) -> np.ndarray:
        return acoustic_feature_matrix(waves, self.sr, self.n_jobs)

    def fit(self, waves: list[np.ndarray], labels) -> "AcousticJudge":
        return self.fit_features(self.features(waves), labels)

    def fit_features(self, features: np.ndarray, labels) -> "AcousticJudge":
        """Fit on precomputed `acoustic_features` rows [clip, feature]."""
        labels, features = np.asarray(labels), np.asarray(features)
        if features.ndim != 2 or features.shape[1] != len(ACOUSTIC_FEATURE_NAMES):
            raise ValueError(f"expected acoustic_features rows [clip, {len(ACOUSTIC_FEATURE_NAMES)}], "
                             f"got {features.shape}")
        if len(labels) != len(features):
            raise ValueError(f"{len(features)} clips but {len(labels)} labels")
        if len(np.unique(labels)) < 2:
            raise ValueError(f"the judge needs at least two classes, got {np.unique(labels).tolist()}")
        self.pipeline_: Pipeline = make_pipeline(
            StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter))
        self.pipeline_.fit(features[:, self.columns], labels)
        self.classes_ = self.pipeline_.classes_
        self.n_features_in_ = features.shape[1]
        return self

    def _check(self) -> None:
        if not hasattr(self, "pipeline_"):
            raise NotFittedError("AcousticJudge is not fitted; call fit(waves, labels) first")

    def predict_proba(self, waves: list[np.ndarray]) -> np.ndarray:
        """[clip, class] probabilities, columns in `classes_` order."""
        self._check()
        return self.predict_proba_features(self.features(waves))

    def predict(self, waves: list[np.ndarray]) -> np.ndarray:
        self._check()
        return self.pipeline_.predict(self.features(waves)[:, self.columns])

    def predict_proba_features(self, features: np.ndarray) -> np.ndarray:
        self._check()
        return self.pipeline_.predict_proba(np.asarray(features)[:, self.columns])
