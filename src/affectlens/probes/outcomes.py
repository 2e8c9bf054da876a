"""Probes trained on patching outcomes, as the video seed trains its probes on tracing results:
which clips' decisions flip when a site is patched, and can a probe read that off a clip's
activations before any patching?

A clip's decision is the sign of the patch metric (logit of target minus logit of source). In the
denoising direction the base run is the corrupt clip, patched with clean activations; it *flips*
at a site when some patched window turns the sign of its metric. The outcome table then labels
each base clip per patched site, and `outcome_tasks` makes one classification task per patched
site for the ordinary sweep (same folds by speaker, permutation test and control).

Video QA tracing (affectlens.patching.video) is read the same way: its per-question table is an
effects table whose windows are token slices and whose base clip is the question itself (its
metric: logit of the answer minus that of the counterfactual run's answer), and `trace_outcomes`
labels each question per counterfactual x LM site (`run_trace_outcome_probe`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from affectlens.settings import ProbeConfig

log = logging.getLogger(__name__)

DIRECTIONS = {"denoising": "corrupt_clip", "noising": "clean_clip"}  # direction -> the clip that was run
ID_COLUMNS = ("pair_id", "clean_clip", "corrupt_clip", "question_id")


@dataclass(frozen=True)
class Wording:
    """How the outcome table's `skipped` rows and the log name what was patched."""

    items: str    # what flips or holds
    groups: str   # the folds' groups
    remedy: str   # the setting that gives more of them
    empty: str    # what holds no outcome at all


PATCH = Wording("clips", "speakers", "raise patch.n_pairs", "no exact {direction} patching outcome in the effects table")
TRACE = Wording("questions", "videos", "raise trace.n_questions, or set it to null for every question with candidates",
                "no {direction} tracing outcome in the per-question table")


def read_table(path) -> pd.DataFrame:
    """A patch or trace table (effects, pairs, per-question) with its ids read as text, as the
    manifest reads its clip ids: a question id such as 007 stays 007 and still names its clip."""
    return pd.read_csv(path, sep="\t", dtype={c: str for c in ID_COLUMNS})


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


def outcome_name(site: str, counterfactual: str | None = None) -> str:
    """The probe's name: flip@{patched site}, or flip[{counterfactual}]@{site} for a traced one."""
    return f"flip@{site}" if counterfactual is None else f"flip[{counterfactual}]@{site}"


def outcome_tasks(outcomes: pd.DataFrame, manifest: pd.DataFrame, group_column: str = "speaker",
                  n_splits: int = 4, n_permutations: int = 0, seed: int = 0, control: bool = True,
                  wording: Wording = PATCH) -> tuple[list, list[dict]]:
    """(tasks, skipped): one classification task per patched site (per counterfactual x site where
    the outcomes have a `counterfactual` column, as `trace_outcomes`' do), 'flips' vs 'holds' for
    the clips that were patched, rows in manifest order; and one row per site left out (its
    outcomes lack two classes with two clips each, or two groups) saying why."""
    from affectlens.probes.sweep import classification_task

    index = {c: i for i, c in enumerate(manifest["clip_id"].astype(str))}
    missing = sorted(set(outcomes["clip_id"].astype(str)) - set(index))
    if missing:
        raise KeyError(f"{len(missing)} patched {wording.items} are not in the manifest, e.g. {missing[:5]}")
    groups = manifest[group_column].astype(str).to_numpy()
    keys = ["counterfactual", "site"] if "counterfactual" in outcomes.columns else ["site"]
    tasks, skipped = [], []
    for key, g in outcomes.groupby(keys, sort=False):
        named = dict(zip(keys, key))
        name = outcome_name(named["site"], named.get("counterfactual"))
        rows = g["clip_id"].astype(str).map(index).to_numpy()
        labels = np.where(g["flipped"].to_numpy(bool), "flips", "holds")
        counts = pd.Series(labels).value_counts()
        n_groups = len(np.unique(groups[rows]))
        if len(counts) < 2 or counts.min() < 2 or n_groups < 2:
            reason = (f"{int(counts.get('flips', 0))} {wording.items} flip and {int(counts.get('holds', 0))} hold "
                      f"over {n_groups} {wording.groups}; a probe needs both outcomes twice and two "
                      f"{wording.groups} ({wording.remedy})")
            log.info("outcome probe %s skipped: %s", name, reason)
            skipped.append({"probe": name, "site": "", "metric": "skipped", "value": np.nan,
                            "n_clips": len(rows), "reason": reason})
            continue
        tasks.append(classification_task(name, labels, groups[rows], rows=rows, n_splits=n_splits,
                                         seed=seed, n_permutations=n_permutations, control=control))
    return tasks, skipped


