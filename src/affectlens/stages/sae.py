"""Stage of workflow/rules/sae.smk: train an SAE at one site and explain its features."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from affectlens.stages.common import write_tsv

from affectlens.models import build_adapter
from affectlens.models.config import ModelConfig
from affectlens.settings import SaeConfig

log = logging.getLogger("affectlens")


def sae(store_path, manifest_path, site: str, params: SaeConfig | dict, label_column: str, out_dir,
        model_cfg: ModelConfig | dict | None = None, checkpoint=None) -> None:
    """Train the site's SAE (resumable from `checkpoint`), then explain its features into out_dir:
    features.tsv (feature x label: densities, mean activation and difference, effect size, AUROC,
    rank), top_clips.tsv (each feature's top clips with the frame of peak activation),
    sparse_probe.tsv (accuracy of the top-k features per label), fidelity.tsv (reconstruction
    spliced back into the model vs zero-ablation; needs `model_cfg`) and dashboard.html."""
    from affectlens.data.manifest import read_manifest
    from affectlens.io import write_json
    from affectlens.probes.sweep import align_manifest
    from affectlens.sae.concept import sparse_probe
    from affectlens.sae.features import clip_features, feature_stats, peak_frames, top_activating
    from affectlens.sae.registry import config_from_settings, load_sae
    from affectlens.sae.train import train_sae
    from affectlens.store import Store
    from affectlens.viz.dashboard import write_dashboard

    params = SaeConfig.from_dict(params)
    out_dir = Path(out_dir)
    manifest = read_manifest(manifest_path)
    with Store(store_path) as store:
        # A latent is dead if it has not fired for a quarter of training (at least one batch).
        cfg = config_from_settings(params.architecture, dataclasses.asdict(params), d_in=store.dim(site),
                                   dead_tokens=max(params.batch_size, params.n_samples // 4))
        metrics = train_sae(store, site, cfg, out_dir, checkpoint=checkpoint)
        log.info("SAE %s: %s", site, metrics)
        model = load_sae(out_dir)

        # -- explaining features ------------------------------------------------------------
        clips = clip_features(model, store, site, reduce="mean")
        manifest = manifest[manifest[label_column].notna() & (manifest[label_column].astype(str) != "")]
        manifest = manifest.reset_index(drop=True)  # unlabelled clips explain nothing
        rows = align_manifest(store.clip_ids, manifest, [label_column], where=str(store.path))
        labels = manifest[label_column].astype(str).to_numpy()
        stats = feature_stats(clips.acts[rows], labels, frame_density=clips.frame_density)
        stats["rank"] = (stats.groupby("label")["effect_size"].rank(ascending=False, method="first") - 1).astype(int)
        write_tsv(stats, out_dir / "features.tsv")
        top = peak_frames(model, store, site, top_activating(clips.acts, store.clip_ids, n=params.top_clips))
        write_tsv(top, out_dir / "top_clips.tsv")

        groups = manifest["speaker"].astype(str).to_numpy() if "speaker" in manifest else None
        if groups is not None and len(set(groups)) < 2:
            groups = None
        probes = []
        for label in sorted(set(labels)):
            if (labels == label).all():
                continue
            t = sparse_probe(clips.acts[rows], labels == label, groups=groups, ks=params.sparse_probe_k,
                             seed=params.seed)
            probes.append(t.assign(label=label))
        if probes:
            write_tsv(pd.concat(probes, ignore_index=True), out_dir / "sparse_probe.tsv")

        # -- downstream fidelity --------------------------------------------------------------
        fidelity = None
        if model_cfg is not None and params.fidelity_clips > 0:
            fidelity = _sae_fidelity(store, manifest, rows, labels, site, model, model_cfg, params)
            write_tsv(fidelity, out_dir / "fidelity.tsv")

    audio = dict(zip(manifest["clip_id"].astype(str), manifest["path"].astype(str)))
    write_dashboard(out_dir / "dashboard.html", site, stats, top, audio, clip_acts=clips.acts,
                    clip_labels=dict(zip(manifest["clip_id"].astype(str), labels)), metrics=metrics,
                    fidelity=fidelity, n_features=params.dashboard_features,
                    title=f"SAE features at {site} ({params.architecture}, {cfg.n_latents} latents)")
    write_json(out_dir / "metrics.json", metrics)  # last, and atomically: the folder is complete


def _sae_fidelity(store, manifest, rows, labels, site, sae_model, model_cfg, params):
    """Splice the SAE into the model on the last `fidelity_clips` manifest clips (the SAE's
    held-out end of the store), judged by probes fit on the other clips at every later stored site."""
    from affectlens.data.decode import decode_clip
    from affectlens.models.sites import parse_site
    from affectlens.probes.linear import LinearProbe
    from affectlens.sae.fidelity import output_head_for, splice_fidelity

    order = np.argsort(rows)  # manifest rows in store order; the held-out clips come last
    test = order[-params.fidelity_clips:]
    train = order[:-params.fidelity_clips]
    here = parse_site(site)
    later = [s for s in store.sites if parse_site(s).tower == here.tower and parse_site(s).depth > here.depth]
    readouts = {}
    for s in later:
        if len(set(labels[train])) >= 2:
            readouts[s] = LinearProbe(C=1.0, class_weight="balanced").fit(store.pooled(s)[rows[train]], labels[train])
    adapter = build_adapter(model_cfg)
    waves = [decode_clip(p, sr=adapter.sample_rate) for p in manifest["path"].to_numpy()[test]]
    table = splice_fidelity(adapter, sae_model, site, waves, labels[test], readouts, output_head_for(adapter))
    log.info("SAE %s fidelity:\n%s", site, table.to_string())
    return table
