"""2-D projections of one site's pooled activations, coloured by label.

Left: principal components of the speaker-centred activations (what varies most once each
voice's own offset is removed; unsupervised). Right: linear discriminant axes fit to the same
clips (supervised and in-sample, so the separation is a ceiling, not a held-out score).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from affectlens.probes.representation import speaker_centre
from affectlens.viz.curves import save_atomic

_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf"]


def project_2d(X: np.ndarray, labels, groups=None, max_dims: int = 256) -> dict[str, np.ndarray]:
    """{"pca": [clip, 2], "lda": [clip, 2]}: PCA of speaker-centred activations, and LDA on the
    first `max_dims` principal components of the same (shrinkage keeps it stable when d > clips).
    With two classes the LDA's second axis is the first principal component of what the
    discriminant leaves."""
    X = np.asarray(X, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    Xc = speaker_centre(X, groups) if groups is not None else X - X.mean(0)
    Xc = Xc / max(Xc.std(), 1e-12)
    n_pc = int(min(max_dims, Xc.shape[1], Xc.shape[0] - 1))
    pcs = PCA(n_components=n_pc, random_state=0).fit_transform(Xc)
    out = {"pca": pcs[:, :2]}
    k = len(np.unique(labels))
    lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(pcs, labels)
    z = lda.transform(pcs)
    if z.shape[1] < 2:
        w = lda.scalings_[:, :1]
        w = w / np.linalg.norm(w)
        rest = pcs - (pcs @ w) @ w.T
        second = PCA(n_components=1, random_state=0).fit_transform(rest)
        z = np.hstack([z[:, :1], second])
    out["lda"] = z[:, :2] if k > 1 else pcs[:, :2]
    return out


def plot_projection(X: np.ndarray, labels, path: str | Path, groups=None, title: str = "") -> Path:
    """Scatter of `project_2d`, one colour per label. Writes a PNG atomically."""
    labels = np.asarray(labels).astype(str)
    proj = project_2d(X, labels, groups)
    classes = sorted(set(labels.tolist()))
    fig = Figure(figsize=(11, 5), layout="constrained")
    axes = fig.subplots(1, 2)
    names = {"pca": "PCA of speaker-centred activations" if groups is not None else "PCA of centred activations",
             "lda": "LDA (in-sample: a ceiling, not a held-out score)"}
    for ax, key in zip(axes, ("pca", "lda")):
        z = proj[key]
        for i, c in enumerate(classes):
            mine = labels == c
            ax.scatter(z[mine, 0], z[mine, 1], s=9, alpha=0.65, color=_COLOURS[i % len(_COLOURS)], label=c,
                       linewidths=0)
        ax.set_title(names[key], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False, markerscale=2)
    fig.suptitle(title, fontsize=10)
    save_atomic(fig, Path(path))
    return Path(path)
