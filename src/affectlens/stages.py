"""One plain function per workflow rule: paths and settings in, files out.

The Snakemake scripts in workflow/scripts/ only unpack `snakemake` into these functions, so tests
call exactly what the workflow calls.
"""

from __future__ import annotations

import logging
import shutil
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from affectlens.io import atomic_path

log = logging.getLogger("affectlens")


@contextmanager
def logged(log_path: str | Path | None, threads: int = 1):
    """Send logging, warnings and progress bars (stderr) of one rule to its log file; a failure's
    traceback goes there too before the error propagates to Snakemake."""
    try:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    except ModuleNotFoundError:  # the report environment has no torch and needs none
        pass
    if log_path is None:
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as f:
        old_err, old_out = sys.stderr, sys.stdout
        sys.stderr = sys.stdout = f
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
        logging.captureWarnings(True)
        try:
            yield
        except BaseException:
            traceback.print_exc(file=f)
            raise
        finally:
            logging.getLogger().removeHandler(handler)
            sys.stderr, sys.stdout = old_err, old_out


def write_tsv(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)


# --- data ---------------------------------------------------------------------------------------
def raw(dataset: str, dataset_cfg: dict, out_dir) -> None:
    """Build or download a dataset's raw files into out_dir: the demo corpus (with a manifest.tsv of
    what is there), or a real dataset downloaded, verified and extracted (affectlens.data.sources)."""
    from affectlens.data.manifest import write_manifest

    if dataset_cfg["source"] != "demo":
        from affectlens.data.sources import fetch

        fetch(out_dir, dataset, dataset_cfg)
        log.info("fetched %s (%s) into %s", dataset, dataset_cfg["source"], out_dir)
        return
    from affectlens.data.demo import DEFAULT_SENTENCES, build_demo_corpus

    d = dataset_cfg.get("demo", {})
    manifest = build_demo_corpus(out_dir, speakers=d["speakers"], emotions=d["emotions"],
                                 sentences=list(DEFAULT_SENTENCES[: d["n_sentences"]]), seed=d["seed"], dataset=dataset)
    write_manifest(manifest, Path(out_dir) / "manifest.tsv")
    log.info("built %d clips of %s into %s", len(manifest), dataset, out_dir)


def manifest(raw_dir, dataset: str, dataset_cfg: dict, out_manifest, out_rejected) -> None:
    """The dataset's manifest, validated; annotations without a clip and clips that are missing,
    unreadable, empty, silent, mis-cut or out of the duration range are left out, each with its
    reason in out_rejected."""
    from affectlens.data.checks import check_clips
    from affectlens.data.manifest import read_manifest, validate_manifest, write_manifest, write_rejections
    from affectlens.data.sources import VIDEO_SOURCES, build

    source = dataset_cfg["source"]
    if source == "demo":
        m, rejections = read_manifest(Path(raw_dir) / "manifest.tsv"), []
    else:
        m, rejections = build(raw_dir, dataset, dataset_cfg)
        if m.empty:
            write_rejections(rejections, out_rejected)
            raise ValueError(f"dataset {dataset!r}: no annotated clip found in {raw_dir}; the reasons are in "
                             f"{out_rejected}")
        m = validate_manifest(m, source=f"{source} manifest of dataset {dataset!r} (from {raw_dir})")
    label_column = dataset_cfg["label_column"]
    if label_column not in m.columns:
        raise ValueError(f"datasets.{dataset}.label_column = {label_column!r} is not a manifest column "
                         f"({list(m.columns)})")
    kept, bad = check_clips(m, mode=dataset_cfg.get("clip_check", "decode"),
                            media="video" if source in VIDEO_SOURCES else "audio",
                            min_duration=dataset_cfg.get("min_duration", 0.2),
                            max_duration=dataset_cfg.get("max_duration", 30.0),
                            max_mismatch=dataset_cfg.get("max_duration_mismatch"),
                            jobs=dataset_cfg.get("check_jobs", 1))
    write_rejections(rejections + bad, out_rejected)
    if kept.empty:
        raise ValueError(f"dataset {dataset!r}: none of {len(m)} clips is usable; the reasons are in {out_rejected}")
    write_manifest(kept, out_manifest)
    log.info("%s: %d clips, %d left out (see %s)", dataset, len(kept), len(rejections) + len(bad), out_rejected)


def decode(manifest_path, dataset_cfg: dict, out_audio, out_frames, out_manifest, out_rejected,
           threads: int = 1) -> None:
    """Decode every clip's audio to 16 kHz mono FLAC and, for datasets with video, sample frames
    at the configured rate into one .npz per clip; clips that fail are rejected with a reason."""
    from affectlens.data.decode import decode_manifest
    from affectlens.data.manifest import read_manifest, write_manifest, write_rejections
    from affectlens.data.sources import VIDEO_SOURCES
    from affectlens.data.video import decode_frames

    m = read_manifest(manifest_path)
    source, rejected = dataset_cfg["source"], []
    Path(out_audio).mkdir(parents=True, exist_ok=True)
    Path(out_frames).mkdir(parents=True, exist_ok=True)
    if source in VIDEO_SOURCES or source == "meld":
        m, bad = decode_frames(m, out_frames, n_jobs=threads, **dataset_cfg["video"])
        rejected += bad
    if source not in VIDEO_SOURCES:  # video QA clips need not carry audio
        m, bad = decode_manifest(m, out_audio, min_duration=dataset_cfg.get("min_duration", 0.2),
                                 max_duration=dataset_cfg.get("max_duration", 30.0), n_jobs=threads)
        rejected += bad
    write_rejections(rejected, out_rejected)
    write_manifest(m, out_manifest)
    log.info("decoded %d clips, rejected %d", len(m), len(rejected))


