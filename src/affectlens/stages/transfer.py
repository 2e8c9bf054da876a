"""Stage of workflow/rules/transfer.smk: transfer (one study x model: every ordered pair of the study's
datasets, every site, every normalisation). The probes and axes themselves are
affectlens.probes.transfer; this module reads the stores, manifests and acoustic features, aligns
the labels, and writes the tables and figures of `results/transfer/{study}/{model}/`."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from affectlens.settings import ProbeConfig, TransferConfig
from affectlens.stages.common import write_tsv

log = logging.getLogger("affectlens")

_FRONT = ["source", "target", "normalise", "site", "tower", "depth", "scope", "dataset", "probe", "split", "metric",
          "value", "ci_low", "ci_high", "chance", "p_value", "p_resolution"]
_AXIS_FRONT = ["source", "target", "normalise", "site", "tower", "depth", "contrast", "axis", "auroc", "ci_low",
               "ci_high", "chance", "cosine"]


@dataclass
class Corpus:
    """One dataset of the study: its store, its clips in manifest order, their mapped labels."""

    name: str
    store: str
    clip_ids: np.ndarray  # [clip] manifest order
    labels: np.ndarray    # [clip] the label column as stored
    mapped: np.ndarray    # [clip] after the dataset's label_map
    groups: np.ndarray    # [clip] speakers
    acoustic: np.ndarray | None = None  # [clip, feature]


def read_corpus(name: str, store_path, manifest_path, label_column: str = "label",
                label_map: Mapping[str, str] | None = None, acoustic_path=None) -> Corpus:
    """A dataset's decoded manifest (clips with a label and a speaker), mapped labels and acoustic
    features (None without a feature table)."""
    from affectlens.data.manifest import read_manifest
    from affectlens.probes.baseline import read_acoustic_features
    from affectlens.probes.transfer import map_labels

    manifest = read_manifest(manifest_path)
    for col in (label_column, "speaker"):
        if col not in manifest.columns:
            raise KeyError(f"{manifest_path}: no column {col!r} (datasets.{name}.label_column, speakers); its columns "
                           f"are {list(manifest.columns)}")
    unknown = sorted(set(label_map or {}) - set(manifest[label_column].astype(str)))
    if unknown:
        log.warning("datasets.%s.label_map names labels %s that no clip of %s has", name, unknown, manifest_path)
    labels = manifest[label_column].astype(str).to_numpy()
    acoustic = None if acoustic_path is None else read_acoustic_features(acoustic_path, manifest["clip_id"])
    return Corpus(name, str(store_path), manifest["clip_id"].astype(str).to_numpy(), labels,
                  map_labels(labels, label_map), manifest["speaker"].astype(str).to_numpy(), acoustic)


def _pairs(corpora: Sequence[Corpus]) -> list[tuple[Corpus, Corpus, list[str]]]:
    """Every ordered pair (A, B) with the labels both have after mapping; fewer than two is an
    error naming the label maps to set."""
    from affectlens.probes.transfer import shared_labels

    out = []
    for a in corpora:
        for b in corpora:
            if a is b:
                continue
            shared = shared_labels(a.mapped, b.mapped)
            if len(shared) < 2:
                raise ValueError(f"datasets {a.name} and {b.name} share {shared or 'no'} label(s) after mapping "
                                 f"({a.name}: {sorted(set(a.mapped))}; {b.name}: {sorted(set(b.mapped))}); set "
                                 f"datasets.{a.name}.label_map / datasets.{b.name}.label_map so that two or more match")
            out.append((a, b, shared))
    return out


def label_alignment(corpora: Sequence[Corpus]) -> pd.DataFrame:
    """One row per ordered pair x dataset x original label: what it maps to, its clips, kept or not.
    Each pair's left-out clips are logged."""
    from affectlens.probes.transfer import alignment_rows

    rows = []
    for a, b, shared in _pairs(corpora):
        for role, c in (("source", a), ("target", b)):
            part = alignment_rows(c.name, c.labels, c.mapped, shared)
            rows += [{"source": a.name, "target": b.name, "role": role, **r} for r in part]
            out = [f"{r['label']} ({r['n_clips']})" for r in part if not r["kept"]]
            kept = sum(r["n_clips"] for r in part if r["kept"])
            log.info("%s -> %s, %s %s: %d clips of %s kept; left out: %s", a.name, b.name, role, c.name, kept,
                     shared, ", ".join(out) or "none")
    return pd.DataFrame(rows)


