"""Time-resolved regression probes of dynamic (2 Hz) valence/arousal ratings, as PMEmo and DEAM publish.

Samples. Every rating of a clip (time t, seconds from the clip's start; `affectlens.data.music`)
becomes one sample: the mean of the clip's frames in the window [t - lag_s, t - lag_s + bin_s)
at a site, and the rating as target. With bin_s = 0.5 (the rating step) the windows tile the
rated span; `lag_s` > 0 pairs each rating with earlier audio (raters move the slider late).
Windows that hold no frame of the clip are left out.

Held out how. Folds are grouped (`groups`: the manifest's speaker, which is the artist in
PMEmo and the song in DEAM), so every bin of a song, and every song of an artist, is on one side.
Each fold fits one ridge probe per target (penalty chosen by grouped inner folds, as
`regression.ridge_cv`) on all training bins and predicts the test bins. R², Lin's CCC and Pearson r
are those of the pooled out-of-fold predictions of all bins (`value`; the mean of the per-fold
values stands beside it as `fold_mean`), with a percentile bootstrap interval that resamples whole
groups (artists or songs), the fitted probes held fixed.

Significance. Neighbouring bins of a song are strongly dependent (ratings drift slowly, and so do
the frames), so shuffling bins one by one would break the dependence the observed fit enjoys and
give a null too narrow (p too small). Instead whole curves are shuffled between songs: each song
gets another song's rating curve, in its own time order, laid on its bins (mirrored back and forth
when the donor's curve is shorter), so the null keeps each curve's autocorrelation and scale and
asks only whether a song's frames predict *its own* curve. Every permuted target is refit through
the same folds and penalty search and scored on its pooled out-of-fold predictions, as the observed
one; p = (1 + #{null >= observed}) / (1 + n), never below 1 / (1 + n).

Baseline. `acoustic_bins` computes plain audio statistics (loudness, spectral shape, flux, MFCC
means) in exactly the same windows; probed as the pseudo-site ACOUSTIC_SITE through the same
folds and permutations, it separates "the audio has it" from "the model encodes it".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from affectlens.probes.linear import standardise
from affectlens.probes.regression import (
    DEFAULT_ALPHAS,
    REGRESSION_METRICS,
    group_moments,
    metrics_from_moments,
    regression_metrics,
    ridge_cv,
)
from affectlens.probes.stats import group_bootstrap_sums, percentile_interval, permutation_p_value

log = logging.getLogger(__name__)

ACOUSTIC_SITE = "acoustic.frame_stats"
TARGETS = ("valence", "arousal")
ACOUSTIC_BIN_FEATURES = (("rms_db_mean", "rms_db_std", "centroid_hz", "bandwidth_hz", "rolloff_hz", "flatness",
                          "zero_crossing_rate", "flux_mean", "flux_std")
                         + tuple(f"mfcc{i}_mean" for i in range(13)))


@dataclass(frozen=True)
class RatingBins:
    """The samples of a time-resolved probe: one row per rated window that holds frames."""

    table: pd.DataFrame  # clip_id, song, group, time_s, valence, arousal, row (store row), first, stop (frames)
    bin_s: float
    lag_s: float

    def __len__(self) -> int:
        return len(self.table)

    def window(self, time_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start and end (s from the clip start) of each rating's window."""
        a = np.asarray(time_s, dtype=np.float64) - self.lag_s
        return a, a + self.bin_s


