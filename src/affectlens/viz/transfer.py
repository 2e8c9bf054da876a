"""Figures of the transfer stage: probe scores across corpora against within-corpus scores per
site, and the concept axes' AUROC across corpora, one panel per pair and normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from affectlens.viz.curves import save_atomic

_ALPHA = 0.05
_SCOPES = {  # scope -> (legend label, line style); within-corpus lines take their dataset's colour
    "within_source": ("within {source} (speaker-grouped CV)", "--"),
    "within_target": ("within {target} (speaker-grouped CV)", "-."),
    "transfer": ("fit on {source}, tested on {target}", "-"),
}
_TRANSFER = "#d62728"
_DATASETS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_NORMS = {"none": "#444444", "corpus": "#1f77b4", "speaker": "#d62728"}


def _site_order(df: pd.DataFrame) -> list[str]:
    """Model sites by tower order of appearance, then depth; pseudo-sites (depth < 0) left out."""
    sites = df[df["depth"] >= 0].drop_duplicates("site")
    towers = list(dict.fromkeys(sites["tower"]))
    sites = sites.assign(_t=sites["tower"].map(towers.index)).sort_values(["_t", "depth"], kind="stable")
    return sites["site"].tolist()


def _tick(site: str) -> str:
    parts = site.split(".")
    return "embed" if parts[-1] == "embed" else (parts[2] if len(parts) > 2 else site)


def _placeholder(path: Path, text: str) -> Path:
    fig = Figure(figsize=(6, 1.5))
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=10)
    save_atomic(fig, path)
    return path


def plot_transfer(table: pd.DataFrame, path: str | Path, metric: str = "balanced_accuracy", title: str = "") -> Path:
    """One panel per ordered pair (rows) and normalisation (columns): `metric` per site of the
    probe fit on the source and tested on the target (bootstrap band over the target's speakers;
    filled markers: permutation p <= 0.05), the within-corpus scores of both, chance, and the
    acoustic baseline transferred the same way (horizontal line). Written atomically as a PNG."""
    path = Path(path)
    if table.empty:
        return _placeholder(path, "no transfer rows")
    df = table[(table["metric"] == metric) & (table["probe"] == "label")]
    pairs = list(dict.fromkeys(zip(df["source"], df["target"])))
    norms = list(dict.fromkeys(df["normalise"]))
    order = _site_order(df)
    names = list(dict.fromkeys([n for pair in pairs for n in pair]))
    colours = {n: _DATASETS[i % len(_DATASETS)] for i, n in enumerate(names)}  # one colour per dataset
    fig = Figure(figsize=(4.2 * len(norms) + 1, 3.2 * len(pairs) + 0.6))
    axes = np.atleast_2d(fig.subplots(len(pairs), len(norms), squeeze=False, sharey=True))
    for i, (source, target) in enumerate(pairs):
        for j, how in enumerate(norms):
            ax = axes[i, j]
            part = df[(df["source"] == source) & (df["target"] == target) & (df["normalise"] == how)]
            for scope, (label, style) in _SCOPES.items():
                colour = {"within_source": colours[source], "within_target": colours[target]}.get(scope, _TRANSFER)
                rows = part[part["scope"] == scope].set_index("site")
                sites = [s for s in order if s in rows.index]
                if not sites:
                    continue
                r = rows.loc[sites]
                x = np.array([order.index(s) for s in sites])
                if scope == "transfer":
                    ax.fill_between(x, r["ci_low"].to_numpy(float), r["ci_high"].to_numpy(float), color=colour,
                                    alpha=0.15, linewidth=0)
                ax.plot(x, r["value"].to_numpy(float), color=colour, linestyle=style,
                        label=label.format(source=source, target=target), linewidth=1.8)
                sig = r["p_value"].to_numpy(float) <= _ALPHA
                ax.plot(x[sig], r["value"].to_numpy(float)[sig], "o", color=colour, markersize=4)
                ax.plot(x[~sig], r["value"].to_numpy(float)[~sig], "o", color=colour, markersize=4,
                        markerfacecolor="white")
                if scope == "transfer":
                    ax.axhline(float(r["chance"].iloc[0]), color="#999", linestyle=":", linewidth=1,
                               label=f"chance on {target}")
                    acoustic = rows[rows["depth"] < 0]
                    for site, a in acoustic.iterrows():
                        ax.axhline(float(a["value"]), color="#ff7f0e", linestyle=(0, (4, 2)), linewidth=1.2,
                                   label=f"{site} transferred")
            ax.set_xticks(range(len(order)), [_tick(s) for s in order], fontsize=8)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{source} → {target}, normalise: {how}", fontsize=9)
            if j == 0:
                ax.set_ylabel(metric.replace("_", " "))
            if i == len(pairs) - 1:
                ax.set_xlabel("block")
            if j == 0:
                ax.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(f"{title}: {metric.replace('_', ' ')} across corpora", fontsize=11)
    fig.tight_layout()
    save_atomic(fig, path)
    return path


def plot_axes(axes_table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """One column per contrast, two rows per ordered pair: AUROC on the target of the source's
    difference-of-means axis per site (band: bootstrap over the target's speakers), and the cosine
    between the two corpora's axes; one colour per normalisation, solid for the per-speaker axis,
    dashed for the pooled one. Written atomically as a PNG."""
    path = Path(path)
    if axes_table.empty:
        return _placeholder(path, "no axes: the study's contrasts name no shared label pair")
    df = axes_table
    pairs = list(dict.fromkeys(zip(df["source"], df["target"])))
    contrasts = list(dict.fromkeys(df["contrast"]))
    order = _site_order(df)
    fig = Figure(figsize=(4.6 * len(contrasts) + 1, 2.6 * 2 * len(pairs) + 0.6))
    grid = np.atleast_2d(fig.subplots(2 * len(pairs), len(contrasts), squeeze=False, sharex=True))
    for i, (source, target) in enumerate(pairs):
        for j, contrast in enumerate(contrasts):
            top, bottom = grid[2 * i, j], grid[2 * i + 1, j]
            part = df[(df["source"] == source) & (df["target"] == target) & (df["contrast"] == contrast)]
            for (how, kind), rows in part.groupby(["normalise", "axis"], sort=False):
                rows = rows.set_index("site")
                sites = [s for s in order if s in rows.index]
                r = rows.loc[sites]
                x = np.array([order.index(s) for s in sites])
                style = "-" if kind == "per_speaker" else "--"
                colour = _NORMS.get(how, "#8c564b")
                if kind == "per_speaker":
                    top.fill_between(x, r["ci_low"].to_numpy(float), r["ci_high"].to_numpy(float), color=colour,
                                     alpha=0.1, linewidth=0)
                top.plot(x, r["auroc"].to_numpy(float), color=colour, linestyle=style, label=f"{how}, {kind}")
                bottom.plot(x, r["cosine"].to_numpy(float), color=colour, linestyle=style)
            top.axhline(0.5, color="#999", linestyle=":", linewidth=1)
            bottom.axhline(0.0, color="#999", linestyle=":", linewidth=1)
            top.set_ylim(0, 1.02)
            bottom.set_ylim(-1.02, 1.02)
            top.set_title(f"{contrast.replace('-to-', ' → ')}: {source} axis on {target}", fontsize=9)
            if j == 0:
                top.set_ylabel("AUROC on target")
                bottom.set_ylabel(f"cosine({source}, {target})")
            bottom.set_xticks(range(len(order)), [_tick(s) for s in order], fontsize=8)
            if i == 0 and j == 0:
                top.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(f"{title}: difference-of-means axes across corpora", fontsize=11)
    fig.tight_layout()
    save_atomic(fig, path)
    return path