# --- extract ------------------------------------------------------------------------------------
def load_adapter(model_cfg: dict):
    from affectlens.models import load_adapter as _load

    return _load(model_cfg["family"], model_cfg["source"], device=model_cfg.get("device", "cpu"),
                 dtype=model_cfg.get("dtype", "float32"), revision=model_cfg.get("revision"))


def extract(manifest_path, model_cfg: dict, out_store, shard: str | None = None, shard_stores=()) -> None:
    """Every configured site over the manifest's clips into one store. With `shard` ("i-of-n",
    0-based) only that slice of clips; with `shard_stores` nothing is run: the shards are merged
    (refusing gaps, overlaps and shards made with other settings) and the merge is verified."""
    from affectlens.data.decode import decode_clip
    from affectlens.data.manifest import read_manifest
    from affectlens.extract import clip_loader, extract_store, shard_range
    from affectlens.models import load_adapter as _load
    from affectlens.store import merge_stores

    if shard_stores:
        merge_stores(list(shard_stores), out_store, require_all=True)
        log.info("merged %d shards into %s", len(shard_stores), out_store)
        return
    manifest = read_manifest(manifest_path)
    clip_range = None
    if shard is not None:
        i, n = (int(x) for x in str(shard).split("-of-"))
        clip_range = shard_range(len(manifest), i, n)
    adapter = _load(model_cfg["family"], model_cfg["source"], device=model_cfg.get("device", "auto"),
                    dtype=model_cfg.get("dtype", "float32"), revision=model_cfg.get("revision"),
                    device_map=model_cfg.get("device_map"),
                    towers=list(dict.fromkeys(site.split(".", 1)[0] for site in model_cfg["sites"])), options=model_cfg)
    log.info("extracting clips %s of %d with %s (revision %s) on %s", clip_range or "all", len(manifest),
             adapter.model_id, adapter.revision, adapter.device)
    load_clip = clip_loader(adapter, decode_clip, text_column=model_cfg.get("text_column", "text"),
                            prompt=model_cfg.get("prompt"))
    extract_store(manifest, adapter, model_cfg["sites"], out_store, load_clip=load_clip,
                  batch_size=model_cfg.get("batch_size", 8), chunk_clips=model_cfg.get("chunk_clips", 64),
                  storage_dtype=model_cfg.get("storage_dtype", "float16"), config=model_cfg, clip_range=clip_range)


