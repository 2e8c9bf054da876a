"""A self-contained HTML dashboard of an SAE's features at one site.

One page: the SAE's metrics (and downstream fidelity, when measured), then one card per shown
feature with its densities, its association with every label (mean activation, mean
difference, effect size, AUROC), a histogram of its clip activations (inline SVG) and its top
clips as audio players cut around the frame of peak activation (`#t=start,end` media fragments on
the decoded audio, linked by relative path, so the page works wherever the results folder is
copied along with the audio).
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from affectlens.io import write_text

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em} h2{font-size:1.1em;margin:0 0 .3em}
table{border-collapse:collapse;margin:.3em 0} td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
.card{border:1px solid #ccc;border-radius:6px;padding:.8em;margin:1em 0;display:grid;
grid-template-columns:1fr 260px;gap:1em}
.clips audio{height:28px;width:260px;vertical-align:middle} .clips li{margin:2px 0}
.muted{color:#777} .strong{font-weight:600}
"""


def histogram_svg(values: np.ndarray, bins: int = 30, width: int = 250, height: int = 90) -> str:
    """Inline SVG bar histogram of the positive `values` (the zeros are stated in the caption)."""
    values = np.asarray(values, dtype=np.float64)
    active = values[values > 0]
    caption = f"{len(active)} of {len(values)} clips active"
    if len(active) == 0:
        return f'<div class="muted">{caption}</div>'
    counts, edges = np.histogram(active, bins=bins)
    bar_w = width / bins
    top = counts.max()
    bars = "".join(
        f'<rect x="{i * bar_w:.1f}" y="{height - 14 - c / top * (height - 18):.1f}" width="{bar_w - 1:.1f}" '
        f'height="{c / top * (height - 18):.1f}" fill="#4a7ab5">'
        f'<title>{edges[i]:.3g}-{edges[i + 1]:.3g}: {c}</title></rect>'
        for i, c in enumerate(counts))
    axis = (f'<text x="0" y="{height - 2}" font-size="10">{edges[0]:.3g}</text>'
            f'<text x="{width}" y="{height - 2}" font-size="10" text-anchor="end">{edges[-1]:.3g}</text>')
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="activation histogram">{bars}{axis}</svg>'
            f'<div class="muted">{caption}; clip activation</div>')


def choose_features(stats: pd.DataFrame, n: int) -> list[int]:
    """The `n` features with the strongest label association (largest |effect size| over labels),
    among features that fire at all."""
    s = stats[stats["density"] > 0] if "density" in stats else stats
    strength = s.assign(a=s["effect_size"].abs().replace(np.inf, 1e9)).groupby("feature")["a"].max()
    return strength.sort_values(ascending=False, kind="stable").index[:n].astype(int).tolist()


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{v:.3g}"
    return html.escape(str(v))


def _table(df: pd.DataFrame, columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r[c])}</td>" for c in columns) + "</tr>" for _, r in df.iterrows())
    return f"<table><tr>{head}</tr>{body}</table>"


def write_dashboard(out_html: str | Path, site: str, stats: pd.DataFrame, top: pd.DataFrame,
                    audio_paths: Mapping[str, str], clip_acts: np.ndarray | None = None,
                    clip_labels: Mapping[str, str] | None = None, metrics: Mapping | None = None,
                    fidelity: pd.DataFrame | None = None, n_features: int = 64, window_s: float = 1.0,
                    title: str | None = None) -> Path:
    """Write the dashboard of one site.

    stats      `features.feature_stats` table (feature x label)
    top        `features.peak_frames(top_activating(...))`: feature, rank, clip_id, activation, peak_s
    audio_paths clip_id -> audio file (decoded FLAC); linked relative to the page
    clip_acts  [clip, n_latents] clip activations for the histograms (optional)
    window_s   seconds of audio around the peak frame that each player plays
    """
    out_html = Path(out_html)
    base = out_html.parent.resolve()
    clip_labels = dict(clip_labels or {})
    shown = choose_features(stats, n_features)
    by_feature = {f: g for f, g in stats.groupby("feature")}
    tops = {f: g.sort_values("rank") for f, g in top.groupby("feature")}
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title or site)}</title>",
             f"<style>{CSS}</style><h1>{html.escape(title or f'SAE features at {site}')}</h1>"]
    if metrics:
        keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        parts.append("<h2>Metrics</h2>" + _table(pd.DataFrame([keep]), list(keep)))
    if fidelity is not None and len(fidelity):
        parts.append("<h2>Downstream fidelity (reconstruction spliced in vs zero-ablation)</h2>"
                     + _table(fidelity, list(fidelity.columns)))
    n_feat_total = int(stats["feature"].nunique())
    parts.append(f"<p class='muted'>{len(shown)} of {n_feat_total} features shown, strongest label "
                 f"association first; players play {window_s:g} s around the frame of peak activation.</p>")
    label_cols = [c for c in ("label", "n_clips", "mean_activation", "mean_activation_rest", "mean_difference",
                              "effect_size", "auroc", "auroc_low", "auroc_high", "p_value", "q_value")
                  if c in stats.columns]
    for f in shown:
        s = by_feature[f]
        dens = s.iloc[0]
        head = f"<h2>feature {f}</h2><div>clip density {_fmt(float(dens['density']))}"
        if "frame_density" in s:
            head += f", frame density {_fmt(float(dens['frame_density']))}"
        head += "</div>"
        table = _table(s.sort_values("effect_size", ascending=False), label_cols)
        clips = []
        for _, r in tops.get(f, pd.DataFrame()).iterrows():
            path = audio_paths.get(r["clip_id"])
            lab = clip_labels.get(r["clip_id"], "")
            start = max(0.0, float(r.get("peak_s", 0.0)) - window_s / 2)
            text = (f"<span class='strong'>{html.escape(str(r['clip_id']))}</span> {html.escape(str(lab))} "
                    f"act {_fmt(float(r['activation']))}, peak {float(r.get('peak_s', 0.0)):.2f} s")
            if path:
                rel = os.path.relpath(Path(path).resolve(), base).replace(os.sep, "/")
                src = html.escape(f"{rel}#t={start:.2f},{start + window_s:.2f}", quote=True)
                text = f"<audio controls preload='none' src=\"{src}\"></audio> " + text
            clips.append(f"<li>{text}</li>")
        hist = histogram_svg(clip_acts[:, f]) if clip_acts is not None else ""
        parts.append(f"<div class='card'><div>{head}{table}<ol class='clips'>{''.join(clips)}</ol></div>"
                     f"<div>{hist}</div></div>")
    write_text(out_html, "\n".join(parts) + "\n")
    return out_html
