"""Activation patching: one generic loop over (site × time window) plus a tiny window setter.

Denoising runs the corrupt input with clean activations patched in (is this site × window
sufficient to restore the clean behaviour?); noising runs the clean input with corrupt
activations patched in (is it necessary?). Both are reported on one scale: corrupt run = 0,
clean run = 1. All windows of one site are patched in one batched forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from affectlens.models.base import Adapter, Batch, Intervention
from affectlens.models.sites import BLOCK_INNER_POINTS, parse_site

# Pairs whose clean and corrupt metric differ by less than this cannot be normalised.
MIN_METRIC_GAP = 1e-3

Cell = tuple[str, str, int]  # (direction, site, frame_start): one cell of the patching grid


class Metric(Protocol):
    capture: list[str]

    def __call__(self, cache: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """[batch] metric values, linear in logits."""


@dataclass
class ProbeLogitDiff:
    """Logit of `target` minus logit of `source` of a linear probe read at `site`, on the
    activation mean-pooled over each clip's real frames (padding frames never enter)."""

    site: str
    weight: torch.Tensor  # [classes, d]
    bias: torch.Tensor  # [classes]
    source_index: int
    target_index: int

    @property
    def capture(self) -> list[str]:
        return [self.site]

    def __call__(self, cache: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        h = cache[self.site].float()
        pooled = torch.stack([h[i, :n].mean(0) for i, n in enumerate(batch.n_frames)])
        logits = pooled @ self.weight.T + self.bias
        return logits[:, self.target_index] - logits[:, self.source_index]

    @classmethod
    def from_readout(cls, site: str, weight: np.ndarray, bias: np.ndarray, classes: list, source, target):
        classes = list(classes)
        return cls(site, torch.as_tensor(weight, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32),
                   classes.index(source), classes.index(target))


def time_windows(n_frames: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Half-open frame windows [a, a + size) starting every `stride` frames while a < n_frames;
    size <= 0 means the whole span. Windows are not cut at the clip's end, so every pair shares
    one grid of windows (a window reaching past a clip's end patches what the model holds there)."""
    if size <= 0:
        return [(0, n_frames)]
    return [(a, a + size) for a in range(0, n_frames, stride)]


def window_setter(donor: torch.Tensor, windows: list[tuple[int, int]]) -> Intervention:
    """Row i of the batch gets donor[a_i:b_i] written over frames [a_i, b_i) (donor: [frame, d])."""

    def setter(activation: torch.Tensor, site: str) -> torch.Tensor:
        out = activation.clone()
        for i, (a, b) in enumerate(windows):
            b = min(b, out.shape[1], donor.shape[0])  # towers without padding end at their input
            out[i, a:b] = donor[a:b].to(out.dtype)
        return out

    return setter


def resume_site(site: str, metric: Metric) -> str:
    """Where a patched run starts: at `site` itself, or for a site inside a block (attn_heads,
    attn_out, mlp_hidden, mlp_out) at its block's input, with the patch applied by a hook as the
    run passes the site, so that adapters that resume mid-model (`run_from`) skip the blocks
    before it. Not when the metric reads a site at or before the block's input."""
    parsed = parse_site(site)
    if parsed.point not in BLOCK_INNER_POINTS:
        return site
    start = parsed.block_input
    if any(parse_site(c).tower == parsed.tower and parse_site(c) <= start for c in metric.capture):
        return site
    return str(start)


def run_patched(adapter: Adapter, batch: Batch, site: str, base_cache: dict[str, torch.Tensor],
                edit: Intervention, metric: Metric) -> torch.Tensor:
    """The metric of `batch` (the base input repeated once per edit row) with `edit` applied at
    `site`, everything before `site` taken from the base run's cache (which holds
    `resume_site(site, metric)`)."""
    n = len(batch)
    start = resume_site(site, metric)
    if start == site:
        patched = edit(base_cache[site].expand(n, *base_cache[site].shape[1:]), site)
        _, cache = adapter.run_from(batch, site, patched, capture=metric.capture)
    else:
        _, cache = adapter.run_from(batch, start, base_cache[start].expand(n, *base_cache[start].shape[1:]),
                                    capture=metric.capture, interventions={site: edit})
    return metric(cache, batch)


def base_runs(adapter: Adapter, clean: Batch, corrupt: Batch, sites: list[str], metric: Metric,
              corrupt_interventions: dict[str, Intervention] | None = None):
    """The clean and corrupt runs of one pair: (metric clean, metric corrupt, clean cache, corrupt
    cache), the caches holding `sites`, the metric's sites and where patched runs resume."""
    capture = list(dict.fromkeys([*sites, *(resume_site(s, metric) for s in sites), *metric.capture]))
    _, clean_cache = adapter.run(clean, capture=capture)
    _, corrupt_cache = adapter.run(corrupt, capture=capture, interventions=corrupt_interventions)
    return float(metric(clean_cache, clean)[0]), float(metric(corrupt_cache, corrupt)[0]), clean_cache, corrupt_cache


def patch_pair(adapter: Adapter, clean: Batch, corrupt: Batch, sites: list[str],
               windows: list[tuple[int, int]], metric: Metric, max_batch: int = 16,
               corrupt_interventions: dict[str, Intervention] | None = None,
               cells: set[Cell] | None = None) -> pd.DataFrame:
    """Exact patching of one pair over sites × windows, both directions. One row per
    (direction, site, window) with the raw metric and its normalised value (method = "exact").
    `corrupt_interventions` make the corrupt run from the corrupt input (e.g. embedding noise);
    patched runs start from the corrupt run's cached activations, so they carry the edit too.
    `cells` (e.g. `top_cells` of attribution patching) limits the grid to those cells."""
    m_clean, m_corrupt, clean_cache, corrupt_cache = base_runs(adapter, clean, corrupt, sites, metric,
                                                               corrupt_interventions)
    gap = m_clean - m_corrupt
    rows = []
    runs = (("denoising", corrupt, corrupt_cache, clean_cache), ("noising", clean, clean_cache, corrupt_cache))
    for direction, base, base_cache, donor_cache in runs:
        for site in sites:
            donor = donor_cache[site][0]
            todo = windows if cells is None else [w for w in windows if (direction, site, w[0]) in cells]
            for lo in range(0, len(todo), max_batch):
                chunk = todo[lo:lo + max_batch]
                # Everything before `site` equals the base run: start there from its cached activation.
                values = run_patched(adapter, base.repeat(len(chunk)), site, base_cache,
                                     window_setter(donor, chunk), metric).tolist()
                for (a, b), raw in zip(chunk, values):
                    rows.append({
                        "method": "exact", "direction": direction, "site": site, "depth": parse_site(site).depth,
                        "frame_start": a, "frame_end": b,
                        "start_s": a / adapter.frame_rate, "end_s": b / adapter.frame_rate,
                        "raw": raw, "clean": m_clean, "corrupt": m_corrupt,
                        "normalised": (raw - m_corrupt) / gap if abs(gap) >= MIN_METRIC_GAP else np.nan,
                    })
    return pd.DataFrame(rows)


def top_cells(rows: pd.DataFrame, k: int) -> set[Cell]:
    """The k cells per direction whose patch moves the metric furthest from the base run's, by
    |raw - base| (base: the corrupt run when denoising, the clean run when noising), for rows of
    one pair (either method); ties go to the earlier site, then window. This ranks as |normalised|
    does (|normalised - 1| when noising) and stays defined when the pair cannot be normalised."""
    base = rows["corrupt"].where(rows["direction"] == "denoising", rows["clean"])
    ranked = rows.assign(size=(rows["raw"] - base).abs()).sort_values(
        ["direction", "size", "depth", "frame_start"], ascending=[True, False, True, True], kind="stable")
    top = ranked.groupby("direction", sort=False).head(k)
    return set(zip(top["direction"], top["site"], top["frame_start"].astype(int)))


SUMMARY_KEYS = ("method", "direction", "site", "depth", "frame_start", "frame_end", "start_s", "end_s")


def summarise(effects: pd.DataFrame, n_boot: int = 1000, seed: int = 0, keys: tuple[str, ...] = SUMMARY_KEYS,
              order: tuple[str, ...] = ("method", "direction", "depth", "frame_start")) -> pd.DataFrame:
    """Mean normalised effect over pairs per (direction, site, window) with a percentile bootstrap
    95% interval over pairs. Pairs that could not be normalised are left out and counted. `keys`
    name a cell (head-level patching adds the head), `order` sorts the cells."""
    rng = np.random.default_rng(seed)
    if "method" not in effects:
        effects = effects.assign(method="exact")
    keys = list(keys)
    rows = []
    for key, g in effects.groupby(keys, sort=True):
        v = g["normalised"].dropna().to_numpy()
        row = dict(zip(keys, key))
        row["n_pairs"] = len(v)
        row["n_excluded"] = int(g["normalised"].isna().sum())
        row["mean"] = float(v.mean()) if len(v) else np.nan
        row["raw_mean"] = float(g["raw"].mean())
        if len(v) > 1:
            boots = rng.choice(v, size=(n_boot, len(v)), replace=True).mean(1)
            row["ci_low"], row["ci_high"] = np.percentile(boots, [2.5, 97.5])
        else:
            row["ci_low"] = row["ci_high"] = np.nan
        rows.append(row)
    return pd.DataFrame(rows).sort_values(list(order)).reset_index(drop=True)