# --- patch --------------------------------------------------------------------------------------
def patch(store_path, manifest_path, model_cfg: dict, contrast: dict, params: dict, label_column: str,
          out_pairs, out_effects, out_summary, out_agreement=None) -> None:
    """Exact patching (and, with `attribution`, its gradient estimate on the same grid) of every
    stored site × time window for one contrast. The corrupt run comes from `corruption`: the
    paired clip (`pairs`), the clean clip with embedding noise (`noise`) or the clean clip with its
    prosody neutralised (`prosody_neutral`)."""
    from tqdm import tqdm

    from affectlens.data.decode import decode_clip
    from affectlens.data.manifest import read_manifest
    from affectlens.patching.attribution import agreement, attribute_pair
    from affectlens.patching.counterfactuals import corpus_std, embedding_noise, prosody_neutral, speaking_rate
    from affectlens.patching.pairs import draw_over_speakers, make_pairs, self_pairs
    from affectlens.patching.patch import ProbeLogitDiff, patch_pair, summarise, time_windows
    from affectlens.probes.sweep import fit_readout
    from affectlens.store import Store

    corruption = params.get("corruption", "pairs")
    manifest = read_manifest(manifest_path)
    adapter = load_adapter(model_cfg)
    embed = f"{next(iter(adapter.n_blocks))}.embed"
    noise_sigma = np.nan
    with Store(store_path) as store:
        # a prompt forward never reaches towers read from a generation run (Qwen-Omni's Talker)
        generated = set(getattr(adapter, "generated_towers", ()))
        sites = [s for s in store.sites if s.split(".", 1)[0] not in generated]
        if len(sites) < len(store.sites):
            log.info("patching skips %s: read while speech is generated, not by the prompt forward",
                     sorted(set(store.sites) - set(sites)))
        readout_site = model_cfg.get("readout_site") or sites[-1]
        probe = fit_readout(store, manifest, readout_site, label_column=label_column)
        if corruption == "noise":
            if embed not in sites:
                raise ValueError(f"patch.corruption: noise scales the noise by the corpus std of {embed}, which "
                                 f"{store_path} lacks: add {embed!r} to the model's `sites`")
            noise_sigma = params.get("noise_factor", 3.0) * corpus_std(store.frame_chunks(embed))
    weight, bias, classes = probe.readout()
    metric = ProbeLogitDiff.from_readout(readout_site, weight, bias, classes, contrast["source"], contrast["target"])
    if corruption == "pairs":
        pairs = make_pairs(manifest, contrast["source"], contrast["target"], params["n_pairs"], params["seed"],
                           label_column=label_column)
    else:
        pairs = self_pairs(manifest, contrast["target"], params["n_pairs"], params["seed"], label_column=label_column)
    described = {"pairs": f"paired {contrast['source']} clip (same pair_key)",
                 "noise": f"N(0, sigma = {params.get('noise_factor', 3.0):g} x corpus std of {embed} = {noise_sigma:.4g}) "
                          f"on {embed}",
                 "prosody_neutral": "the clip with rate equalised, pitch and energy flattened"}[corruption]
    log.info("corruption: %s", described)
    pairs = pairs.assign(corruption=corruption, noise_sigma=noise_sigma)
    by_id = manifest.set_index("clip_id")
    reference_rate = None
    if corruption == "prosody_neutral":
        # The corpus's typical speaking rate, from a speaker-spread draw over all labels.
        sample = draw_over_speakers(manifest, params.get("rate_reference_clips", 32), params["seed"])
        reference_rate = float(np.median([speaking_rate(decode_clip(p), adapter.sample_rate) for p in sample["path"]]))
        log.info("prosody_neutral: reference speaking rate %.2f onsets/s over %d clips", reference_rate, len(sample))
        pairs = pairs.assign(reference_rate=reference_rate)
    write_tsv(pairs, out_pairs)
    size = int(round(params["window_s"] * adapter.frame_rate))
    stride = max(1, int(round(params["stride_s"] * adapter.frame_rate)))
    max_batch = params.get("max_batch", 16)
    effects = []
    for pair in tqdm(pairs.itertuples(), total=len(pairs), desc="patch pairs", unit="pair"):
        clean_wave = decode_clip(by_id.loc[pair.clean_clip, "path"])
        corrupt_wave = clean_wave if corruption != "pairs" else decode_clip(by_id.loc[pair.corrupt_clip, "path"])
        if corruption == "prosody_neutral":
            corrupt_wave = prosody_neutral(clean_wave, adapter.sample_rate, reference_rate)
        clean, corrupt = adapter.prepare([clean_wave]), adapter.prepare([corrupt_wave])
        noise = ({embed: embedding_noise(noise_sigma, corrupt.n_frames, seed=params["seed"])}
                 if corruption == "noise" else None)
        windows = time_windows(max(clean.n_frames[0], corrupt.n_frames[0]), size, stride)
        df = patch_pair(adapter, clean, corrupt, sites, windows, metric, max_batch, corrupt_interventions=noise)
        if params.get("attribution", True):
            df = pd.concat([df, attribute_pair(adapter, clean, corrupt, sites, windows, metric, noise)],
                           ignore_index=True)
        df.insert(0, "pair_id", pair.pair_id)
        effects.append(df)
    effects = pd.concat(effects, ignore_index=True)
    write_tsv(effects, out_effects)
    summary = summarise(effects, seed=params["seed"]).assign(corruption=corruption, noise_sigma=noise_sigma)
    write_tsv(summary, out_summary)
    if out_agreement is not None:
        agree = agreement(summary, effects)
        if agree.empty:
            agree = pd.DataFrame(columns=["direction", "n_cells", "spearman", "top_exact", "top_attribution",
                                          "top_agree", "max_abs_diff", "median_pair_spearman"])
        for r in agree.itertuples():
            log.info("attribution vs exact, %s: Spearman %.3f, top cell %s (exact %s, attribution %s)",
                     r.direction, r.spearman, "agrees" if r.top_agree else "differs", r.top_exact, r.top_attribution)
        write_tsv(agree, out_agreement)


def heatmaps(summaries: dict[str, list[str]], out_dir) -> None:
    """Render every patch summary of every study into out_dir/{study}/ (a PNG and the TSV of its
    numbers per method: exact, and attribution beside it where it was run) with an index page."""
    from affectlens.viz.heatmap import color_limit, methods_of, plot_patch_heatmap, write_index

    out_dir = Path(out_dir)
    entries = []
    for study, paths in summaries.items():
        for p in paths:
            # results/patch/{dataset}/{model}/{contrast}/summary.tsv
            dataset, model, contrast = Path(p).parts[-4:-1]
            name = f"{dataset}__{model}__{contrast}"
            summary = pd.read_csv(p, sep="\t")
            corruption = summary["corruption"].iloc[0] if "corruption" in summary else "pairs"
            how = {"pairs": "paired clips", "noise": f"embedding noise, sigma {summary['noise_sigma'].iloc[0]:.3g}"
                   if "noise_sigma" in summary else "embedding noise",
                   "prosody_neutral": "prosody-neutralised clips"}.get(corruption, corruption)
            n = int(summary["n_pairs"].max())
            title = f"{study}: {dataset} × {model}, {contrast.replace('-to-', ' → ')} (n = {n} pairs; corrupt: {how})"
            vmax = color_limit(summary)  # one scale for exact and attribution, so colours compare
            maps = []
            for method in methods_of(summary):
                stem = name if method == "exact" else f"{name}__{method}"
                rows = summary if "method" not in summary else summary[summary["method"] == method]
                plot_patch_heatmap(summary, out_dir / study / f"{stem}.png", title, method=method, vmax=vmax)
                write_tsv(rows, out_dir / study / f"{stem}.tsv")
                maps.append({"label": {"exact": "exact patching",
                                       "attribution": "attribution patching (gradient estimate)"}.get(method, method),
                             "png": f"{study}/{stem}.png", "tsv": f"{study}/{stem}.tsv"})
            note = ""
            agreement_tsv = Path(p).with_name("agreement.tsv")
            if agreement_tsv.exists() and agreement_tsv.stat().st_size > 0:
                agree = pd.read_csv(agreement_tsv, sep="\t")
                note = "; ".join(f"attribution vs exact, {r.direction}: Spearman {r.spearman:.2f}, top cell "
                                 f"{'agrees' if r.top_agree else f'differs ({r.top_attribution} vs {r.top_exact})'}"
                                 for r in agree.itertuples())
            entries.append({"study": study, "title": title, "png": maps[0]["png"], "tsv": maps[0]["tsv"],
                            "maps": maps, "note": note})
    write_index(entries, out_dir / "index.html")


