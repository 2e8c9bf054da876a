"""Frame-level reads for time-resolved probes: pool each clip's frames into fixed time bins,
streaming a site's frame matrix once, in chunks."""

from __future__ import annotations

import warnings

import numpy as np

from affectlens.store import Store


def bin_frames(store: Store, site: str, bin_s: float, max_bins: int, rows: np.ndarray | None = None,
               chunk_rows: int = 65536) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean activation of every clip in time bins [k * bin_s, (k + 1) * bin_s), k < max_bins.

    Returns (means [clip, bin, d] float32, with zeros where a clip has no frame in a bin;
    counts [clip, bin] frames per bin; the bin length actually used in seconds, a whole number of
    frames). `rows` picks and orders the store's clips (default: all, store order). The frame
    matrix is read once, `chunk_rows` rows at a time."""
    frame_rate = float(store.attrs.get("frame_rate", 0) or 0)
    if frame_rate <= 0:
        raise ValueError(f"{store.path} has no frame_rate attribute; time bins need it")
    if bin_s <= 0 or max_bins < 1:
        raise ValueError(f"bin_s={bin_s}, max_bins={max_bins}: need bin_s > 0 and max_bins >= 1")
    per_bin = max(1, int(round(bin_s * frame_rate)))
    offsets = np.asarray(store.offsets, dtype=np.int64)
    n_clips, d = len(offsets) - 1, store.dim(site)
    sums = np.zeros((n_clips * max_bins, d), dtype=np.float64 if n_clips * max_bins * d < 2**26 else np.float32)
    counts = np.zeros(n_clips * max_bins, dtype=np.int64)
    start = 0
    for chunk in store.frame_chunks(site, chunk_rows=chunk_rows):
        g = np.arange(start, start + len(chunk))
        start += len(chunk)
        clip = np.searchsorted(offsets, g, side="right") - 1
        b = (g - offsets[clip]) // per_bin
        keep = b < max_bins
        if not keep.any():
            continue
        key = clip[keep] * max_bins + b[keep]
        x = chunk[keep]
        cuts = np.flatnonzero(np.diff(key)) + 1  # keys never decrease: frames are stored clip by clip
        first = np.concatenate([[0], cuts])
        sums[key[first]] += np.add.reduceat(x.astype(np.float64), first, axis=0)
        counts[key[first]] += np.diff(np.concatenate([first, [len(key)]]))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 0.0).astype(np.float32)
    means, counts = means.reshape(n_clips, max_bins, d), counts.reshape(n_clips, max_bins)
    if rows is not None:
        means, counts = means[rows], counts[rows]
    return means, counts, per_bin / frame_rate


def time_resolved(store: Store, manifest, sites, label_column: str = "label", group_column: str = "speaker",
                  bin_s: float = 0.5, max_bins: int = 20, n_splits: int = 4, seed: int = 0, settings=None,
                  split_column: str | None = None, effect_size: float = 0.5, frame_targets=None,
                  target_column: str = "value", min_clips: int = 8):
    """Time-resolved probes: the clips' frames pooled per time bin, then, bin by bin, the probe of
    the clip label (no permutations) and the representation statistics. Each bin's rows are the
    sweep's (`sweep.probe_task`): `value` from the pooled out-of-fold predictions of the bin (its
    accuracy and macro-F1, or its R² and CCC), `fold_mean` beside it, a speaker-bootstrap interval.

    With `frame_targets` (a table clip_id, time_s, `target_column`: e.g. PMEmo's 2 Hz valence),
    each bin is instead a ridge probe of the mean annotation within the bin. A bin is skipped
    when fewer than `min_clips` clips reach it or its clips lack two classes or two speakers.
    Returns (curves: the sweep's tidy metric rows plus time_s, representation rows plus time_s)."""
    import pandas as pd

    from affectlens.probes.representation import representation_stats
    from affectlens.probes.sweep import (FitSettings, align_manifest, classification_task, probe_task,
                                         regression_task, site_columns)

    settings = settings or FitSettings(seed=seed)
    needed = [label_column, group_column] + ([split_column] if split_column else [])
    rows = align_manifest(store.clip_ids, manifest, needed, where=str(store.path))
    labels = manifest[label_column].astype(str).to_numpy()
    groups = manifest[group_column].astype(str).to_numpy()
    split = None if split_column is None else manifest[split_column].astype(str).to_numpy()
    targets = None
    curve_rows, rep_rows = [], []
    for site in sites:
        means, counts, used_s = bin_frames(store, site, bin_s, max_bins, rows)
        if frame_targets is not None and targets is None:
            targets = _bin_targets(frame_targets, manifest["clip_id"].astype(str).to_numpy(), used_s, max_bins,
                                   target_column)
        cols = site_columns(site)
        for b in range(max_bins):
            keep = counts[:, b] > 0
            if targets is not None:
                keep &= np.isfinite(targets[:, b])
            if keep.sum() < min_clips or len(np.unique(groups[keep])) < 2:
                continue
            idx = np.flatnonzero(keep)
            sp = None if split is None else split[idx]
            if targets is None and len(np.unique(labels[idx])) < 2:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="n_splits=.*speakers")  # else said once per bin
                    if targets is None:
                        task = classification_task(label_column, labels[idx], groups[idx], rows=idx, split=sp,
                                                   n_splits=n_splits, seed=seed, control=False)
                    else:
                        task = regression_task(target_column, targets[idx, b], groups[idx], rows=idx, split=sp,
                                               n_splits=n_splits, seed=seed, control=False)
            except (ValueError, RuntimeError):  # e.g. a split without train clips in this bin
                continue
            X = means[:, b]
            metrics, _, _ = probe_task(X, task, settings, site)
            for r in metrics:
                curve_rows.append({**cols, "time_s": b * used_s, "n_clips_bin": int(keep.sum()), **r})
            if targets is None:
                rep = representation_stats(X[idx], labels[idx], groups[idx], effect_size=effect_size)
                rep_rows += [{"site": site, "depth": cols["depth"], "time_s": b * used_s, **r}
                             for r in rep.to_dict("records")]
    return pd.DataFrame(curve_rows), pd.DataFrame(rep_rows)


def _bin_targets(frame_targets, clip_ids: np.ndarray, bin_s: float, max_bins: int, column: str) -> np.ndarray:
    """[clip, bin] mean of the annotation values whose time falls in each bin (NaN: none)."""
    for col in ("clip_id", "time_s", column):
        if col not in frame_targets.columns:
            raise KeyError(f"frame targets lack column {col!r}; they have {list(frame_targets.columns)}")
    index = {c: i for i, c in enumerate(clip_ids)}
    ft = frame_targets[frame_targets["clip_id"].astype(str).isin(index)]
    b = np.floor(ft["time_s"].to_numpy(float) / bin_s).astype(int)
    ok = (b >= 0) & (b < max_bins)
    ci = ft["clip_id"].astype(str).map(index).to_numpy()[ok]
    sums = np.zeros((len(clip_ids), max_bins))
    n = np.zeros((len(clip_ids), max_bins))
    np.add.at(sums, (ci, b[ok]), ft[column].to_numpy(float)[ok])
    np.add.at(n, (ci, b[ok]), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, sums / n, np.nan)
