"""Dose-response of steering: what moves with alpha, and what it costs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from affectlens.io import atomic_path  # noqa: E402


def plot_dose_response(summary: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Three panels over alpha, one colour per steering method: judged probability of the target
    label (solid: the acoustic judge, dashed: the model probe; dotted: the original clips), pitch
    (solid) and level (dashed) change, word error rate."""
    summary = summary if "method" in summary else summary.assign(method="diff_of_means")
    steered = summary[summary.output != "original"].sort_values("alpha")
    original = summary[summary.output == "original"].iloc[0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    for i, (method, g) in enumerate(steered.groupby("method", sort=False)):
        c = f"C{i}"
        axes[0].plot(g.alpha, g.p_target_acoustic, "o-", color=c, label=f"{method}: acoustic judge")
        axes[0].plot(g.alpha, g.p_target_model_probe, "s--", color=c, label=f"{method}: model probe")
        axes[1].plot(g.alpha, g.f0_change_st, "o-", color=c, label=f"{method}: F0 (st)")
        axes[1].plot(g.alpha, g.rms_change_db, "s--", color=c, label=f"{method}: level (dB)")
        axes[2].plot(g.alpha, g.wer_vs_original, "o-", color=c, label=method)
    for col, ls in (("p_target_acoustic", ":"), ("p_target_model_probe", "-.")):
        axes[0].axhline(original[col], color="grey", ls=ls, lw=1)
    axes[0].set(xlabel="alpha", ylabel="P(target)", ylim=(-0.02, 1.02), title="target shift (grey: original audio)")
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set(xlabel="alpha", title="prosody vs alpha = 0")
    axes[2].set(xlabel="alpha", ylabel="WER", title="content kept (WER vs original transcript)")
    for ax in axes:
        ax.legend(fontsize=7)
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
