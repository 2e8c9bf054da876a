"""Stages of workflow/rules/probe.smk: probe, probe_dynamic."""

from __future__ import annotations

import logging

import pandas as pd

from affectlens.settings import ProbeDynamicConfig
from affectlens.stages.common import write_tsv

log = logging.getLogger("affectlens")


def probe(store_path, manifest_path, params: dict, label_column: str, out_sweep, out_confusion, out_curve,
          threads: int = 1, pairs=(), readout_site: str | None = None, acoustic=None, out_folds=None,
          out_representation=None, out_confusion_plot=None, out_projection=None, out_time_resolved=None,
          out_time_curve=None) -> None:
    """Probe every site for the label, the concept `pairs` and the configured continuous columns
    (speaker-grouped folds, or official splits), next to the acoustic baseline (`acoustic`: the
    feature table; None = none); write the tidy tables and figures (affectlens.probes.study)."""
    from affectlens.data.manifest import read_manifest
    from affectlens.probes.study import run_probe_study

    outputs = {"sweep": out_sweep, "confusion": out_confusion, "curve": out_curve, "folds": out_folds,
               "representation": out_representation, "confusion_plot": out_confusion_plot,
               "projection": out_projection, "time_resolved": out_time_resolved, "time_curve": out_time_curve}
    run_probe_study(store_path, read_manifest(manifest_path), params, label_column, outputs, pairs=pairs,
                    readout_site=readout_site, acoustic_path=acoustic or None, threads=threads)


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
