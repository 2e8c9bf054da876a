"""Head-level patching heatmaps: block × head (each head over the whole clip) and head × time
window, drawn by `plot_patch_heatmap` from a head summary (affectlens.patching.heads)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from affectlens.naming import HEAD_MAPS
from affectlens.viz.heatmap import plot_patch_heatmap

MAPS = dict(zip(HEAD_MAPS, [("span", "head"), ("window", "time window (s)")], strict=True))
"""Map kind (naming.HEAD_MAPS, the file stem's `__{kind}`: block × head, head × time window) ->
(the head summary's scope it draws, its x axis)."""


def block_head_grid(heads: pd.DataFrame) -> pd.DataFrame:
    """The span cells as a patch summary whose rows are attn_heads sites (by depth) and whose
    columns are heads."""
    d = heads[heads["scope"] == "span"].copy()
    d["frame_start"] = d["head"].astype(int)
    d["window"] = [f"head {h}" for h in d["frame_start"]]
    return d


def head_window_grid(heads: pd.DataFrame) -> pd.DataFrame:
    """The window cells as a patch summary whose rows are (site, head), by depth then head, and
    whose columns are the time windows."""
    d = heads[heads["scope"] == "window"].copy()
    h = d["head"].astype(int)
    d["site"] = [f"{s.removesuffix('.attn_heads')} head {k}" for s, k in zip(d["site"], h)]
    d["depth"] = d["depth"].astype(int) * 10_000 + h  # rows sort by block, then head
    return d


def plot_head_heatmap(heads: pd.DataFrame, kind: str, path: str | Path, title: str, method: str = "exact",
                      vmax: float | None = None) -> Path | None:
    """One head-level map (`kind` in MAPS) of a head summary; None when it has no such cells."""
    scope, xlabel = MAPS[kind]
    grid = block_head_grid(heads) if scope == "span" else head_window_grid(heads)
    if "method" in grid:
        grid = grid[grid["method"] == method]
    if grid.empty:
        return None
    what = "each head over the whole clip" if scope == "span" else "each head over each time window"
    return plot_patch_heatmap(grid, path, f"{title}\nheads ({what})", method=method, vmax=vmax, xlabel=xlabel)
