"""Stages of workflow/rules/probe.smk: probe (the probe study of one dataset x model: every table and
figure of `results/probe/{dataset}/{model}/`), probe_study (a study's sweeps in one table),
probe_dynamic. The probes themselves are affectlens.probes; this module composes them with the
store, the manifest and the figures (affectlens.viz)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from affectlens.models.config import readout_site as pick_readout
from affectlens.settings import ProbeConfig, ProbeDynamicConfig
from affectlens.stages.common import write_tsv

log = logging.getLogger("affectlens")


def probe(store_path, manifest_path, params: ProbeConfig | dict, label_column: str, out_sweep, out_confusion, out_curve,
          threads: int = 1, pairs=(), readout_site: str | None = None, acoustic=None, out_folds=None,
          out_representation=None, out_confusion_plot=None, out_projection=None, out_time_resolved=None,
          out_time_curve=None) -> None:
    """Probe every site for the label, the concept `pairs` and the configured continuous columns
    (speaker-grouped folds, or official splits), next to the acoustic baseline (`acoustic`: the
    feature table; None = none); write the tidy tables and figures (`run_probe_study`)."""
    from affectlens.data.manifest import read_manifest

    outputs = {"sweep": out_sweep, "confusion": out_confusion, "curve": out_curve, "folds": out_folds,
               "representation": out_representation, "confusion_plot": out_confusion_plot,
               "projection": out_projection, "time_resolved": out_time_resolved, "time_curve": out_time_curve}
    run_probe_study(store_path, read_manifest(manifest_path), params, label_column, outputs, pairs=pairs,
                    readout_site=readout_site, acoustic_path=acoustic or None, threads=threads)


def _placeholder(path, text: str) -> None:
    from matplotlib.figure import Figure

    from affectlens.viz.curves import save_atomic

    fig = Figure(figsize=(6, 1.5))
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=10)
    save_atomic(fig, Path(path))


def best_site(sweep: pd.DataFrame, probe: str, split: str | None = None) -> str:
    """The model site with the highest primary score (accuracy or R²) for `probe` (in `split`,
    default: test when there is one, else cv)."""
    rows = sweep[(sweep["probe"] == probe) & (sweep["metric"].isin(["accuracy", "r2"])) & (sweep["depth"] >= 0)]
    if split is None:
        split = "test" if (rows["split"] == "test").any() else rows["split"].iloc[0]
    rows = rows[rows["split"] == split]
    return str(rows.loc[rows["value"].idxmax(), "site"])


def run_probe_study(store_path, manifest: pd.DataFrame, params: ProbeConfig | dict | None, label_column: str,
                    outputs: dict, pairs: Sequence[Sequence[str]] = (), readout_site: str | None = None,
                    acoustic_path=None, threads: int = 1) -> pd.DataFrame:
    """Probe every site of the store for the study's tasks and write `outputs` (keys: sweep,
    confusion, curve, and optionally folds, representation, confusion_plot, projection,
    time_resolved, time_curve). `pairs` are concept pairs (source, target) besides
    `params["pairs"]`; `acoustic_path` is the acoustic feature table (None: no baseline).
    Returns the sweep table."""
    from affectlens.probes.baseline import ACOUSTIC_SITE, read_acoustic_features
    from affectlens.probes.frames import time_resolved
    from affectlens.probes.representation import frame_variation
    from affectlens.probes.sweep import FitSettings, has_official_splits, probe_sweep, read_pooled, align_manifest
    from affectlens.store import Store
    from affectlens.viz.confusion import plot_confusions
    from affectlens.viz.curves import plot_layer_curve, plot_time_curve
    from affectlens.viz.projection import plot_projection

    p = ProbeConfig.from_dict(params)
    tr = p.time_resolved
    all_pairs = list(dict.fromkeys(tuple(str(x) for x in pair) for pair in [*pairs, *p.pairs]))
    if p.splits == "official" or (p.splits == "auto" and "split" in manifest.columns
                                     and has_official_splits(manifest["split"])):
        split_column = "split"
    else:
        split_column = None
    baseline = None
    if acoustic_path is not None and p.acoustic_baseline:
        baseline = read_acoustic_features(acoustic_path, manifest["clip_id"])
    with Store(store_path) as store:
        model_id = store.attrs.get("model_id", "model")
        sweep = probe_sweep(
            store, manifest, label_column=label_column, n_splits=p.n_splits, C=p.C,
            n_permutations=p.n_permutations, seed=p.seed, class_weight=p.class_weight,
            confusion_path=outputs["confusion"], folds_path=outputs.get("folds"), n_threads=threads,
            pairs=all_pairs, regression_columns=p.regression_columns, split_column=split_column,
            baseline=baseline, alphas=p.ridge_alphas, n_boot=p.n_boot, max_iter=p.max_iter,
            representation_path=outputs.get("representation"), effect_size=p.effect_size, normalise=p.normalise)
        held = (f"official splits (fit on train; {', '.join(sorted(set(sweep['split']) - {'speakers'}))})"
                if split_column else f"{manifest['speaker'].nunique()} speakers held out in turn")
        title = f"{model_id}: probes of {label_column} ({held})"
        write_tsv(sweep, outputs["sweep"])
        plot_layer_curve(sweep, outputs["curve"], title=title)

        sites_tr = tr.sites
        timed = float(store.attrs.get("frame_rate", 0) or 0) > 0  # a text encoder's positions are tokens
        if sites_tr is None and not timed:
            log.info("%s has no time axis (frame_rate 0: positions are tokens); no time-resolved probe", store_path)
        sites_tr = ([pick_readout(readout_site, store.sites)] if timed else []) if sites_tr is None else list(sites_tr)
        if outputs.get("time_resolved"):
            if sites_tr:
                curves, rep_bins = time_resolved(
                    store, manifest, sites_tr, label_column, bin_s=tr.bin_s,
                    max_bins=tr.max_bins, n_splits=p.n_splits, seed=p.seed,
                    settings=FitSettings(C=p.C, class_weight=p.class_weight, max_iter=p.max_iter,
                                         alphas=tuple(p.ridge_alphas), n_boot=p.n_boot, seed=p.seed),
                    split_column=split_column, effect_size=p.effect_size)
            else:
                curves, rep_bins = pd.DataFrame(), pd.DataFrame()
            write_tsv(curves, outputs["time_resolved"])
            if outputs.get("representation") and not rep_bins.empty:
                pooled = pd.read_csv(outputs["representation"], sep="\t")
                variation = []
                for site, g in rep_bins.groupby("site", sort=False):
                    v = frame_variation(g)
                    v.insert(0, "site", site)
                    v.insert(1, "depth", g["depth"].iloc[0])
                    variation.append(v)
                write_tsv(pd.concat([pooled, *variation, rep_bins], ignore_index=True), outputs["representation"])
            if outputs.get("time_curve"):
                if curves.empty:
                    _placeholder(outputs["time_curve"], "no time-resolved probe: probe.time_resolved.sites is empty"
                                 if timed else "no time-resolved probe: the positions are tokens, not time")
                else:
                    plot_time_curve(curves, outputs["time_curve"],
                                    title=f"{model_id}: {label_column} probes per {tr.bin_s:g} s bin")

        main_probe = label_column
        best = best_site(sweep, main_probe)
        if outputs.get("confusion_plot"):
            conf = pd.read_csv(outputs["confusion"], sep="\t")
            split = "test" if (conf["split"] == "test").any() else conf["split"].iloc[0]
            shown = [best] + ([ACOUSTIC_SITE] if baseline is not None else [])
            plot_confusions(conf, shown, outputs["confusion_plot"], probe=main_probe, split=split,
                            title=f"{model_id}: {label_column}, best site vs acoustic baseline ({split})")
        if outputs.get("projection"):
            site = p.projection_site or readout_site or best
            rows = align_manifest(store.clip_ids, manifest, [label_column], where=str(store.path))
            X = read_pooled(store, site, rows)
            groups = manifest["speaker"].astype(str).to_numpy() if "speaker" in manifest.columns else None
            plot_projection(X, manifest[label_column].astype(str).to_numpy(), outputs["projection"], groups=groups,
                            title=f"{model_id} at {site}: pooled activations by {label_column} (n = {len(X)})")
    log.info("probe study written: %s", ", ".join(str(v) for v in outputs.values() if v))
    return sweep


def concat_sweeps(paths: Sequence, out_path, study: str = "") -> pd.DataFrame:
    """One tidy table for a study: the sweep tables of its dataset x model combinations
    (`results/probe/{dataset}/{model}/sweep.tsv`) with `study`, `dataset` and `model` columns first."""
    frames = []
    for path in paths:
        path = Path(path)
        df = pd.read_csv(path, sep="\t")
        df.insert(0, "model", path.parent.name)
        df.insert(0, "dataset", path.parent.parent.name)
        df.insert(0, "study", study)
        frames.append(df)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_tsv(table, out_path)
    return table


def probe_dynamic(store_path, manifest_path, ratings_path, params: ProbeDynamicConfig | dict, out_table, out_predictions, out_plot,
                  alphas=None, threads: int = 1) -> pd.DataFrame:
    """Time-resolved regression probes of the dynamic ratings at every configured site, next to the
    acoustic baseline in the same windows (affectlens.probes.dynamic); writes the metrics table,
    the out-of-fold predictions and the figure."""
    from threadpoolctl import threadpool_limits

    from affectlens.data.decode import decode_clip
    from affectlens.data.manifest import read_manifest
    from affectlens.probes.dynamic import ACOUSTIC_SITE, acoustic_bins, dynamic_probe, pool_bins, rating_bins
    from affectlens.probes.regression import DEFAULT_ALPHAS
    from affectlens.store import Store, tower_of
    from affectlens.viz.dynamic import plot_dynamic

    params = ProbeDynamicConfig.from_dict(params)
    manifest = read_manifest(manifest_path)
    ratings = pd.read_csv(ratings_path, sep="\t", dtype={"clip_id": str, "song": str})
    if "speaker" not in manifest.columns:
        raise KeyError(f"{manifest_path} has no speaker column to group songs by")
    with Store(store_path) as store, threadpool_limits(max(1, int(threads))):
        sites = list(params.sites or ()) or [s for s in store.sites if tower_of(s) == store.towers[0]]
        absent = [s for s in sites if s not in store.sites]
        if absent:
            raise KeyError(f"probe_dynamic.sites names {absent}, which {store_path} does not hold ({store.sites})")
        towers = sorted({tower_of(s) for s in sites})
        if len(towers) > 1:
            raise ValueError(f"probe_dynamic.sites spans towers {towers}; list the sites of one tower (their frames "
                             "share one time axis)")
        bins = rating_bins(ratings, store.clip_ids, store.n_frames_of(sites[0]),
                           float(store.attrs.get("frame_rate", 0) or 0),
                           manifest.set_index(manifest["clip_id"].astype(str))["speaker"],
                           bin_s=params.bin_s, lag_s=params.lag_s, where=str(store_path))
        features = None
        if params.acoustic_baseline:
            paths = dict(zip(manifest["clip_id"].astype(str), manifest["path"].astype(str)))
            waves = {row: decode_clip(paths[store.clip_ids[row]]) for row in bins.table["row"].unique()}
            features = acoustic_bins(waves, 16000, bins)

        def get(site):
            if site == ACOUSTIC_SITE:
                return features
            return pool_bins(store.frame_chunks(site), store.offsets_of(site), bins)

        table, predictions = dynamic_probe(get, ([ACOUSTIC_SITE] if features is not None else []) + list(sites), bins,
                                           n_splits=params.n_splits, n_permutations=params.n_permutations,
                                           seed=params.seed, alphas=tuple(alphas or DEFAULT_ALPHAS))
        model_id = store.attrs.get("model_id", "model")
    scale = ", ".join(sorted(ratings["scale"].astype(str).unique())) if "scale" in ratings else ""
    table["scale"] = scale
    write_tsv(table, out_table)
    write_tsv(predictions, out_predictions)
    plot_dynamic(table, predictions, out_plot, n_songs=params.plot_songs,
                 title=f"{model_id}: dynamic valence/arousal ({scale}) per {params.bin_s:g} s window")
    return table
