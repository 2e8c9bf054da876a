"""The figure of the time-resolved regression probe (affectlens.probes.dynamic): R² and CCC per
site for valence and arousal, with the acoustic baseline, and the rated curve of a few songs
beside the best site's held-out prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from affectlens.probes.dynamic import ACOUSTIC_SITE, TARGETS
from affectlens.viz.curves import save_atomic

_METRICS = {"r2": ("R²", "#1f77b4", "-"), "ccc": ("CCC", "#d62728", "-.")}


def best_site(table: pd.DataFrame, target: str) -> str | None:
    """The model site with the highest R² for `target` (None: no model site)."""
    rows = table[(table["target"] == target) & (table["metric"] == "r2") & (table["depth"] >= 0)]
    return None if rows.empty else str(rows.loc[rows["value"].idxmax(), "site"])


def plot_dynamic(table: pd.DataFrame, predictions: pd.DataFrame, path: str | Path, n_songs: int = 3,
                 title: str = "") -> Path:
    """Top row: per target, R² and CCC against site depth (fold intervals as bands; filled markers
    p <= 0.05) with the acoustic baseline as horizontal lines. Below: `n_songs` songs (those with
    the longest rated clips), rated curve vs the best site's and the baseline's out-of-fold prediction."""
    # the longest rated clip of each of the songs with the longest clips (a segmented song: one segment)
    sizes = predictions.drop_duplicates(["clip_id", "time_s"]).groupby(["song", "clip_id"]).size()
    sizes = sizes.sort_values(ascending=False, kind="stable")
    clips = sizes[~sizes.index.get_level_values("song").duplicated()].index[:n_songs].tolist()
    fig = Figure(figsize=(5.2 * len(TARGETS), 3.2 * (1 + len(clips))))
    axes = fig.subplots(1 + len(clips), len(TARGETS), squeeze=False)
    model = table[table["depth"] >= 0].sort_values("depth", kind="stable")
    base = table[table["site"] == ACOUSTIC_SITE]
    for j, target in enumerate(TARGETS):
        ax = axes[0, j]
        for metric, (label, colour, style) in _METRICS.items():
            m = model[(model["target"] == target) & (model["metric"] == metric)]
            x = np.arange(len(m))
            ax.fill_between(x, m["ci_low"].to_numpy(float), m["ci_high"].to_numpy(float), color=colour, alpha=0.12,
                            linewidth=0)
            ax.plot(x, m["value"].to_numpy(float), color=colour, linestyle=style, label=label, linewidth=1.8)
            sig = m["p_value"].to_numpy(float) <= 0.05
            v = m["value"].to_numpy(float)
            ax.plot(x[sig], v[sig], "o", color=colour, markersize=4.5)
            ax.plot(x[~sig], v[~sig], "o", markerfacecolor="white", color=colour, markersize=4.5)
            b = base[(base["target"] == target) & (base["metric"] == metric)]
            if not b.empty:
                ax.axhline(float(b["value"].iloc[0]), color=colour, linestyle=":", linewidth=1.2,
                           label=f"{label}, acoustic baseline")
            ax.set_xticks(x, [s.split(".", 1)[1] for s in m["site"]], rotation=45, ha="right", fontsize=7)
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_title(f"{target}: held-out songs", fontsize=10)
        ax.set_ylabel("score")
        ax.legend(fontsize=7)
        best = best_site(table, target)
        for i, (song, clip) in enumerate(clips, start=1):
            ax = axes[i, j]
            rows = predictions[predictions["clip_id"] == clip]
            shown = rows[rows["site"] == (best or ACOUSTIC_SITE)].sort_values("time_s")
            t = shown["time_s"].to_numpy(float)
            ax.plot(t, shown[target].to_numpy(float), color="black", linewidth=1.8, label="rated")
            if best is not None:
                ax.plot(t, shown[f"predicted_{target}"].to_numpy(float), color="#1f77b4", label=f"{best} (held out)")
            acoustic = rows[rows["site"] == ACOUSTIC_SITE].sort_values("time_s")
            if not acoustic.empty:
                ax.plot(acoustic["time_s"].to_numpy(float), acoustic[f"predicted_{target}"].to_numpy(float),
                        color="grey", linestyle="--", label="acoustic baseline (held out)")
            ax.set_title(f"song {song} ({clip}): {target}", fontsize=9)
            ax.set_xlabel("time in clip (s)")
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_atomic(fig, Path(path))
    return Path(path)
