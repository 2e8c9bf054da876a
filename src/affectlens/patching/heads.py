"""Head-level activation patching: one attention head at a time, at `attn_heads` sites.

An `attn_heads` site holds the heads' outputs before the attention's output projection,
[frame, head * d_head] head-major. Patching head h replaces columns h * d_head ... (h + 1) * d_head
- 1 of the base run's activation with the donor's, over a span of frames: the whole clip (`span`:
the block × head map) or each time window of the site grid (`window`: the head × time window
map). The output projection is linear, so this is exactly patching that head's term of attn_out.
Both directions, on the scale of `patch_pair` (corrupt run = 0, clean run = 1); every cell of
one site is run in batched forwards that resume at the block's input (`run_patched`).

Attribution patching gives the same grid from the gradient at the site: the sum over the head's
columns and the span's frames of (donor - base) · ∂metric/∂base, from one forward and backward
per run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from affectlens.models.base import Adapter, Batch, Intervention
from affectlens.models.sites import parse_site
from affectlens.patching.attribution import grad_run, window_sums
from affectlens.patching.patch import MIN_METRIC_GAP, Metric, base_runs, run_patched, summarise

SCOPES = ("span", "window")
"""`span`: each head patched over the whole clip (block × head map); `window`: over each time
window of the site grid too (head × time window map)."""
HEAD_KEYS = ("method", "direction", "scope", "site", "depth", "head", "frame_start", "frame_end", "start_s", "end_s")

HeadCell = tuple[int, int, int]  # (head, frame_start, frame_end)


def head_cells(n_heads: int, windows: list[tuple[int, int]], n_frames: int, scopes=SCOPES) -> list[tuple[str, HeadCell]]:
    """The cells of one attn_heads site: (scope, (head, a, b)) for every head over the span
    [0, n_frames) and, with scope `window`, over each window."""
    spans = ([("span", (0, n_frames))] if "span" in scopes else []) + \
            ([("window", w) for w in windows] if "window" in scopes else [])
    return [(scope, (h, a, b)) for scope, (a, b) in spans for h in range(n_heads)]


def head_setter(donor: torch.Tensor, cells: list[HeadCell], d_head: int) -> Intervention:
    """Row i of the batch gets the donor's head h_i over frames [a_i, b_i) (donor: [frame, H * d_head])."""

    def setter(activation: torch.Tensor, site: str) -> torch.Tensor:
        out = activation.clone()
        for i, (h, a, b) in enumerate(cells):
            b = min(b, out.shape[1], donor.shape[0])  # towers without padding end at their input
            cols = slice(h * d_head, (h + 1) * d_head)
            out[i, a:b, cols] = donor[a:b, cols].to(out.dtype)
        return out

    return setter


def _row(method, direction, scope, site, head, a, b, frame_rate, raw, m_clean, m_corrupt) -> dict:
    gap = m_clean - m_corrupt
    return {"method": method, "direction": direction, "scope": scope, "site": site,
            "depth": parse_site(site).depth, "head": head, "frame_start": a, "frame_end": b,
            "start_s": a / frame_rate, "end_s": b / frame_rate, "raw": raw, "clean": m_clean, "corrupt": m_corrupt,
            "normalised": (raw - m_corrupt) / gap if abs(gap) >= MIN_METRIC_GAP else np.nan}


