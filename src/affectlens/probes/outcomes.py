"""Probes trained on patching outcomes, as the video seed trains its probes on tracing results:
which clips' decisions flip when a site is patched, and can a probe read that off a clip's
activations before any patching?

A clip's decision is the sign of the patch metric (logit of target minus logit of source). In the
denoising direction the base run is the corrupt clip, patched with clean activations; it *flips*
at a site when some patched window turns the sign of its metric. The outcome table then labels
each base clip per patched site, and `outcome_tasks` makes one classification task per patched
site for the ordinary sweep (same folds by speaker, permutation test and control).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from affectlens.settings import ProbeConfig

log = logging.getLogger(__name__)

DIRECTIONS = {"denoising": "corrupt_clip", "noising": "clean_clip"}  # direction -> the clip that was run


def patch_outcomes(effects: pd.DataFrame, pairs: pd.DataFrame, direction: str = "denoising") -> pd.DataFrame:
    """One row per (base clip, patched site): clip_id, site, flipped (bool: some window turned the
    sign of the decision), max_normalised (the largest normalised effect over windows).

    `effects` is the patch stage's effects table (pair_id, direction, site, raw, clean, corrupt,
    normalised), `pairs` its pairs table (pair_id, clean_clip, corrupt_clip)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: use one of {sorted(DIRECTIONS)}")
    for table, cols, name in ((effects, ("pair_id", "direction", "site", "raw", "clean", "corrupt"), "effects"),
                              (pairs, ("pair_id", DIRECTIONS[direction]), "pairs")):
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise KeyError(f"the patch {name} table lacks columns {missing}")
    e = effects[effects["direction"] == direction]
    if "method" in e.columns:  # attribution rows estimate a patch; only exact rows ran one
        e = e[e["method"] == "exact"]
    e = e.copy()
    base = e["corrupt"] if direction == "denoising" else e["clean"]
    e["_flip"] = np.sign(e["raw"]) != np.sign(base)
    if "normalised" not in e.columns:
        e["normalised"] = np.nan
    g = e.groupby(["pair_id", "site"], sort=False).agg(flipped=("_flip", "any"),
                                                       max_normalised=("normalised", "max")).reset_index()
    g = g.merge(pairs[["pair_id", DIRECTIONS[direction]]], on="pair_id", how="left")
    if g[DIRECTIONS[direction]].isna().any():
        raise KeyError(f"effects name pairs that the pairs table lacks: "
                       f"{g.pair_id[g[DIRECTIONS[direction]].isna()].unique().tolist()[:5]}")
    g = g.rename(columns={DIRECTIONS[direction]: "clip_id"})
    # a clip can be the base of several pairs: it flips at a site if any of its pairs does
    return (g.groupby(["clip_id", "site"], sort=False)
             .agg(flipped=("flipped", "any"), max_normalised=("max_normalised", "max")).reset_index())


def outcome_tasks(outcomes: pd.DataFrame, manifest: pd.DataFrame, group_column: str = "speaker",
                  n_splits: int = 4, n_permutations: int = 0, seed: int = 0, control: bool = True
                  ) -> tuple[list, list[dict]]:
    """(tasks, skipped): one classification task per patched site, 'flips' vs 'holds' for the clips
    that were patched, rows in manifest order; and one row per site left out (its outcomes lack two
    classes with two clips each, or two speakers) saying why."""
    from affectlens.probes.sweep import classification_task

    index = {c: i for i, c in enumerate(manifest["clip_id"].astype(str))}
    missing = sorted(set(outcomes["clip_id"].astype(str)) - set(index))
    if missing:
        raise KeyError(f"{len(missing)} patched clips are not in the manifest, e.g. {missing[:5]}")
    groups = manifest[group_column].astype(str).to_numpy()
    tasks, skipped = [], []
    for site, g in outcomes.groupby("site", sort=False):
        rows = g["clip_id"].astype(str).map(index).to_numpy()
        labels = np.where(g["flipped"].to_numpy(bool), "flips", "holds")
        counts = pd.Series(labels).value_counts()
        n_groups = len(np.unique(groups[rows]))
        if len(counts) < 2 or counts.min() < 2 or n_groups < 2:
            reason = (f"{int(counts.get('flips', 0))} clips flip and {int(counts.get('holds', 0))} hold over "
                      f"{n_groups} speakers; a probe needs both outcomes twice and two speakers (raise patch.n_pairs)")
            log.info("outcome probe for %s skipped: %s", site, reason)
            skipped.append({"probe": f"flip@{site}", "site": "", "metric": "skipped", "value": np.nan,
                            "n_clips": len(rows), "reason": reason})
            continue
        tasks.append(classification_task(f"flip@{site}", labels, groups[rows], rows=rows, n_splits=n_splits,
                                         seed=seed, n_permutations=n_permutations, control=control))
    return tasks, skipped


def run_outcome_probe(store_path, manifest: pd.DataFrame, effects: pd.DataFrame, pairs: pd.DataFrame,
                      params: ProbeConfig | dict | None, out_sweep, direction: str = "denoising", threads: int = 1) -> pd.DataFrame:
    """Probe every store site for every patched site's outcome (flips / holds) and write the tidy
    table (the sweep's columns; `probe` = flip@{patched site}). A patched site with too few clips of
    either outcome (the default patch stage draws a handful of pairs) gets a row with metric
    `skipped` and its `reason` instead, so the table always says what was and was not probed."""
    from affectlens.io import atomic_path
    from affectlens.probes.sweep import FitSettings, align_manifest, read_pooled, sweep_tasks
    from affectlens.store import Store

    p = ProbeConfig.from_dict(params)
    outcomes = patch_outcomes(effects, pairs, direction)
    tasks, skipped = outcome_tasks(outcomes, manifest, n_splits=p.n_splits, n_permutations=p.n_permutations,
                                   seed=p.seed)
    table = pd.DataFrame()
    if tasks:
        settings = FitSettings(C=p.C, class_weight=p.class_weight, max_iter=p.max_iter, seed=p.seed)
        with Store(store_path) as st:
            rows = align_manifest(st.clip_ids, manifest, ["speaker"], where=str(st.path))
            table = sweep_tasks(lambda s: read_pooled(st, s, rows), st.sites, tasks, settings, threads)[0].metrics
    else:
        log.warning("no outcome probe: %d patched clips over %d sites are too few (need both outcomes twice and "
                    "two speakers per site); raise patch.n_pairs", outcomes["clip_id"].nunique(), outcomes["site"].nunique())
    table = pd.concat([table, pd.DataFrame(skipped)], ignore_index=True)
    if table.empty:
        table = pd.DataFrame([{"probe": "", "site": "", "metric": "skipped", "value": np.nan, "n_clips": 0,
                               "reason": f"no exact {direction} patching outcome in the effects table"}])
    with atomic_path(out_sweep) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    return table
