"""The acoustic baseline: hand-made features of the audio itself, probed like a model site.

A probe that reads emotion from a model's activations shows that the *audio* carries emotion as
much as that the *model* encodes it. The baseline separates the two: the same speaker-grouped
cross-validation, permutation test and control task run on plain acoustic statistics (MFCC
mean/std, delta-MFCC std, pitch and energy statistics: `acoustics.acoustic_features`),
entered in the sweep as the pseudo-site `acoustic.mfcc_stats`. A model site is interesting where
it beats this row, not where it beats chance.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from affectlens.io import atomic_path

log = logging.getLogger(__name__)

ACOUSTIC_SITE = "acoustic.mfcc_stats"
PSEUDO_TOWERS = ("acoustic",)  # towers of pseudo-sites: features that are not model activations


def is_pseudo_site(site: str) -> bool:
    return site.split(".", 1)[0] in PSEUDO_TOWERS


def _one_clip(path: str, start, end, sr: int) -> np.ndarray:
    from affectlens.data.decode import decode_clip
    from affectlens.acoustics import acoustic_features

    return acoustic_features(decode_clip(path, start, end, sr=sr), sr)


def acoustic_feature_table(manifest: pd.DataFrame, n_jobs: int = 1, sr: int = 16000) -> pd.DataFrame:
    """One row per manifest clip: `clip_id` + the acoustic features (ACOUSTIC_FEATURE_NAMES) of
    the clip's audio (`path`, cut to `start`/`end` when given). `n_jobs` > 1 spreads clips over
    processes."""
    from affectlens.acoustics import ACOUSTIC_FEATURE_NAMES

    for col in ("clip_id", "path"):
        if col not in manifest.columns:
            raise KeyError(f"manifest has no column {col!r}; its columns are {list(manifest.columns)}")
    start = manifest["start"] if "start" in manifest.columns else pd.Series([None] * len(manifest))
    end = manifest["end"] if "end" in manifest.columns else pd.Series([None] * len(manifest))
    jobs = list(zip(manifest["path"].astype(str), start.tolist(), end.tolist()))
    if n_jobs > 1 and len(jobs) > 1:
        from joblib import Parallel, delayed

        rows = Parallel(n_jobs=n_jobs, batch_size=8)(delayed(_one_clip)(p, a, b, sr) for p, a, b in jobs)
    else:
        rows = [_one_clip(p, a, b, sr) for p, a, b in jobs]
    table = pd.DataFrame(np.stack(rows).astype(np.float64), columns=list(ACOUSTIC_FEATURE_NAMES))
    table.insert(0, "clip_id", manifest["clip_id"].astype(str).to_numpy())
    bad = ~np.isfinite(table.iloc[:, 1:].to_numpy()).all(1)
    if bad.any():
        raise ValueError(f"acoustic features are not finite for {int(bad.sum())} clips, e.g. "
                         f"{table.clip_id[bad].tolist()[:5]}; check those clips' audio")
    log.info("acoustic features: %d clips x %d features", len(table), table.shape[1] - 1)
    return table


def write_acoustic_features(manifest: pd.DataFrame, out_path: str | Path, n_jobs: int = 1) -> pd.DataFrame:
    """`acoustic_feature_table` written as TSV (atomically)."""
    table = acoustic_feature_table(manifest, n_jobs=n_jobs)
    with atomic_path(out_path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.7g")
    return table


def read_acoustic_features(path: str | Path, clip_ids) -> np.ndarray:
    """[clip, feature] rows of the feature TSV in the order of `clip_ids`; errors name clips that
    the table lacks."""
    table = pd.read_csv(path, sep="\t", dtype={"clip_id": str}).set_index("clip_id")
    ids = [str(c) for c in clip_ids]
    missing = [c for c in ids if c not in table.index]
    if missing:
        raise KeyError(f"{len(missing)} clips have no acoustic features in {path}, e.g. {missing[:5]}; "
                       "rerun the acoustic_features rule for this manifest")
    return table.loc[ids].to_numpy(np.float64)
