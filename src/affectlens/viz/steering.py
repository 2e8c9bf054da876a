"""Dose-response of steering: what moves with alpha, and what it costs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from affectlens.io import atomic_path  # noqa: E402


CONTROL_STYLE = {"gain": ("0.45", "v"), "mel_shift": ("0.2", "D"), "random": ("0.65", "x")}


def plot_dose_response(summary: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Panels over alpha, one colour per steering method and a grey line per control (dashed):
    one panel per judge's P(target) (the original audio as a dotted line), the level change and
    the pitch change against alpha = 0, and the word error rate."""
    summary = summary if "method" in summary else summary.assign(method="diff_of_means")
    summary = summary if "kind" in summary else summary.assign(kind="method")
    steered = summary[summary.output != "original"].sort_values("alpha")
    original = summary[summary.output == "original"].iloc[0]
    judges = [c for c in summary.columns if c.startswith("p_target_")]
    panels = [(j, f"P(target), {j.removeprefix('p_target_').replace('_', ' ')} judge") for j in judges]
    panels += [("rms_change_db", "level change vs alpha = 0 (dB)"), ("f0_change_st", "F0 change vs alpha = 0 (st)"),
               ("wer_vs_original", "WER vs the words said")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.6), constrained_layout=True)
    methods = [m for m in dict.fromkeys(steered.method) if (steered[steered.method == m].kind == "method").all()]
    for ax, (col, name) in zip(axes, panels):
        for i, m in enumerate(methods):
            g = steered[steered.method == m]
            ax.plot(g.alpha, g[col], "o-", color=f"C{i}", label=m)
        for m, g in steered[steered.kind == "control"].groupby("method", sort=False):
            colour, marker = CONTROL_STYLE.get(m, ("0.5", "."))
            ax.plot(g.alpha, g[col], marker=marker, ls="--", color=colour, label=f"control: {m}")
        if col.startswith("p_target_"):
            ax.axhline(original[col], color="grey", ls=":", lw=1)
            ax.set_ylim(-0.02, 1.02)
        elif col != "wer_vs_original":
            ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="alpha", title=name)
        ax.title.set_fontsize(9)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_music_dose_response(summary: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Three panels over alpha: the independent mood judge's valence and energy change (95%
    intervals over prompts), level and tempo change, and distance from the unsteered piece."""
    s = summary.sort_values("alpha")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), constrained_layout=True)
    for ax, cols, ylabel, ttl in (
            (axes[0], (("valence_change", "valence"), ("energy_change", "energy")), "change (judge, 0-1 scale)",
             "mood judge (vibenet) vs lowest alpha"),
            (axes[1], (("active_rms_db_change", "level (dB)"), ("tempo_bpm_change", "tempo (BPM)")), "change",
             "acoustics vs lowest alpha")):
        for i, (col, name) in enumerate(cols):
            ax.errorbar(s.alpha, s[col], yerr=s[f"{col}_ci95"], fmt="o-", color=f"C{i}", capsize=3, label=name)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="alpha", ylabel=ylabel, title=ttl)
        ax.legend(fontsize=8)
    axes[2].plot(s.alpha, s.log_mel_l1_to_base, "o-", color="C3")
    axes[2].set(xlabel="alpha", ylabel="log-mel L1 (nats)", title="distance from the unsteered piece")
    fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)