def trace_outcomes(table: pd.DataFrame, pairs: pd.DataFrame, direction: str = "denoising") -> pd.DataFrame:
    """One row per (question, counterfactual, LM site) of a video QA trace: clip_id (the
    question's manifest clip: the trace's question_id, which `trace_pairs` names as both clips of
    its pairs), counterfactual, site, flipped (some token slice patched at that site turned the sign
    of the answer metric: it restored the answer the counterfactual changed or, more rarely, changed
    one the counterfactual kept) and max_normalised; `table` is the trace stage's per-question table.

    The unit is counterfactual x site, not site: each counterfactual asks its own question of the
    video (frame order, motion, content), and every question is traced under every counterfactual,
    so no task loses a question by keeping them apart, while pooling them (a question flips if any
    counterfactual's change is undone) would label each question by whichever counterfactual moves
    it most."""
    if "counterfactual" not in table.columns:
        raise KeyError("the trace table lacks the column 'counterfactual' (is it the trace stage's per_question.tsv?)")
    parts = [patch_outcomes(part, pairs, direction).assign(counterfactual=cf)
             for cf, part in table.groupby("counterfactual", sort=False)]
    if not parts:
        return pd.DataFrame(columns=["clip_id", "site", "flipped", "max_normalised", "counterfactual"])
    return pd.concat(parts, ignore_index=True)


def run_outcome_probe(store_path, manifest: pd.DataFrame, effects: pd.DataFrame, pairs: pd.DataFrame,
                      params: ProbeConfig | dict | None, out_sweep, direction: str = "denoising", threads: int = 1) -> pd.DataFrame:
    """Probe every store site for every patched site's outcome (flips / holds) and write the tidy
    table (the sweep's columns; `probe` = flip@{patched site}). A patched site with too few clips of
    either outcome (the default patch stage draws a handful of pairs) gets a row with metric
    `skipped` and its `reason` instead, so the table always says what was and was not probed."""
    return sweep_outcomes(store_path, manifest, patch_outcomes(effects, pairs, direction), params, out_sweep,
                          threads, PATCH, direction)


def run_trace_outcome_probe(store_path, manifest: pd.DataFrame, table: pd.DataFrame, pairs: pd.DataFrame,
                            params: ProbeConfig | dict | None, out_sweep, direction: str = "denoising",
                            threads: int = 1) -> pd.DataFrame:
    """As `run_outcome_probe`, for video QA tracing: which questions' answers flip when an LM site
    is patched, per counterfactual (`probe` = flip[{counterfactual}]@{site}), read off every
    site of the extract stage's store of the same dataset and model, folds grouped by video (the
    video_qa manifest's `speaker`), `skipped` rows where too few questions flip or hold."""
    return sweep_outcomes(store_path, manifest, trace_outcomes(table, pairs, direction), params, out_sweep,
                          threads, TRACE, direction)


def sweep_outcomes(store_path, manifest: pd.DataFrame, outcomes: pd.DataFrame, params: ProbeConfig | dict | None,
                   out_sweep, threads: int, wording: Wording, direction: str) -> pd.DataFrame:
    """The sweep of `outcome_tasks` over every store site, with the `skipped` rows, written to
    `out_sweep`; never an empty table (a lone `skipped` row says that nothing was patched)."""
    from affectlens.io import atomic_path
    from affectlens.probes.sweep import FitSettings, align_manifest, read_pooled, sweep_tasks
    from affectlens.store import Store

    p = ProbeConfig.from_dict(params)
    tasks, skipped = outcome_tasks(outcomes, manifest, n_splits=p.n_splits, n_permutations=p.n_permutations,
                                   seed=p.seed, wording=wording)
    table = pd.DataFrame()
    if tasks:
        settings = FitSettings(C=p.C, class_weight=p.class_weight, max_iter=p.max_iter, seed=p.seed)
        with Store(store_path) as st:
            rows = align_manifest(st.clip_ids, manifest, ["speaker"], where=str(st.path))
            table = sweep_tasks(lambda s: read_pooled(st, s, rows), st.sites, tasks, settings, threads)[0].metrics
    else:
        log.warning("no outcome probe: %d patched %s over %d probes are too few (need both outcomes twice and "
                    "two %s per probe); %s", outcomes["clip_id"].nunique(), wording.items, len(skipped),
                    wording.groups, wording.remedy)
    table = pd.concat([table, pd.DataFrame(skipped)], ignore_index=True)
    if table.empty:
        table = pd.DataFrame([{"probe": "", "site": "", "metric": "skipped", "value": np.nan, "n_clips": 0,
                               "reason": wording.empty.format(direction=direction)}])
    with atomic_path(out_sweep) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    return table
