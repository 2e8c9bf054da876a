"""The figure of a concept found among SAE features: the best features' AUROC with its interval,
and every tested feature's effect size against its corrected significance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from affectlens.sae.concept import CORRECTION
from affectlens.viz.curves import save_atomic

_SIGNIFICANT, _NOT = "#c0392b", "#7f8c8d"


def concept_figure(features: pd.DataFrame, summary: dict, path: str | Path, top_k: int = 10,
                   title: str = "") -> Path:
    """Two panels from `sae.concept.feature_statistics`' table and summary. Left: the `top_k`
    best-ranked features' AUROC (dot) with the 95 % group-bootstrap interval (bar), red where the
    q-value is at most alpha. Right: every tested feature's Cohen's d against -log10 q, with the
    alpha line (dashed) and the smallest q a lone feature can reach with these permutations (dotted).
    Written atomically as a PNG."""
    path = Path(path)
    alpha = float(summary.get("alpha", 0.05))
    top = features.head(top_k).iloc[::-1]  # best at the top of the panel
    fig = Figure(figsize=(11, max(3.0, 0.35 * len(top) + 1.5)))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    y = np.arange(len(top))
    colours = [_SIGNIFICANT if s else _NOT for s in top["significant"]]
    err = np.vstack([top["auroc"] - top["auroc_low"], top["auroc_high"] - top["auroc"]]).clip(min=0)
    left.errorbar(top["auroc"], y, xerr=np.nan_to_num(err), fmt="none", ecolor="#555", capsize=3, lw=1)
    left.scatter(top["auroc"], y, c=colours, zorder=3)
    left.axvline(0.5, color="#999", ls="--", lw=1)
    left.set_yticks(y, [f"#{int(f)}  d={d:.2f}" for f, d in zip(top["feature"], top["effect_size"])])
    left.set_xlim(min(0.4, float(np.nanmin(top["auroc_low"].to_numpy(float), initial=0.5)) - 0.02), 1.01)
    left.set_xlabel("AUROC of the clip-mean activation (95% bootstrap over groups)")
    left.set_title(f"best {len(top)} features (red: q ≤ {alpha:g})", fontsize=10)

    tested = features[features["tested"] & features["q_value"].notna()]
    q = tested["q_value"].to_numpy(float)
    right.scatter(tested["effect_size"], -np.log10(q), s=8,
                  c=[_SIGNIFICANT if s else _NOT for s in tested["significant"]])
    right.axhline(-np.log10(alpha), color="#999", ls="--", lw=1)
    floor = summary.get("lone_feature_q_floor")
    if floor and np.isfinite(floor):
        right.axhline(-np.log10(floor), color="#ccc", ls=":", lw=1)
    right.set_xlabel("Cohen's d (with − without)")
    right.set_ylabel(f"−log10 q ({CORRECTION}, across features)")
    right.set_title(f"{summary.get('n_tested', len(tested))} tested features, {summary.get('n_permutations')} "
                    f"permutations (p ≥ {summary.get('p_resolution', float('nan')):.2g})", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_atomic(fig, path)
    return path
