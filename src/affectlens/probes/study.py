"""The probe stage of one (dataset, model): every table and figure of `results/probe/{dataset}/{model}/`.

`run_probe_study` is what `stages.probe` calls; its settings are a `settings.ProbeConfig` (or a
partial mapping of it), so direct callers may pass only what they change.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from affectlens.io import atomic_path
from affectlens.settings import ProbeConfig

log = logging.getLogger(__name__)

def _write(df: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)


def _placeholder(path, text: str) -> None:
    from matplotlib.figure import Figure

    from affectlens.viz.curves import _save_atomic

    fig = Figure(figsize=(6, 1.5))
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=10)
    _save_atomic(fig, Path(path))


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
            representation_path=outputs.get("representation"), effect_size=p.effect_size)
        held = (f"official splits (fit on train; {', '.join(sorted(set(sweep['split']) - {'speakers'}))})"
                if split_column else f"{manifest['speaker'].nunique()} speakers held out in turn")
        title = f"{model_id}: probes of {label_column} ({held})"
        _write(sweep, outputs["sweep"])
        plot_layer_curve(sweep, outputs["curve"], title=title)

        sites_tr = tr.sites
        sites_tr = [readout_site or store.sites[-1]] if sites_tr is None else list(sites_tr)
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
            _write(curves, outputs["time_resolved"])
            if outputs.get("representation") and not rep_bins.empty:
                pooled = pd.read_csv(outputs["representation"], sep="\t")
                variation = []
                for site, g in rep_bins.groupby("site", sort=False):
                    v = frame_variation(g)
                    v.insert(0, "site", site)
                    v.insert(1, "depth", g["depth"].iloc[0])
                    variation.append(v)
                _write(pd.concat([pooled, *variation, rep_bins], ignore_index=True), outputs["representation"])
            if outputs.get("time_curve"):
                if curves.empty:
                    _placeholder(outputs["time_curve"], "no time-resolved probe: probe.time_resolved.sites is empty")
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
    _write(table, out_path)
    return table