def patch_heads_pair(adapter: Adapter, clean: Batch, corrupt: Batch, heads: dict[str, int],
                     windows: list[tuple[int, int]], n_frames: int, metric: Metric, max_batch: int = 16,
                     corrupt_interventions: dict[str, Intervention] | None = None,
                     scopes: tuple[str, ...] = SCOPES) -> pd.DataFrame:
    """Exact head-level patching of one pair: every head of every attn_heads site in `heads`
    ({site: n_heads}) over the span [0, n_frames) and, with scope `window`, over each window; both
    directions. One row per (direction, scope, site, head, frames), method = "exact"."""
    sites = list(heads)
    m_clean, m_corrupt, clean_cache, corrupt_cache = base_runs(adapter, clean, corrupt, sites, metric,
                                                               corrupt_interventions)
    rows = []
    runs = (("denoising", corrupt, corrupt_cache, clean_cache), ("noising", clean, clean_cache, corrupt_cache))
    for direction, base, base_cache, donor_cache in runs:
        for site, n_heads in heads.items():
            donor = donor_cache[site][0]
            d_head = _head_width(donor.shape[-1], n_heads, site)
            cells = head_cells(n_heads, windows, n_frames, scopes)
            for lo in range(0, len(cells), max_batch):
                chunk = cells[lo:lo + max_batch]
                values = run_patched(adapter, base.repeat(len(chunk)), site, base_cache,
                                     head_setter(donor, [c for _, c in chunk], d_head), metric).tolist()
                for (scope, (h, a, b)), raw in zip(chunk, values):
                    rows.append(_row("exact", direction, scope, site, h, a, b, adapter.frame_rate, raw,
                                     m_clean, m_corrupt))
    return pd.DataFrame(rows)


def attribute_heads_pair(adapter: Adapter, clean: Batch, corrupt: Batch, heads: dict[str, int],
                         windows: list[tuple[int, int]], n_frames: int, metric: Metric,
                         corrupt_interventions: dict[str, Intervention] | None = None,
                         scopes: tuple[str, ...] = SCOPES) -> pd.DataFrame:
    """Attribution patching on the grid of `patch_heads_pair` (method = "attribution"): `raw`
    is the base run's metric plus the first-order estimate of patching the head's columns."""
    sites = list(heads)
    m_clean, clean_acts, clean_grads = grad_run(adapter, clean, sites, metric)
    m_corrupt, corrupt_acts, corrupt_grads = grad_run(adapter, corrupt, sites, metric, corrupt_interventions)
    rows = []
    runs = (("denoising", m_corrupt, corrupt_acts, corrupt_grads, clean_acts),
            ("noising", m_clean, clean_acts, clean_grads, corrupt_acts))
    for direction, m_base, base, grads, donor in runs:
        for site, n_heads in heads.items():
            n = min(base[site].shape[0], donor[site].shape[0])  # frames past the donor's end are not patched
            d_head = _head_width(base[site].shape[-1], n_heads, site)
            delta = (donor[site][:n].float() - base[site][:n].float()) * grads[site][:n].float()
            per_head = delta.reshape(n, n_heads, d_head).sum(-1).numpy()  # [frame, head]
            for scope, (h, a, b) in head_cells(n_heads, windows, n_frames, scopes):
                estimate = float(window_sums(per_head[:, h], [(a, b)])[0])
                rows.append(_row("attribution", direction, scope, site, h, a, b, adapter.frame_rate,
                                 m_base + estimate, m_clean, m_corrupt))
    return pd.DataFrame(rows)


def _head_width(width: int, n_heads: int, site: str) -> int:
    if n_heads < 1 or width % n_heads:
        raise ValueError(f"site {site}: {width} columns do not split into {n_heads} heads")
    return width // n_heads


def summarise_heads(effects: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean normalised effect over pairs per (method, direction, scope, site, head, frames) with
    a bootstrap 95% interval (as `summarise`). Span cells end at each pair's own last frame; they
    are one cell, whose frame_end / end_s are the longest pair's."""
    if effects.empty:
        return pd.DataFrame(columns=[*HEAD_KEYS, "n_pairs", "n_excluded", "mean", "raw_mean", "ci_low", "ci_high"])
    e = effects.copy()
    span = e["scope"] == "span"
    for col in ("frame_end", "end_s"):
        e.loc[span, col] = e.loc[span, col].max()
    return summarise(e, n_boot, seed, keys=HEAD_KEYS,
                     order=("method", "direction", "scope", "depth", "head", "frame_start"))