def site_rows(site: str, raw: Mapping[str, np.ndarray], corpora: Sequence[Corpus], pairs, probe: ProbeConfig,
              settings: TransferConfig, contrasts: Sequence[Mapping] = ()) -> tuple[list[dict], list[dict]]:
    """(transfer rows, axis rows) of one site: `raw[name]` is the corpus's [clip, d] in manifest
    order; `pairs` from `_pairs`."""
    from affectlens.probes.normalise import normalise
    from affectlens.probes.sweep import FitSettings, site_columns
    from affectlens.probes.transfer import axis_transfer_rows, transfer_rows, transfer_task, within_rows

    p = probe
    fit = FitSettings(C=p.C, class_weight=p.class_weight, max_iter=p.max_iter, n_boot=p.n_boot, seed=p.seed)
    cols = site_columns(site)
    table, axes = [], []
    within: dict[tuple, list[dict]] = {}
    for how in settings.normalise:
        # each corpus normalised by its own clips, every label included, labels unused
        X = {c.name: normalise(raw[c.name], c.groups, how) for c in corpora}

        def within_of(c: Corpus, shared: list[str]) -> list[dict]:
            # z-scoring a whole corpus is affine per feature and every fold's probe standardises by its
            # training clips, so the within-corpus scores under `corpus` are those under `none`: computed once
            key = (c.name, tuple(shared), "none" if how == "corpus" else how)
            if key not in within:
                keep = np.isin(c.mapped, shared)
                within[key] = within_rows(X[c.name][keep], c.mapped[keep], c.groups[keep], fit, p.n_splits,
                                          p.n_permutations, p.seed, site=site)
            return within[key]

        for a, b, shared in pairs:
            ka, kb = np.isin(a.mapped, shared), np.isin(b.mapped, shared)
            task = transfer_task("label", a.mapped[ka], a.groups[ka], b.mapped[kb], b.groups[kb], shared,
                                 n_permutations=p.n_permutations, seed=p.seed)
            parts = [("within_source", a.name, within_of(a, shared)),
                     ("within_target", b.name, within_of(b, shared)),
                     ("transfer", b.name, transfer_rows(X[a.name][ka], X[b.name][kb], task, fit, site))]
            head = {"source": a.name, "target": b.name, "normalise": how, **cols}
            for scope, dataset, rows in parts:
                table += [{**head, "scope": scope, "dataset": dataset, **r, "classes": ";".join(shared)} for r in rows]
            for c in contrasts:
                source, target = str(c["source"]), str(c["target"])
                if source not in shared or target not in shared:
                    log.warning("contrast %s -> %s skipped for %s -> %s: not among the shared labels %s",
                                source, target, a.name, b.name, shared)
                    continue
                axes += [{**head, "contrast": f"{source}-to-{target}", **r}
                         for r in axis_transfer_rows(X[a.name][ka], a.mapped[ka], a.groups[ka], X[b.name][kb],
                                                     b.mapped[kb], b.groups[kb], source, target, n_boot=p.n_boot,
                                                     seed=p.seed)]
    best = [r for r in table if r["scope"] == "transfer" and r["metric"] == "balanced_accuracy"]
    log.info("transfer %s: %s", site, ", ".join(f"{r['source']}->{r['target']} {r['normalise']} {r['value']:.3f}"
                                                for r in best))
    return table, axes