def _index_span(a: np.ndarray, b: np.ndarray, rate: float, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[first, stop) of the frames (or samples) at `rate` whose start time lies in [a, b), within [0, n)."""
    first = np.clip(np.ceil(a * rate - 1e-6), 0, n).astype(np.int64)
    stop = np.clip(np.ceil(b * rate - 1e-6), 0, n).astype(np.int64)
    return first, np.maximum(stop, first)


def rating_bins(ratings: pd.DataFrame, clip_ids: Sequence[str], n_frames: np.ndarray, frame_rate: float,
                groups: pd.Series, bin_s: float = 0.5, lag_s: float = 0.0, where: str = "the store") -> RatingBins:
    """Pair every rating with its frame window. `clip_ids`/`n_frames`: the store's clips and frame
    counts; `groups`: the CV group of each clip (Series indexed by clip id). Ratings of clips the
    store or `groups` lacks are left out (logged); windows without frames are left out."""
    for col in ("clip_id", "song", "time_s", *TARGETS):
        if col not in ratings.columns:
            raise KeyError(f"dynamic ratings lack column {col!r}; they have {list(ratings.columns)} "
                           "(made by the dynamic_ratings rule)")
    if bin_s <= 0:
        raise ValueError(f"probe_dynamic.bin_s = {bin_s}: a window needs a positive length")
    if frame_rate <= 0:
        raise ValueError(f"{where} has no frame_rate attribute; time-resolved probes need it")
    index = {str(c): i for i, c in enumerate(clip_ids)}
    r = ratings.assign(clip_id=ratings["clip_id"].astype(str))
    known = r["clip_id"].isin(index) & r["clip_id"].isin(groups.index.astype(str))
    if not known.all():
        lost = r.loc[~known, "clip_id"].unique().tolist()
        log.warning("dynamic ratings of %d clips not in %s or the manifest (e.g. %s) are left out", len(lost), where,
                    lost[:5])
    r = r[known & np.isfinite(r["valence"].to_numpy(float)) & np.isfinite(r["arousal"].to_numpy(float))]
    if r.empty:
        raise ValueError(f"no dynamic rating belongs to a clip of {where}; do the ratings and the store come "
                         "from the same dataset's manifest?")
    row = r["clip_id"].map(index).to_numpy(np.int64)
    a = r["time_s"].to_numpy(float) - lag_s
    first, stop = _index_span(a, a + bin_s, frame_rate, np.asarray(n_frames)[row])
    table = pd.DataFrame({"clip_id": r["clip_id"].to_numpy(), "song": r["song"].astype(str).to_numpy(),
                          "group": r["clip_id"].map(groups.astype(str).to_dict()).to_numpy(),
                          "time_s": r["time_s"].to_numpy(float), "valence": r["valence"].to_numpy(float),
                          "arousal": r["arousal"].to_numpy(float), "row": row, "first": first, "stop": stop})
    empty = table["stop"] <= table["first"]
    if empty.any():
        log.info("%d of %d rated windows hold no frame (before the clip start or past its end) and are left out",
                 int(empty.sum()), len(table))
    table = table[~empty].sort_values(["row", "time_s"]).reset_index(drop=True)
    if table.empty:
        raise ValueError(f"no rated window holds a frame of {where}; check lag_s/bin_s against the clips' lengths")
    split = table.groupby("song")["group"].nunique()
    if (split > 1).any():
        raise ValueError(f"songs {split[split > 1].index.tolist()[:5]} have clips in several CV groups; the "
                         "group column must keep each song's clips together")
    return RatingBins(table, float(bin_s), float(lag_s))


def pool_bins(frame_chunks, offsets: np.ndarray, bins: RatingBins) -> np.ndarray:
    """[bin, d] mean frame of every window, streaming the site's frame matrix once (`frame_chunks`:
    an iterator of [rows, d] chunks in store order; `offsets`: the clips' first rows, [clip + 1])."""
    from scipy import sparse

    t = bins.table
    start = np.asarray(offsets, dtype=np.int64)[t["row"].to_numpy()]
    first, stop = start + t["first"].to_numpy(), start + t["stop"].to_numpy()
    counts = stop - first
    # one sparse row of weights 1 / count per window, over the global frame rows it averages
    cols = np.concatenate([np.arange(a, b) for a, b in zip(first, stop)])
    rows = np.repeat(np.arange(len(t)), counts)
    weights = np.repeat(1.0 / counts, counts)
    total = int(offsets[-1])
    W = sparse.csr_matrix((weights, (rows, cols)), shape=(len(t), total)).tocsc()
    out, lo = None, 0
    for chunk in frame_chunks:
        hi = lo + len(chunk)
        part = W[:, lo:hi] @ np.asarray(chunk, dtype=np.float64)
        out = part if out is None else out + part
        lo = hi
    if lo != total:
        raise ValueError(f"the frame chunks hold {lo} rows but the offsets say {total}; the store is inconsistent")
    return np.asarray(out, dtype=np.float64)


def acoustic_bins(waves: Sequence[np.ndarray], sr: int, bins: RatingBins) -> np.ndarray:
    """[bin, feature] (ACOUSTIC_BIN_FEATURES) of the audio in each window: `waves[row]` is the
    decoded clip of store row `row`. Per 25 ms frame (10 ms hop): RMS level (dB), spectral centroid,
    bandwidth, roll-off (85 %), flatness, zero-crossing rate, spectral flux and 13 MFCCs, then
    averaged over the window (level and flux also their spread)."""
    import librosa

    hop, n_fft = round(0.010 * sr), int(2 ** np.ceil(np.log2(0.025 * sr)))
    t = bins.table
    out = np.zeros((len(t), len(ACOUSTIC_BIN_FEATURES)))
    a_all, b_all = bins.window(t["time_s"].to_numpy())
    for row, idx in t.groupby("row").indices.items():
        w = np.asarray(waves[row], dtype=np.float32)
        if w.ndim != 1 or len(w) < n_fft:
            w = np.pad(w.reshape(-1), (0, max(0, n_fft - w.size)))
        mag = np.abs(librosa.stft(w, n_fft=n_fft, hop_length=hop, center=True))
        S = mag ** 2
        mel = librosa.feature.melspectrogram(S=S, sr=sr, n_mels=40)
        per_frame = np.stack([
            10 * np.log10(np.maximum(librosa.feature.rms(S=mag, frame_length=n_fft)[0], 1e-10) ** 2),
            librosa.feature.spectral_centroid(S=mag, sr=sr)[0],
            librosa.feature.spectral_bandwidth(S=mag, sr=sr)[0],
            librosa.feature.spectral_rolloff(S=mag, sr=sr, roll_percent=0.85)[0],
            librosa.feature.spectral_flatness(S=mag)[0],
            librosa.feature.zero_crossing_rate(w, frame_length=n_fft, hop_length=hop)[0][: S.shape[1]],
            np.concatenate([[0.0], np.sqrt((np.diff(mag, axis=1).clip(0) ** 2).sum(0))]),
        ])
        mfcc = librosa.feature.mfcc(S=librosa.power_to_db(mel), n_mfcc=13)
        n = S.shape[1]
        first, stop = _index_span(a_all[idx], b_all[idx], sr / hop, np.full(len(idx), n))
        for i, f0, f1 in zip(idx, first, stop):
            if f1 <= f0:  # a window shorter than a hop, or at the very end: its nearest frame
                f0 = min(f0, n - 1)
                f1 = f0 + 1
            x, m = per_frame[:, f0:f1], mfcc[:, f0:f1]
            out[i] = np.concatenate([[x[0].mean(), x[0].std()], x[1:6].mean(1), [x[6].mean(), x[6].std()],
                                     m.mean(1)])
    if not np.isfinite(out).all():
        bad = t["clip_id"].to_numpy()[~np.isfinite(out).all(1)]
        raise ValueError(f"acoustic window features are not finite for clips {sorted(set(bad))[:5]}; check their audio")
    return out


def curve_permutations(bins: RatingBins, n_permutations: int, seed: int = 0) -> np.ndarray:
    """[permutation, bin] index of the bin whose rating each bin gets: songs are permuted, and each
    song takes the permuted song's curve in time order, from its first rating on, mirrored back
    and forth where the donor's curve is shorter (see the module note for why whole curves)."""
    t = bins.table
    songs = t["song"].to_numpy()
    order = np.lexsort((t["time_s"].to_numpy(), t["row"].to_numpy(), songs))  # each song's bins in time order
    names, start, count = np.unique(songs[order], return_index=True, return_counts=True)
    rng = np.random.default_rng(seed)
    out = np.empty((n_permutations, len(t)), dtype=np.int64)
    for p in range(n_permutations):
        donor = rng.permutation(len(names))
        for s in range(len(names)):
            n_own, n_donor = count[s], count[donor[s]]
            k = np.arange(n_own)
            if n_donor > 1:  # mirror: 0 1 2 .. m-1 m-2 .. 1 0 1 ..
                period = 2 * (n_donor - 1)
                k = k % period
                k = np.where(k < n_donor, k, period - k)
            else:
                k = np.zeros(n_own, dtype=np.int64)
            out[p, order[start[s]:start[s] + n_own]] = order[start[donor[s]] + k]
    return out


def regress_site(X: np.ndarray, Y: np.ndarray, groups: np.ndarray, folds, alphas=DEFAULT_ALPHAS, seed: int = 0):
    """Out-of-fold ridge fits of every column of Y [bin, target row] on X [bin, d]. Returns
    (metrics {name: [target row, fold]}, out-of-fold predictions [bin, target row])."""
    X = np.asarray(X, dtype=np.float64)
    if not np.isfinite(X).all():
        raise ValueError(f"{int((~np.isfinite(X).all(1)).sum())} windows have non-finite activations; check the extraction")
    metrics = {m: np.zeros((Y.shape[1], len(folds))) for m in REGRESSION_METRICS}
    pred = np.full(Y.shape, np.nan)
    for f, (tr, te) in enumerate(folds):
        mean, scale = standardise(X[tr])
        W, b, _, _ = ridge_cv((X[tr] - mean) / scale, Y[tr], alphas, groups[tr], seed=seed)
        p = ((X[te] - mean) / scale) @ W.T + b  # [test bin, target row]
        pred[te] = p
        scores = regression_metrics(Y[te].T, p.T)
        for m in REGRESSION_METRICS:
            metrics[m][:, f] = scores[m]
    return metrics, pred


def dynamic_probe(get: Callable[[str], np.ndarray], sites: Sequence[str], bins: RatingBins, n_splits: int = 5,
                  n_permutations: int = 99, seed: int = 0, alphas=DEFAULT_ALPHAS,
                  n_boot: int = 1000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Probe valence and arousal from the windows of every site (`get(site)` -> [bin, d]).

    Returns (metrics: one row per site x target x metric with value (of the pooled out-of-fold
    predictions), fold_mean (mean of the per-fold values), ci_low and ci_high (bootstrap over
    groups, `n_boot` draws), p_value and p_resolution from the song-curve permutations;
    predictions: per site x bin the out-of-fold prediction of each target beside the rating)."""
    from affectlens.probes.sweep import grouped_splits, site_columns

    t = bins.table
    groups = t["group"].to_numpy().astype(str)
    folds = grouped_splits(None, groups, n_splits, seed, unit="groups (artists/songs)")
    perm = curve_permutations(bins, n_permutations, seed)
    rated = t[list(TARGETS)].to_numpy(float)  # [bin, target]
    # columns: target 0 observed, target 1 observed, then each permutation's two targets
    Y = np.concatenate([rated] + [rated[p] for p in perm], axis=1)
    resolution = 1.0 / (1 + n_permutations) if n_permutations else np.nan
    rows, preds = [], []
    for site in sites:
        metrics, pred = regress_site(get(site), Y, groups, folds, alphas, seed)
        pooled = regression_metrics(Y.T, pred.T)  # {metric: [target row]}
        k = len(TARGETS)
        draws = metrics_from_moments(group_bootstrap_sums(group_moments(Y[:, :k].T, pred[:, :k].T, groups),
                                                          n_boot, seed))  # {metric: [draw, target]}
        cols = site_columns(site)
        for j, target in enumerate(TARGETS):
            for m in REGRESSION_METRICS:
                per_fold = metrics[m][j]  # [fold], the observed target
                value = float(pooled[m][j])
                lo, hi = (float(x) for x in percentile_interval(draws[m][:, j]))
                null = pooled[m][k + j::k]  # [permutation]
                p = permutation_p_value(value, null)[0] if n_permutations else np.nan
                rows.append({**cols, "target": target, "metric": m, "value": value,
                             "fold_mean": float(np.nanmean(per_fold)), "ci_low": lo, "ci_high": hi,
                             "ci_method": "bootstrap over groups", "value_method": "pooled out-of-fold predictions",
                             "null_mean": float(np.mean(null)) if n_permutations else np.nan,
                             "p_value": p, "p_resolution": resolution, "n_permutations": n_permutations,
                             "n_boot": n_boot, "n_folds": len(folds), "n_songs": t["song"].nunique(),
                             "n_groups": len(set(groups)), "n_bins": len(t), "bin_s": bins.bin_s,
                             "lag_s": bins.lag_s})
        preds.append(t[["clip_id", "song", "time_s", *TARGETS]].assign(
            site=site, **{f"predicted_{target}": pred[:, j] for j, target in enumerate(TARGETS)}))
        log.info("dynamic probe %s: R² valence %.3f, arousal %.3f", site,
                 *(r["value"] for r in rows[-2 * len(REGRESSION_METRICS):] if r["metric"] == "r2"))
    return pd.DataFrame(rows), pd.concat(preds, ignore_index=True)
