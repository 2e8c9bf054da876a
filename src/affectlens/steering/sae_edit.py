"""Steering by SAE feature edits: switch chosen features off (zero), rescale them, or clamp them to
a level, for one concept or several at once, at the SAE's site.

The edit is applied to the SAE's latents and only its consequence is added to the activation:

    x' = x + alpha * (decode(edit(z)) - decode(z)),   z = encode(x)

so what the SAE does not reconstruct (its error term) is kept, alpha = 0 or an edit that changes
nothing returns x exactly, and alpha scales the edit like a vector's strength. Latents are in the
SAE's normalised units (the ones its dashboard and `feature_stats` report).

`concept_edits` picks the features of a contrast from labelled clips by the difference of their mean
activations: the k with the largest target - source difference (clamped on, at their mean activation
on target clips) and the k with the largest source - target difference (zeroed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from affectlens.models.base import Intervention

EditOp = Literal["zero", "scale", "clamp"]


@dataclass(frozen=True)
class FeatureEdit:
    """One feature's edit: `zero` it, `scale` it by `value`, or `clamp` it to `value` (wherever it
    is below that level, i.e. switch it on at least that strongly; `value` in latent units)."""

    feature: int
    op: EditOp
    value: float = 0.0

    def __post_init__(self):
        if self.op not in ("zero", "scale", "clamp"):
            raise ValueError(f"feature {self.feature}: edit op {self.op!r} is not one of zero, scale, clamp")


def merge_edits(*concepts: Sequence[FeatureEdit]) -> list[FeatureEdit]:
    """Several concepts' edits at once; one feature edited two different ways is an error."""
    out: dict[int, FeatureEdit] = {}
    for edits in concepts:
        for e in edits:
            if e.feature in out and out[e.feature] != e:
                raise ValueError(f"feature {e.feature} is edited twice: {out[e.feature]} and {e}")
            out[e.feature] = e
    return list(out.values())


def edit_latents(z: torch.Tensor, edits: Sequence[FeatureEdit]) -> torch.Tensor:
    """[..., n_latents] latents with `edits` applied (a copy)."""
    z = z.clone()
    n = z.shape[-1]
    for e in edits:
        if not 0 <= e.feature < n:
            raise ValueError(f"feature {e.feature} is out of range: the SAE has {n} latents")
        col = z[..., e.feature]
        if e.op == "zero":
            z[..., e.feature] = 0
        elif e.op == "scale":
            z[..., e.feature] = col * e.value
        else:
            z[..., e.feature] = torch.clamp(col, min=e.value)
    return z


def sae_edit(sae: torch.nn.Module, edits: Sequence[FeatureEdit], alpha: float = 1.0,
             frames: tuple[int, int] | None = None) -> Intervention:
    """An intervention at the SAE's site: x + alpha * (decode(edit(encode(x))) - decode(encode(x)))
    on every frame of act [batch, frame, d] (or frames [start, stop) only)."""
    edits = list(edits)
    d_in = sae.cfg.d_in

    @torch.no_grad()
    def steer(act: torch.Tensor, site: str) -> torch.Tensor:
        if alpha == 0 or not edits:
            return act
        if act.shape[-1] != d_in:
            raise ValueError(f"the SAE reads d={d_in} but {site} has d={act.shape[-1]}")
        span = slice(None) if frames is None else slice(*frames)
        x = act[:, span]
        flat = x.reshape(-1, d_in)
        z = sae.encode(flat)
        change = sae.decode(edit_latents(z, edits)) - sae.decode(z)
        out = act.clone()
        out[:, span] = x + (alpha * change).reshape(x.shape).to(act.dtype)
        return out

    return steer


def concept_edits(latents: np.ndarray, labels, source: str, target: str, k: int = 4) -> list[FeatureEdit]:
    """Feature edits for source -> target from pooled latents [clip, n_latents] of labelled clips:
    the k features with the largest mean-difference target - source (among those that fire on
    target clips) clamped on at their mean over target clips, and the k with the largest source -
    target difference zeroed."""
    z = np.asarray(latents, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    for c in (source, target):
        if not (labels == c).any():
            raise ValueError(f"no clip is labelled {c!r} (labels present: {sorted(set(labels.tolist()))})")
    mean_t, mean_s = z[labels == target].mean(0), z[labels == source].mean(0)
    diff = mean_t - mean_s
    on = [int(i) for i in np.argsort(-diff)[:k] if diff[i] > 0]
    off = [int(i) for i in np.argsort(diff)[:k] if diff[i] < 0]
    return [FeatureEdit(i, "clamp", float(mean_t[i])) for i in on] + [FeatureEdit(i, "zero") for i in off]
