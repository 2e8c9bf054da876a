"""Layer curves: probe scores against depth, with fold intervals, chance, the control task and the
acoustic baseline; and time-resolved curves (score against time within the clip)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from affectlens.io import atomic_path
from affectlens.models.sites import parse_site

_SERIES = {  # metric -> (legend label, colour, line style); styles differ so equal curves stay visible
    "accuracy": ("accuracy", "#1f77b4", "-"),
    "balanced_accuracy": ("balanced accuracy", "#2ca02c", "--"),
    "macro_f1": ("macro-F1", "#d62728", "-."),
    "weighted_f1": ("weighted-F1", "#9467bd", ":"),
    "loso_auroc": ("axis AUROC (held-out speakers)", "#8c564b", (0, (5, 1))),
    "r2": ("R²", "#1f77b4", "-"),
    "ccc": ("concordance (CCC)", "#d62728", "-."),
    "pearson": ("Pearson r", "#2ca02c", "--"),
}
_PRIMARY = {"classification": "accuracy", "regression": "r2"}
_ALPHA = 0.05


def _with_defaults(df: pd.DataFrame) -> pd.DataFrame:
    """Tables of the first sweep version had one probe and no split/kind columns."""
    defaults = {"probe": "label", "split": "cv", "kind": "classification"}
    return df.assign(**{k: v for k, v in defaults.items() if k not in df.columns})


def _is_model_site(site: str) -> bool:
    try:
        parse_site(site)
        return True
    except ValueError:
        return False


def _panels(df: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """(probe, split, tower, point) -> rows of model sites; a tower's embed rows (depth 0) open
    each of its point panels. Axis rows join the panel of their pair."""
    df = df[df["site"].map(_is_model_site)]
    parsed = df["site"].map(parse_site)
    df = df.assign(_tower=parsed.map(lambda s: s.tower), _point=parsed.map(lambda s: s.point))
    panels = {}
    scored = df[df["kind"] != "axis"]
    for (probe, split), rows in scored.groupby(["probe", "split"], sort=False):
        axis = df[(df["kind"] == "axis") & (df["probe"] == probe)]
        rows = pd.concat([rows, axis])
        for tower, trows in rows.groupby("_tower", sort=False):
            points = [p for p in trows["_point"].unique() if p != "embed"] or ["embed"]
            for point in points:
                panels[(probe, split, tower, point)] = trows[trows["_point"].isin([point, "embed"])].sort_values("depth")
    return panels


def save_atomic(fig: Figure, path: Path) -> None:
    """Write `fig` as a PNG to `path` under a temporary name renamed when complete (every viz module's
    figures, and the stages' placeholders)."""
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch, no figure registry
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")


def _draw_series(ax, m: pd.DataFrame, label: str, colour: str, style, band: bool = True) -> None:
    x, v = m["depth"].to_numpy(), m["value"].to_numpy(float)
    if band and {"ci_low", "ci_high"} <= set(m.columns):
        ax.fill_between(x, m["ci_low"].to_numpy(float), m["ci_high"].to_numpy(float), color=colour, alpha=0.12,
                        linewidth=0)
    ax.plot(x, v, color=colour, linestyle=style, label=label, linewidth=1.8)
    p = m["p_value"].to_numpy(float) if "p_value" in m.columns else np.full(len(m), np.nan)
    tested = np.isfinite(p)
    sig = ~tested | (p <= _ALPHA)  # untested points are drawn plain, not as "not significant"
    ax.plot(x[sig], v[sig], "o", color=colour, markersize=4.5)
    ax.plot(x[~sig], v[~sig], "o", markerfacecolor="white", color=colour, markersize=4.5)


def plot_layer_curve(sweep_df: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """One panel per probe x split (and per tower and point when several are swept): the scores
    against depth (mean over folds; the primary score's interval as a band; a filled marker is a
    permutation p <= 0.05), chance, the random-label control, and the acoustic baseline
    (`acoustic.*` rows) as a horizontal band. Classification panels show accuracy, balanced
    accuracy, macro- and weighted-F1 (and, for concept pairs, the axis AUROC on held-out
    speakers); regression panels R², CCC and Pearson r. Takes the metrics table of the sweep;
    writes a PNG atomically and returns its path."""
    missing = {"site", "depth", "metric", "value"} - set(sweep_df.columns)
    if missing:
        raise KeyError(f"plot_layer_curve: the sweep table lacks columns {sorted(missing)}")
    if sweep_df.empty:
        raise ValueError("plot_layer_curve: the sweep table is empty")
    path = Path(path)
    df = _with_defaults(sweep_df)
    panels = _panels(df)
    if not panels:
        raise ValueError("plot_layer_curve: the sweep table holds no model site")
    baseline = df[~df["site"].map(_is_model_site)]
    width = max(6.0, max(0.42 * rows["site"].nunique() + 2.0 for rows in panels.values()))
    fig = Figure(figsize=(min(width, 24.0), 1.0 + 3.4 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, ((probe, split, tower, point), rows) in zip(axes, panels.items()):
        kind = rows.loc[rows["kind"] != "axis", "kind"].iloc[0]
        sites = rows.drop_duplicates("site").sort_values("depth")
        depths, names = sites["depth"].to_numpy(), sites["site"].to_numpy()
        for metric, (label, colour, style) in _SERIES.items():
            m = rows[(rows["metric"] == metric) & ((rows["kind"] == "axis") == (metric == "loso_auroc"))]
            if not m.empty:  # intervals of the primary score and the axis AUROC only, to stay legible
                _draw_series(ax, m.sort_values("depth"), label, colour, style,
                             band=metric in (_PRIMARY.get(kind, "accuracy"), "loso_auroc"))
        primary = _PRIMARY.get(kind, "accuracy")
        control = rows[rows["metric"] == f"control_{primary}"].sort_values("depth")
        if not control.empty:
            ax.plot(control["depth"], control["value"], color="0.45", linestyle="--", marker="x",
                    markersize=4, linewidth=1.2, label="control (shuffled labels)")
        main = rows[rows["metric"] == primary].sort_values("depth")
        if "chance" in main.columns and not main.empty and kind == "classification":
            ax.plot(main["depth"], main["chance"], color="black", linestyle=":", linewidth=1.2,
                    label="chance (majority class)")
            if "chance_uniform" in rows.columns and rows["chance_uniform"].notna().any():
                ax.axhline(float(rows["chance_uniform"].dropna().iloc[0]), color="0.6", linestyle="-.", linewidth=1.0,
                           label="chance (1/K)")
        elif kind == "regression":
            ax.axhline(0.0, color="black", linestyle=":", linewidth=1.2, label="chance (0)")
        base = baseline[(baseline["probe"] == probe) & (baseline["split"] == split) & (baseline["metric"] == primary)]
        for _, b in base.iterrows():
            ax.axhline(b["value"], color="#ff7f0e", linewidth=1.6, label=f"acoustic baseline ({b['site'].split('.', 1)[1]})")
            if np.isfinite(b.get("ci_low", np.nan)) and np.isfinite(b.get("ci_high", np.nan)):
                ax.axhspan(b["ci_low"], b["ci_high"], color="#ff7f0e", alpha=0.10, linewidth=0)
        step = max(1, math.ceil(len(depths) / 24))  # keep long towers legible
        ax.set_xticks(depths[::step])
        ax.set_xticklabels([n.split(".", 1)[1] if "." in n else n for n in names[::step]],
                           rotation=55, ha="right", fontsize=8)
        ax.set_xlabel(f"{tower} site" if point == "embed" else f"{tower} site ({point})")
        if kind == "regression":
            lo = np.nanmin(rows[rows["metric"].isin(["r2", "ccc", "pearson"])]["value"].to_numpy(float), initial=0.0)
            ax.set_ylim(max(-1.0, min(-0.05, lo - 0.05)), 1.02)
        else:
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        where = "speaker-grouped folds" if split == "cv" else f"official split: fit on train, scored on {split}"
        ax.set_title(f"{probe} ({kind}) · {where}" + ("" if len({k[2:] for k in panels}) == 1 else f" · {tower} {point}"),
                     fontsize=10)
        ax.set_ylabel("score")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    info = ""
    if "n_permutations" in df.columns and df["n_permutations"].max() > 0:
        n_perm = int(df["n_permutations"].max())
        info = f"filled marker: permutation p ≤ {_ALPHA} ({n_perm} within-speaker permutations)"
        if 1 / (n_perm + 1) > _ALPHA:
            info += f"; too few permutations to ever reach p ≤ {_ALPHA}"
    fig.suptitle("\n".join(t for t in (title, info) if t), fontsize=10)
    save_atomic(fig, path)
    return path


def plot_time_curve(time_df: pd.DataFrame, path: str | Path, title: str = "", metric: str | None = None) -> Path:
    """Scores of time-resolved probes against time within the clip (bin start, seconds), one line
    per site with its fold interval, one panel per probe; the chance level dotted. Takes the
    time-resolved table (columns site, probe, time_s, metric, value, ci_low, ci_high, chance)."""
    missing = {"site", "probe", "time_s", "metric", "value"} - set(time_df.columns)
    if missing:
        raise KeyError(f"plot_time_curve: the table lacks columns {sorted(missing)}")
    if time_df.empty:
        raise ValueError("plot_time_curve: the table is empty")
    probes = list(dict.fromkeys(time_df["probe"]))
    fig = Figure(figsize=(8.0, 1.0 + 3.2 * len(probes)), layout="constrained")
    axes = fig.subplots(len(probes), 1, squeeze=False)[:, 0]
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
    for ax, probe in zip(axes, probes):
        rows = time_df[time_df["probe"] == probe]
        m = metric or ("accuracy" if (rows["metric"] == "accuracy").any() else "r2")
        rows = rows[rows["metric"] == m]
        for i, (site, g) in enumerate(rows.groupby("site", sort=False)):
            g = g.sort_values("time_s")
            c = colours[i % len(colours)]
            if {"ci_low", "ci_high"} <= set(g.columns):
                ax.fill_between(g["time_s"], g["ci_low"].to_numpy(float), g["ci_high"].to_numpy(float), color=c,
                                alpha=0.12, linewidth=0)
            ax.plot(g["time_s"], g["value"], color=c, marker="o", markersize=3.5, label=site)
        if "chance" in rows.columns and not rows.empty:
            g = rows.drop_duplicates("time_s").sort_values("time_s")
            ax.plot(g["time_s"], g["chance"], color="black", linestyle=":", label="chance")
        ax.set_xlabel("time in clip (s, bin start)")
        ax.set_ylabel(m)
        ax.set_title(probe, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    save_atomic(fig, Path(path))
    return Path(path)