def run_transfer(corpora: Sequence[Corpus], probe: ProbeConfig | dict | None = None,
                 settings: TransferConfig | dict | None = None, contrasts: Sequence[Mapping] = (),
                 sites: Sequence[str] | None = None, threads: int = 1) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(transfer table, axes table, label alignment) of every ordered pair of `corpora` at every
    site (the sites all stores hold, or `sites`), plus the acoustic baseline where every corpus has
    acoustic features and `probe.acoustic_baseline` is on, under every `settings.normalise`.
    Sites are read one at a time, in this thread, and fit in up to `threads` worker threads with one
    BLAS thread each (as the sweep does)."""
    from affectlens.probes.baseline import ACOUSTIC_SITE
    from affectlens.probes.sweep import align_manifest, read_pooled
    from affectlens.probes.transfer import frame
    from affectlens.store import Store

    p, t = ProbeConfig.from_dict(probe), TransferConfig.from_dict(settings)
    alignment = label_alignment(corpora)
    pairs = _pairs(corpora)
    workers = max(1, int(threads))
    stores = {c.name: Store(c.store) for c in corpora}
    try:
        held = [list(st.sites) for st in stores.values()]
        common = [s for s in held[0] if all(s in h for h in held[1:])]
        if sites is not None:
            absent = [s for s in sites if s not in common]
            if absent:
                raise KeyError(f"sites {absent} are not in every store of the study (common sites: {common})")
            common = list(sites)
        baseline = p.acoustic_baseline and all(c.acoustic is not None for c in corpora)
        all_sites = ([ACOUSTIC_SITE] if baseline else []) + common
        rows_of = {c.name: align_manifest(stores[c.name].clip_ids, pd.DataFrame({"clip_id": c.clip_ids}), [],
                                          where=c.store) for c in corpora}

        def read(site):
            return {c.name: c.acoustic if site == ACOUSTIC_SITE else read_pooled(stores[c.name], site, rows_of[c.name])
                    for c in corpora}

        with threadpool_limits(1), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="transfer") as pool:
            pending = []
            for site in all_sites:
                pending.append(pool.submit(site_rows, site, read(site), corpora, pairs, p, t, contrasts))
                while sum(not f.done() for f in pending) > workers:  # bound the matrices held in memory
                    next(f for f in pending if not f.done()).result()
            results = [f.result() for f in pending]
    finally:
        for st in stores.values():
            st.close()
    table = [r for rows, _ in results for r in rows]
    axes = [r for _, rows in results for r in rows]
    return frame(table, _FRONT), frame(axes, _AXIS_FRONT), alignment


def transfer(datasets: Sequence[Mapping], stores: Sequence, manifests: Sequence, acoustic: Sequence | None,
             probe: ProbeConfig | dict | None, settings: TransferConfig | dict | None, contrasts: Sequence[Mapping],
             outputs: Mapping, title: str = "", threads: int = 1) -> pd.DataFrame:
    """Rule transfer: `datasets` are {name, label_column, label_map} in the study's order, beside
    their `stores`, decoded `manifests` and `acoustic` feature tables (None: no baseline).
    `outputs` holds the paths table, axes, labels, plot and axes_plot."""
    from affectlens.viz.transfer import plot_axes, plot_transfer

    if not (len(datasets) == len(stores) == len(manifests)) or (acoustic and len(acoustic) != len(datasets)):
        raise ValueError(f"transfer: {len(datasets)} datasets, {len(stores)} stores, {len(manifests)} manifests, "
                         f"{len(acoustic or [])} acoustic tables; give one of each per dataset")
    corpora = [read_corpus(d["name"], st, mf, d.get("label_column", "label"), d.get("label_map"),
                           acoustic[i] if acoustic else None)
               for i, (d, st, mf) in enumerate(zip(datasets, stores, manifests))]
    table, axes, alignment = run_transfer(corpora, probe, settings, contrasts, threads=threads)
    write_tsv(table, outputs["table"])
    write_tsv(axes, outputs["axes"])
    write_tsv(alignment, outputs["labels"])
    plot_transfer(table, outputs["plot"], title=title)
    plot_axes(axes, outputs["axes_plot"], title=title)
    return table