# --- probe --------------------------------------------------------------------------------------
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


# --- sae ----------------------------------------------------------------------------------------
def sae(store_path, manifest_path, site: str, params: dict, label_column: str, out_dir,
        model_cfg: dict | None = None, checkpoint=None) -> None:
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
    from affectlens.sae.registry import ARCHITECTURES, load_sae
    from affectlens.sae.train import train_sae
    from affectlens.store import Store
    from affectlens.viz.dashboard import write_dashboard

    arch = params["architecture"]
    config_cls = ARCHITECTURES[arch][0]
    specific = {"topk": ["k"], "batchtopk": ["k"], "relu": ["l1_coef"], "jumprelu": ["l0_coef"]}[arch]
    out_dir = Path(out_dir)
    manifest = read_manifest(manifest_path)
    with Store(store_path) as store:
        cfg = config_cls.from_dict({
            "d_in": store.dim(site), "expansion": params["expansion"], "n_samples": params["n_samples"],
            "batch_size": params["batch_size"], "lr": params["lr"], "seed": params["seed"],
            # A latent is dead if it has not fired for a quarter of training (at least one batch).
            "dead_tokens": max(params["batch_size"], params["n_samples"] // 4),
            **{key: params[key] for key in specific},
        })
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
        top = peak_frames(model, store, site, top_activating(clips.acts, store.clip_ids, n=params["top_clips"]))
        write_tsv(top, out_dir / "top_clips.tsv")

        groups = manifest["speaker"].astype(str).to_numpy() if "speaker" in manifest else None
        if groups is not None and len(set(groups)) < 2:
            groups = None
        probes = []
        for label in sorted(set(labels)):
            if (labels == label).all():
                continue
            t = sparse_probe(clips.acts[rows], labels == label, groups=groups, ks=params["sparse_probe_k"],
                             seed=params["seed"])
            probes.append(t.assign(label=label))
        if probes:
            write_tsv(pd.concat(probes, ignore_index=True), out_dir / "sparse_probe.tsv")

        # -- downstream fidelity --------------------------------------------------------------
        fidelity = None
        if model_cfg is not None and params["fidelity_clips"] > 0:
            fidelity = _sae_fidelity(store, manifest, rows, labels, site, model, model_cfg, params)
            write_tsv(fidelity, out_dir / "fidelity.tsv")

    audio = dict(zip(manifest["clip_id"].astype(str), manifest["path"].astype(str)))
    write_dashboard(out_dir / "dashboard.html", site, stats, top, audio, clip_acts=clips.acts,
                    clip_labels=dict(zip(manifest["clip_id"].astype(str), labels)), metrics=metrics,
                    fidelity=fidelity, n_features=params["dashboard_features"],
                    title=f"SAE features at {site} ({arch}, {cfg.n_latents} latents)")
    write_json(out_dir / "metrics.json", metrics)  # last, and atomically: the folder is complete


def _sae_fidelity(store, manifest, rows, labels, site, sae_model, model_cfg, params):
    """Splice the SAE into the model on the last `fidelity_clips` manifest clips (the SAE's
    held-out end of the store), judged by probes fit on the other clips at every later stored site."""
    from affectlens.data.decode import decode_clip
    from affectlens.models.sites import parse_site
    from affectlens.probes.linear import LinearProbe
    from affectlens.sae.fidelity import output_head_for, splice_fidelity

    order = np.argsort(rows)  # manifest rows in store order; the held-out clips come last
    test = order[-params["fidelity_clips"]:]
    train = order[:-params["fidelity_clips"]]
    here = parse_site(site)
    later = [s for s in store.sites if parse_site(s).tower == here.tower and parse_site(s).depth > here.depth]
    readouts = {}
    for s in later:
        if len(set(labels[train])) >= 2:
            readouts[s] = LinearProbe(C=1.0, class_weight="balanced").fit(store.pooled(s)[rows[train]], labels[train])
    adapter = load_adapter(model_cfg)
    waves = [decode_clip(p, sr=adapter.sample_rate) for p in manifest["path"].to_numpy()[test]]
    table = splice_fidelity(adapter, sae_model, site, waves, labels[test], readouts, output_head_for(adapter))
    log.info("SAE %s fidelity:\n%s", site, table.to_string())
    return table


# --- steer --------------------------------------------------------------------------------------
def steered_wav_name(clip_id: str, method: str, alpha: float) -> str:
    """audio/ file of a steered clip: {clip}__alpha{a}.wav for the difference of means (the
    vector the CLI reuses), {clip}__m-{method}__alpha{a}.wav for the other methods."""
    middle = "" if method == "diff_of_means" else f"__m-{method}"
    return f"{clip_id}{middle}__alpha{alpha:g}.wav"


def steer(store_path, manifest_path, model_cfg: dict, contrast: dict, params: dict, label_column: str,
          out_dir, threads: int = 1, sae_dir=None) -> None:
    """Steer held-out speakers' `source` clips towards `target` at the model's steer site with each
    of `params["methods"]`, invert the steered activations to audio, and judge the audio with judges
    that never saw those speakers.

    For each held-out speaker, everything learned (each method's vector or SAE feature edits, the
    activation -> mel mapper, the model-probe judge and the acoustic judge) is fit on the other
    speakers only (the SAE in `sae_dir`, for method sae, is unsupervised and trained on the store).
    alpha = 0 goes through the same inversion path, so changes are read against it. A generative
    music model (MusicGen) is steered during generation instead: `steer_music`."""
    if model_cfg["family"] == "musicgen":
        return steer_music(store_path, manifest_path, model_cfg, contrast, params, label_column, out_dir)
    from tqdm import tqdm

    from affectlens.data.decode import decode_clip
    from affectlens.data.manifest import read_manifest
    from affectlens.probes.linear import LinearProbe
    from affectlens.probes.sweep import align_manifest
    from affectlens.steering.evaluate import AcousticJudge, acoustic_feature_matrix, prosody
    from affectlens.steering.inversion import MelMapper, invert, round_trip_quality
    from affectlens.steering.methods import fit_steerer
    from affectlens.steering.vectors import diff_of_means
    from affectlens.steering.vocoder import load_vocoder
    from affectlens.steering.watermark import load_any, write_steered_audio
    from affectlens.store import Store
    try:
        from affectlens.steering.speaker import _encoder, speaker_similarity

        _encoder()
    except ImportError as e:
        log.warning("no speaker_similarity column (NaN): %s", e)
        speaker_similarity = None
    from affectlens.viz.steering import plot_dose_response

    src, tgt = contrast["source"], contrast["target"]
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(manifest_path)
    adapter = load_adapter(model_cfg)
    asr = load_adapter({"family": "whisper", "source": params["asr_source"]})
    site = model_cfg["steer_site"]
    with Store(store_path) as store:
        readout_site = model_cfg.get("readout_site") or store.sites[-1]
        rows = align_manifest(store.clip_ids, manifest, [label_column, "speaker"], where=str(store.path))
        X_site = store.pooled(site)[rows]
        X_read = store.pooled(readout_site)[rows]
        frames = [store.clip_frames(site, r) for r in rows]
    labels = manifest[label_column].astype(str).to_numpy()
    speakers = manifest["speaker"].astype(str).to_numpy()
    methods = list(params["methods"])
    pair_keys = manifest["pair_key"].astype(str).to_numpy() if "pair_key" in manifest.columns else None
    if "pca" in methods and pair_keys is None:
        log.warning("method pca left out: the manifest has no pair_key column to pair clips across emotions")
        methods.remove("pca")
    sae = latents = None
    if "sae" in methods:
        sae, latents = _steer_sae(sae_dir, site, frames)
    sr = adapter.sample_rate
    waves = [decode_clip(p, sr=sr) for p in manifest["path"]]
    # residual filtering needs no vocoder; direct and vocoded inversion train the mapper in its mel format
    vocoder = (None if params["inversion"] == "residual"
               else load_vocoder(params["vocoder"], n_iter=params["griffin_lim_iter"], seed=params["seed"]))

    def new_mapper() -> MelMapper:
        if vocoder is None:
            return MelMapper(seed=params["seed"])
        return MelMapper.for_vocoder(vocoder, adapter.frame_rate, seed=params["seed"])

    # Computed once for all held-out speakers: mel targets of the mapper, features of the judge.
    mel_targets = new_mapper().targets(frames, waves, sr=sr)
    acoustic = acoustic_feature_matrix(waves, sr, n_jobs=threads)
    chosen = choose_clips(manifest, label_column, src, params["n_clips"], params["seed"])

    records, quality, fitted = [], [], {}
    for i in tqdm(chosen, desc=f"steer {src}->{tgt}", unit="clip"):
        spk = speakers[i]
        if spk not in fitted:
            others = np.flatnonzero(speakers != spk)
            pair = others[np.isin(labels[others], [src, tgt])]
            fitted[spk] = {
                "steerers": {m: fit_steerer(m, X_site[others], labels[others], speakers[others], src, tgt,
                                            pair_keys=None if pair_keys is None else pair_keys[others], sae=sae,
                                            latents=None if latents is None else latents[others],
                                            k_features=params["sae_features"])
                             for m in methods},
                "mapper": new_mapper().fit_targets([frames[j] for j in others], [mel_targets[j] for j in others]),
                "probe": LinearProbe().fit(X_read[pair], labels[pair]),
                "acoustic": AcousticJudge().fit_features(acoustic[pair], labels[pair]),
            }
        f = fitted[spk]
        clip_id = manifest["clip_id"].iloc[i]
        batch = adapter.prepare([waves[i]])
        n = batch.n_frames[0]
        _, cache = adapter.run(batch, capture=[site])
        unsteered = cache[site][0, :n].float().cpu().numpy()
        quality.append({"clip_id": clip_id, "speaker": spk, "vocoder": vocoder.name if vocoder else "none",
                        **round_trip_quality(f["mapper"], unsteered, waves[i], vocoder=vocoder, sr=sr)})
        outputs = {("none", "original"): waves[i]}
        mark_db = {("none", "original"): np.nan}
        zero = None  # (method, path) of the first alpha = 0 file: the unsteered path, the same for every method
        for method, steerer in f["steerers"].items():
            for alpha in params["alphas"]:
                key, path = (method, f"{alpha:g}"), out_dir / "audio" / steered_wav_name(clip_id, method, alpha)
                if alpha == 0 and zero is not None:  # every method's alpha = 0 leaves the activations as they are
                    shutil.copyfile(zero[1], path)
                    mark_db[key], outputs[key] = mark_db[zero[0], key[1]], outputs[zero[0], key[1]]
                    continue
                _, cache = adapter.run(batch, capture=[site], interventions={site: steerer(alpha)})
                steered = cache[site][0, :n].float().cpu().numpy()
                wave = invert(f["mapper"], unsteered, steered, waves[i], mode=params["inversion"], vocoder=vocoder,
                              sr=sr)
                # every steered file carries the research label and the watermark; the judges below hear it too
                mark_db[key] = write_steered_audio(path, wave, sr, key=params.get("watermark_key", "affectlens"),
                                                   snr_db=params.get("watermark_snr_db", "auto"))
                outputs[key] = load_any(path)[0]
                if alpha == 0:
                    zero = (method, path)
        # the words said: the dataset's own text where it has one (RAVDESS, CREMA-D, the demo), else
        # the ASR's transcript of the original (which can itself be wrong: a loop, a hallucination)
        text = manifest["text"].iloc[i] if "text" in manifest.columns else None
        has_text = isinstance(text, str) and text.strip() != ""
        reference = text.strip() if has_text else transcribe(asr, waves[i])
        judged = {}  # id(wave) -> the judges' numbers: the alpha = 0 files of all methods are one wave
        for (method, kind), wave in outputs.items():
            if id(wave) not in judged:
                _, cache = adapter.run(adapter.prepare([wave]), capture=[readout_site])
                pooled = cache[readout_site][0, :adapter.frames_for(len(wave))].float().mean(0).cpu().numpy()[None]
                p_model = f["probe"].predict_proba(pooled)[0, list(f["probe"].classes_).index(tgt)]
                p_acoustic = f["acoustic"].predict_proba([wave])[0, list(f["acoustic"].classes_).index(tgt)]
                transcript = transcribe(asr, wave)
                judged[id(wave)] = {
                    "p_target_model_probe": float(p_model), "p_target_acoustic": float(p_acoustic),
                    **prosody(wave, sr),
                    "wer_vs_original": word_error_rate(reference, transcript),
                    # resemblyzer cosine to the original: was the voice kept?
                    "speaker_similarity": speaker_similarity(waves[i], wave, sr) if speaker_similarity else np.nan,
                }, transcript
            numbers, transcript = judged[id(wave)]
            records.append({
                "clip_id": clip_id, "speaker": spk, "method": method, "output": kind,
                "alpha": np.nan if kind == "original" else float(kind),
                **numbers,
                "watermark_snr_db": mark_db[method, kind],  # the level this file's watermark was embedded at
                "transcript": transcript, "reference": reference,
                "reference_source": "text" if has_text else "asr",
            })
    # For `affectlens steer --vector out_dir/vector.npy --mapper out_dir/mapper`: fit on every speaker.
    from affectlens.io import write_json

    with atomic_path(out_dir / "vector.npy") as tmp:
        np.save(tmp, diff_of_means(X_site, labels, speakers, src, tgt))
    new_mapper().fit_targets(frames, mel_targets).save(out_dir / "mapper")
    write_json(out_dir / "vector.json", {"site": site, "model": adapter.model_id, "source": src, "target": tgt,
                                         "method": "diff_of_means", "speakers": int(len(np.unique(speakers))),
                                         "inversion": params["inversion"],
                                         "vocoder": vocoder.name if vocoder else "none", "methods": methods,
                                         "note": "vector.npy is the diff_of_means vector, fit on every speaker"})
    table = pd.DataFrame(records)
    write_tsv(table, out_dir / "evaluation.tsv")
    write_tsv(pd.DataFrame(quality), out_dir / "inversion_quality.tsv")
    summary = summarise_steering(table)
    write_tsv(summary, out_dir / "summary.tsv")
    plot_dose_response(summary, out_dir / "dose_response.png",
                       title=f"{adapter.model_id} at {site}: {src} → {tgt} ({params['inversion']} inversion"
                             + (f", {vocoder.name})" if vocoder else ")"))


def steer_music(store_path, manifest_path, model_cfg: dict, contrast: dict, params: dict, label_column: str,
                out_dir) -> None:
    """MusicGen: the per-artist difference of means of the steer site's pooled activations (teacher-
    forced real clips, source -> target label) added at every step of generating from
    `music_prompts`, per alpha; every piece is written (watermarked) and judged by an independent
    mood regressor and acoustic measures (steering.music)."""
    from affectlens.data.manifest import read_manifest
    from affectlens.io import write_json
    from affectlens.probes.sweep import align_manifest
    from affectlens.steering.music import evaluate_music, generate_steered, summarise_music
    from affectlens.steering.vectors import diff_of_means
    from affectlens.steering.watermark import write_steered_audio
    from affectlens.store import Store
    from affectlens.viz.steering import plot_music_dose_response

    src, tgt = contrast["source"], contrast["target"]
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(manifest_path)
    site = model_cfg["steer_site"]
    with Store(store_path) as store:
        rows = align_manifest(store.clip_ids, manifest, [label_column, "speaker"], where=str(store.path))
        X = store.pooled(site)[rows]
    labels = manifest[label_column].astype(str).to_numpy()
    groups = manifest["speaker"].astype(str).to_numpy()
    vector = diff_of_means(X, labels, groups, src, tgt)
    log.info("vector %s -> %s at %s: norm %.4g over %d groups", src, tgt, site, np.linalg.norm(vector),
             len(np.unique(groups[np.isin(labels, [src, tgt])])))
    adapter = load_adapter(model_cfg)
    prompts = list(params["music_prompts"])
    outputs = generate_steered(adapter, prompts, site, vector, params["alphas"], params["music_seconds"],
                               seed=params["seed"], guidance_scale=params["music_guidance_scale"])
    sr = adapter.codec_sr
    levels = {}
    for alpha, waves in outputs.items():
        for i, w in enumerate(waves):
            levels[(i, alpha)] = write_steered_audio(out_dir / "audio" / f"prompt{i}__alpha{alpha:g}.wav", w, sr,
                                                     key=params.get("watermark_key", "affectlens"),
                                                     snr_db=params.get("watermark_snr_db", "auto"))
    table = evaluate_music(outputs, sr, prompts)
    table["watermark_snr_db"] = [levels[(i, a)] for i, a in zip(table.prompt_id, table.alpha)]
    with atomic_path(out_dir / "vector.npy") as tmp:
        np.save(tmp, vector)
    write_json(out_dir / "vector.json", {"site": site, "model": adapter.model_id, "source": src, "target": tgt,
                                         "method": "diff_of_means", "groups": "speaker (artist or song)"})
    write_tsv(table, out_dir / "evaluation.tsv")
    summary = summarise_music(table)
    write_tsv(summary, out_dir / "summary.tsv")
    plot_music_dose_response(summary, out_dir / "dose_response.png",
                             title=f"{adapter.model_id} at {site}: {src} → {tgt} ({len(prompts)} prompts)")


def transcribe(asr, wave: np.ndarray) -> str:
    from affectlens.models.whisper import transcribe as whisper_transcribe

    return whisper_transcribe(asr.model, asr.feature_extractor, asr.tokenizer, [wave])[0]


def choose_clips(manifest: pd.DataFrame, label_column: str, label: str, n: int, seed: int) -> list[int]:
    """Row indices of `n` clips with `label`, round-robin over speakers (one per speaker first)."""
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(manifest[label_column].astype(str).to_numpy() == label)
    if len(idx) == 0:
        raise ValueError(f"no clip has {label_column} = {label!r}: nothing to steer")
    order = rng.permutation(idx)
    spk = manifest["speaker"].astype(str).to_numpy()[order]
    rank = pd.Series(spk).groupby(spk).cumcount().to_numpy()
    return order[np.lexsort((np.arange(len(order)), rank))][:n].tolist()


def word_error_rate(reference: str, hypothesis: str) -> float:
    import re

    import jiwer

    norm = lambda s: re.sub(r"[^a-z' ]+", " ", s.lower()).split()  # noqa: E731
    ref, hyp = norm(reference), norm(hypothesis)
    if not ref:
        return float("nan")
    return float(jiwer.wer(" ".join(ref), " ".join(hyp) if hyp else ""))


def _steer_sae(sae_dir, site: str, frames: list[np.ndarray]):
    """The SAE trained at the steer site and every clip's mean latents [clip, n_latents]."""
    from affectlens.sae.features import encode_array
    from affectlens.sae.registry import load_sae

    if sae_dir is None:
        raise ValueError(f"steer method sae needs an SAE at the steer site {site}: list it among the model's "
                         "sae_sites (the workflow then trains it first)")
    sae = load_sae(sae_dir)
    return sae, np.stack([encode_array(sae, f).mean(0) for f in frames])


def summarise_steering(table: pd.DataFrame) -> pd.DataFrame:
    """Per method and output (original, each alpha): means over clips, and changes against the
    method's lowest alpha (0), which went through the same inversion path (so inversion artefacts
    are not read as steering); the original's against the first method's."""
    cols = ["p_target_model_probe", "p_target_acoustic", "f0_mean_hz", "f0_range_st", "active_rms_db",
            "wer_vs_original", "speaker_similarity", "watermark_snr_db"]
    steered = table[table.output != "original"]
    first = steered["method"].iloc[0]
    rows = []
    for (method, kind), g in table.groupby(["method", "output"], sort=False):
        mine = steered[steered.method == (first if kind == "original" else method)]
        base = mine[mine.alpha == mine.alpha.min()].set_index("clip_id")
        row = {"method": method, "output": kind, "alpha": g["alpha"].iloc[0], "n_clips": len(g)}
        row |= {c: float(g[c].mean()) for c in cols}
        g = g.set_index("clip_id")
        row["f0_change_st"] = float(np.nanmean(12 * np.log2(g["f0_mean_hz"] / base.loc[g.index, "f0_mean_hz"])))
        row["rms_change_db"] = float((g["active_rms_db"] - base.loc[g.index, "active_rms_db"]).mean())
        rows.append(row)
    return pd.DataFrame(rows)


# --- dynamic ratings (PMEmo, DEAM) ---------------------------------------------------------------
DYNAMIC_SOURCES = ("pmemo", "deam")  # sources that publish 2 Hz valence/arousal curves


def dynamic_ratings(raw_dir, manifest_path, dataset: str, dataset_cfg: dict, out_ratings) -> None:
    """The 2 Hz valence/arousal ratings of the manifest's clips as one tidy table beside the
    manifest: clip_id, song, time_s (from the clip's start; segments re-based), valence, arousal,
    scale (the dataset's own)."""
    from affectlens.data.manifest import read_manifest
    from affectlens.data.sources import module

    source = dataset_cfg["source"]
    if source not in DYNAMIC_SOURCES:
        raise ValueError(f"dataset {dataset!r} (source {source}) has no dynamic ratings; only {DYNAMIC_SOURCES} do")
    table, missing = module(source).read_ratings(raw_dir, read_manifest(manifest_path))
    if missing:
        log.warning("%s: %d clips have no dynamic rating, e.g. %s", dataset, len(missing), missing[:5])
    if table.empty:
        raise ValueError(f"dataset {dataset!r}: none of the clips of {manifest_path} has a dynamic rating in {raw_dir}")
    write_tsv(table, out_ratings)
    log.info("%s: %d ratings of %d clips (%s scale)", dataset, len(table), table["clip_id"].nunique(),
             table["scale"].iloc[0])


def probe_dynamic(store_path, manifest_path, ratings_path, params: dict, out_table, out_predictions, out_plot,
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

    manifest = read_manifest(manifest_path)
    ratings = pd.read_csv(ratings_path, sep="\t", dtype={"clip_id": str, "song": str})
    if "speaker" not in manifest.columns:
        raise KeyError(f"{manifest_path} has no speaker column to group songs by")
    with Store(store_path) as store, threadpool_limits(max(1, int(threads))):
        sites = params.get("sites") or [s for s in store.sites if tower_of(s) == store.towers[0]]
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
                           bin_s=params["bin_s"], lag_s=params["lag_s"], where=str(store_path))
        features = None
        if params["acoustic_baseline"]:
            paths = dict(zip(manifest["clip_id"].astype(str), manifest["path"].astype(str)))
            waves = {row: decode_clip(paths[store.clip_ids[row]]) for row in bins.table["row"].unique()}
            features = acoustic_bins(waves, 16000, bins)

        def get(site):
            if site == ACOUSTIC_SITE:
                return features
            return pool_bins(store.frame_chunks(site), store.offsets_of(site), bins)

        table, predictions = dynamic_probe(get, ([ACOUSTIC_SITE] if features is not None else []) + list(sites), bins,
                                           n_splits=params["n_splits"], n_permutations=params["n_permutations"],
                                           seed=params["seed"], alphas=tuple(alphas or DEFAULT_ALPHAS))
        model_id = store.attrs.get("model_id", "model")
    scale = ", ".join(sorted(ratings["scale"].astype(str).unique())) if "scale" in ratings else ""
    table["scale"] = scale
    write_tsv(table, out_table)
    write_tsv(predictions, out_predictions)
    plot_dynamic(table, predictions, out_plot, n_songs=params["plot_songs"],
                 title=f"{model_id}: dynamic valence/arousal ({scale}) per {params['bin_s']:g} s window")
    return table


# --- trace (video question answering) --------------------------------------------------------------
TRACE_FAMILIES = ("qwen2-vl", "qwen2.5-vl")


def trace(manifest_path, dataset_cfg: dict, model_cfg: dict, params: dict, out_table, out_pairs, out_summary,
          out_heatmaps) -> pd.DataFrame:
    """Causal tracing of video QA (affectlens.patching.video): per question, the model's answer
    among the candidates, each counterfactual video, every LM site x token slice patched both
    ways. Writes the per-question table, its pairs (as the patch stage's, for the probes on patching
    outcomes), the mean over questions and one heatmap per counterfactual."""
    from tqdm import tqdm

    from affectlens.data.manifest import read_manifest
    from affectlens.patching.video import questions_from_manifest, trace_pairs, trace_question, trace_summary
    from affectlens.viz.heatmap import plot_patch_heatmap

    if dataset_cfg.get("source") != "video_qa":
        raise ValueError(f"trace: the dataset's source is {dataset_cfg.get('source')!r}; tracing reads a video_qa "
                         "dataset (questions with candidates about a video)")
    if model_cfg.get("family") not in TRACE_FAMILIES:
        raise ValueError(f"trace: model family {model_cfg.get('family')!r}; tracing runs a video-language model "
                         f"of the families {TRACE_FAMILIES}")
    questions = questions_from_manifest(read_manifest(manifest_path), params.get("n_questions"), params["seed"],
                                        where=str(manifest_path))
    adapter = load_adapter(model_cfg)
    sites = adapter.sites(params["sites"])
    log.info("tracing %d questions: counterfactuals %s, slices %s, %d sites", len(questions),
             params["counterfactuals"], params["slices"], len(sites))
    tables = [trace_question(adapter, q, params["counterfactuals"], sites, params["slices"],
                             max_batch=params["max_batch"], answer_style=params["answer_style"])
              for q in tqdm(questions, desc="trace questions", unit="question")]
    table = pd.concat(tables, ignore_index=True)
    write_tsv(table, out_table)
    write_tsv(trace_pairs(table), out_pairs)
    summary = trace_summary(table)
    write_tsv(summary, out_summary)
    out_heatmaps = Path(out_heatmaps)
    out_heatmaps.mkdir(parents=True, exist_ok=True)
    for i, (cf, part) in enumerate(summary.groupby("counterfactual", sort=False)):
        n = int(part["n_questions"].max())
        plot_patch_heatmap(part, out_heatmaps / f"{i:02d}_{cf.split(':')[0]}.png",
                           f"{adapter.model_id}: video QA tracing, counterfactual {cf} ({n} questions)",
                           xlabel="token slice")
    return table
