"""Patching heatmaps: site (rows, by depth) × time window (columns, in seconds)."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from affectlens.io import atomic_path, write_text  # noqa: E402

DIRECTIONS = ("denoising", "noising")


def heatmap_grid(summary: pd.DataFrame, direction: str, method: str = "exact") -> pd.DataFrame:
    """[site, window] table of the mean normalised effect for one direction and method (rows by
    depth, columns by start time, labelled in seconds). The table spans every cell of the direction
    in any method: cells this method did not run (exact patching screened by attribution,
    `patch.exact: top_k`) are NaN."""
    d = summary[summary["direction"] == direction].copy()
    if "window" not in d:  # summaries over other columns (video tracing's token slices) bring their labels
        d["window"] = [f"{a:.2f}–{b:.2f}s" for a, b in zip(d["start_s"], d["end_s"])]
    rows = pd.MultiIndex.from_frame(d[["depth", "site"]].drop_duplicates())
    columns = pd.MultiIndex.from_frame(d[["frame_start", "window"]].drop_duplicates())
    if "method" in d:
        d = d[d["method"] == method]
    grid = d.pivot_table(index=["depth", "site"], columns=["frame_start", "window"], values="mean", aggfunc="first")
    grid = grid.reindex(index=rows, columns=columns).sort_index(axis=0).sort_index(axis=1)
    grid.index = grid.index.get_level_values("site")
    grid.columns = grid.columns.get_level_values("window")
    return grid


def methods_of(summary: pd.DataFrame) -> list[str]:
    """Methods present in a summary, exact first (older summaries without the column are exact)."""
    if "method" not in summary:
        return ["exact"]
    return sorted(set(summary["method"]), key=lambda m: (m != "exact", m))


def color_limit(summary: pd.DataFrame) -> float:
    """One symmetric colour limit for every map of a summary (at least 1, the clean run)."""
    v = summary["mean"].to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return float(max(1.0, np.abs(v).max() if len(v) else 0.0))


def plot_patch_heatmap(summary: pd.DataFrame, path: str | Path, title: str, method: str = "exact",
                       vmax: float | None = None, xlabel: str = "time window (s)") -> Path:
    """Denoising and noising side by side, sites (rows) × time windows (columns, seconds), on one
    diverging scale centred on 0 running from -vmax to +vmax (stated on the colour bar)."""
    present = summary if "method" not in summary else summary[summary["method"] == method]
    directions = [d for d in DIRECTIONS if (present["direction"] == d).any()]
    grids = [heatmap_grid(summary, d, method) for d in directions]
    if vmax is None:
        vmax = color_limit(present)
    n_cols = max(g.shape[1] for g in grids)
    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 + 0.55 * n_cols * len(grids), 1.4 + 0.45 * grids[0].shape[0]),
                             squeeze=False, constrained_layout=True)
    for ax, grid, direction in zip(axes[0], grids, directions):
        im = ax.imshow(grid.to_numpy(dtype=float), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_title({"denoising": "denoising (clean → corrupt run): sufficiency",
                      "noising": "noising (corrupt → clean run): necessity"}[direction], fontsize=9)
        for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}".replace("-0.00", "0.00"), ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 * vmax else "black")
    what = {"exact": "exact patching", "attribution": "attribution patching (gradient estimate)"}.get(method, method)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8,
                 label=f"normalised metric, scale ±{vmax:.2g}\n(corrupt run = 0, clean run = 1)")
    fig.suptitle(f"{title}\n{what}", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)
    return Path(path)


def write_index(entries: list[dict], path: str | Path) -> Path:
    """An HTML page listing every heatmap. entries: study, title, png, tsv (relative to the page),
    optionally `maps` [{label, png, tsv}, ...] shown side by side (exact and attribution) and
    `note` (e.g. attribution's agreement with exact patching)."""
    rows = []
    for study in dict.fromkeys(e["study"] for e in entries):
        rows.append(f"<h2>{html.escape(study)}</h2>")
        for e in (e for e in entries if e["study"] == study):
            maps = e.get("maps") or [{"label": "exact patching", "png": e["png"], "tsv": e["tsv"]}]
            cells = "".join(
                f'<td style="vertical-align:top;width:{100 // len(maps)}%"><img src="{html.escape(m["png"])}" '
                f'style="max-width:100%"><br>{html.escape(m["label"])} — '
                f'<a href="{html.escape(m["tsv"])}">numbers (TSV)</a></td>' for m in maps)
            note = f"<br><small>{html.escape(e['note'])}</small>" if e.get("note") else ""
            rows.append(f"<figure><figcaption><b>{html.escape(e['title'])}</b>{note}</figcaption>"
                        f"<table><tr>{cells}</tr></table></figure>")
    page = ("<!doctype html><meta charset='utf-8'><title>affectlens heatmaps</title>"
            "<h1>Activation-patching heatmaps</h1><p>Rows: sites by depth. Columns: time windows (seconds from "
            "the clip's start). Value: metric with the window patched, normalised so the corrupt run is 0 and the "
            "clean run is 1, mean over pairs; diverging colours centred on 0 (scale on each colour bar). Left "
            "panel of each map: denoising (clean activations into the corrupt run: is this cell sufficient?); "
            "right: noising (corrupt into clean: is it necessary?). Attribution patching is the first-order "
            "gradient estimate of the exact map on the same grid; its agreement (Spearman rank correlation and "
            "whether the top cells match) is given under each title. Maps titled <i>heads</i> patch one attention "
            "head at a time (its slice of the block's attn_heads site): block × head over the whole clip, and "
            "head × time window.</p>" + "\n".join(rows))
    write_text(path, page)
    return Path(path)
