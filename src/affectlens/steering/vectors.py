"""Steering vectors added during a forward, and projections on them.

The default direction is `probes.axis.diff_of_means`: a per-speaker difference of means, so what a
speaker's voice contributes to both classes cancels and speakers with more clips of one class
cannot bend it.
"""

from __future__ import annotations

import numpy as np
import torch

from affectlens.models.base import Intervention


def project(X: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Scalar projection of each row of X [..., d] on the direction of v [d] -> [...]."""
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v)
    if n == 0:
        raise ValueError("cannot project on a zero vector")
    return (np.asarray(X, dtype=np.float64) @ (v / n)).astype(np.float32)


def add_vector(vector, alpha: float, frames: tuple[int, int] | None = None) -> Intervention:
    """An intervention adding alpha * vector [d] to every frame of act [batch, frame, d], or only
    to frames in [start, stop) when `frames` is given. alpha = 0 returns the activation unchanged."""
    v = torch.as_tensor(np.asarray(vector), dtype=torch.float32)
    if v.ndim != 1:
        raise ValueError(f"a steering vector is [d], got shape {tuple(v.shape)}")
    if frames is not None:
        start, stop = frames
        if not (0 <= start < stop):
            raise ValueError(f"frame span {frames} must satisfy 0 <= start < stop")

    def steer(act: torch.Tensor, site: str) -> torch.Tensor:
        if alpha == 0:
            return act
        if act.shape[-1] != v.shape[0]:
            raise ValueError(f"steering vector has d={v.shape[0]} but {site} has d={act.shape[-1]}")
        delta = (alpha * v).to(device=act.device, dtype=act.dtype)
        if frames is None:
            return act + delta
        out = act.clone()
        out[:, frames[0]:frames[1]] += delta
        return out

    return steer
