"""Confusion matrices of probes: row-normalised (recall on the diagonal), counts printed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from affectlens.viz.curves import save_atomic


def confusion_matrix_of(conf_df: pd.DataFrame, site: str, probe: str | None = None, split: str | None = None):
    """(classes, counts [K, K] rows true, columns predicted) of one site from the tidy table."""
    rows = conf_df[conf_df["site"] == site]
    if probe is not None and "probe" in rows.columns:
        rows = rows[rows["probe"] == probe]
    if split is not None and "split" in rows.columns:
        rows = rows[rows["split"] == split]
    if rows.empty:
        raise KeyError(f"no confusion rows for site {site!r}, probe {probe!r}, split {split!r}")
    wide = rows.pivot_table(index="true", columns="predicted", values="count", aggfunc="sum", fill_value=0)
    classes = sorted(set(wide.index) | set(wide.columns), key=str)
    wide = wide.reindex(index=classes, columns=classes, fill_value=0)
    return classes, wide.to_numpy()


def plot_confusions(conf_df: pd.DataFrame, sites: list[str], path: str | Path, probe: str | None = None,
                    split: str | None = None, title: str = "") -> Path:
    """One row-normalised confusion matrix per site (e.g. the best site and the acoustic
    baseline), side by side, each cell with its share and count. Writes a PNG atomically."""
    if not sites:
        raise ValueError("plot_confusions: no site given")
    mats = [confusion_matrix_of(conf_df, s, probe, split) for s in sites]
    k = max(len(c) for c, _ in mats)
    size = max(3.2, 0.55 * k + 1.6)
    fig = Figure(figsize=(size * len(sites), size + 0.6), layout="constrained")
    axes = fig.subplots(1, len(sites), squeeze=False)[0]
    for ax, site, (classes, cm) in zip(axes, sites, mats):
        support = cm.sum(1, keepdims=True)
        share = np.divide(cm, support, out=np.zeros_like(cm, dtype=float), where=support > 0)
        im = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, f"{share[i, j]:.2f}\n{int(cm[i, j])}", ha="center", va="center", fontsize=6.5,
                        color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(classes)), [str(c) for c in classes], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), [str(c) for c in classes], fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        acc = np.trace(cm) / max(cm.sum(), 1)
        ax.set_title(f"{site}\naccuracy {acc:.3f} (n = {int(cm.sum())})", fontsize=9)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.7, label="share of the true class")
    if title:
        fig.suptitle(title, fontsize=10)
    save_atomic(fig, Path(path))
    return Path(path)
