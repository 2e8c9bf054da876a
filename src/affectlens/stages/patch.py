"""Stages of workflow/rules/patch.smk: patch, heatmaps, trace."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from affectlens.naming import heatmap_stem
from affectlens.stages.common import write_tsv

from affectlens.models import build_adapter
from affectlens.models.config import ModelConfig
from affectlens.models.sites import parse_site
from affectlens.models.config import readout_site as pick_readout
from affectlens.settings import PatchConfig, SettingsError, TraceConfig

log = logging.getLogger("affectlens")


def patch(store_path, manifest_path, model_cfg: ModelConfig | dict, contrast: dict, params: PatchConfig | dict,
          label_column: str,
          out_pairs, out_effects, out_summary, out_agreement=None, out_heads=None, out_heads_summary=None) -> None:
    """Exact patching (and, with `attribution`, its gradient estimate on the same grid) of every
    stored site × time window for one contrast; with `exact: top_k`, exact patching runs only on
    each pair's `top_k` cells per direction by attribution effect. The corrupt run comes from the
    strategy named by `corruption` (affectlens.patching.corruptions): the paired clip (`pairs`),
    the clean clip with embedding noise (`noise`) or the clean clip with its prosody neutralised
    (`prosody_neutral`). Stored attn_heads sites are patched head by head instead
    (affectlens.patching.heads; `patch.heads` says over which spans) into `out_heads` and
    `out_heads_summary` (tables without rows when there are none): the whole attn_heads site
    patched at once is the block's attn_out patch."""
    from tqdm import tqdm

    from affectlens.data.decode import decode_clip
    from affectlens.data.manifest import read_manifest
    from affectlens.patching.attribution import agreement, attribute_pair
    from affectlens.patching.corruptions import CorruptionContext, corruption_strategy
    from affectlens.patching.heads import HEAD_KEYS, attribute_heads_pair, patch_heads_pair, summarise_heads
    from affectlens.patching.patch import ProbeLogitDiff, patch_pair, summarise, time_windows, top_cells
    from affectlens.probes.sweep import fit_readout
    from affectlens.store import Store

    params = PatchConfig.from_dict(params)
    if params.exact == "top_k" and not params.attribution:
        raise SettingsError("patch.exact: top_k ranks the cells by attribution patching; set patch.attribution: true "
                            "(or patch.exact: all)")
    model_cfg = ModelConfig.from_dict(model_cfg)
    strategy = corruption_strategy(params.corruption)
    manifest = read_manifest(manifest_path)
    adapter = build_adapter(model_cfg)
    embed = f"{next(iter(adapter.n_blocks))}.embed"
    with Store(store_path) as store:
        # a prompt forward never reaches towers read from a generation run (Qwen-Omni's Talker)
        generated = set(getattr(adapter, "generated_towers", ()))
        sites = [s for s in store.sites if parse_site(s).tower not in generated]
        if len(sites) < len(store.sites):
            log.info("patching skips %s: read while speech is generated, not by the prompt forward",
                     sorted(set(store.sites) - set(sites)))
        heads = head_sites(store, sites) if params.heads != "none" and out_heads is not None else {}
        if heads:
            log.info("patching heads (%s) of %s", params.heads, heads)
        elif any(parse_site(s).point == "attn_heads" for s in sites):
            log.info("attn_heads sites are not patched (patch.heads: none, or no head tables asked for)")
        sites = [s for s in sites if parse_site(s).point != "attn_heads"]
        readout_site = pick_readout(model_cfg.readout_site, store.sites, generated)
        probe = fit_readout(store, manifest, readout_site, label_column=label_column)
        corruption = strategy.setup(CorruptionContext(params=params, adapter=adapter, manifest=manifest, store=store,
                                                      store_path=store_path, sites=sites, embed=embed))
    weight, bias, classes = probe.readout()
    metric = ProbeLogitDiff.from_readout(readout_site, weight, bias, classes, contrast["source"], contrast["target"])
    pairs = corruption.draw_pairs(manifest, contrast, params.n_pairs, params.seed, label_column=label_column)
    log.info("corruption: %s", corruption.describe(contrast))
    pairs = pairs.assign(**corruption.pair_columns())
    by_id = manifest.set_index("clip_id")
    write_tsv(pairs, out_pairs)
    size = int(round(params.window_s * adapter.frame_rate))
    stride = max(1, int(round(params.stride_s * adapter.frame_rate)))
    scopes = HEAD_SCOPES[params.heads]
    effects, head_effects = [], []
    for pair in tqdm(pairs.itertuples(), total=len(pairs), desc="patch pairs", unit="pair"):
        clean_wave = decode_clip(by_id.loc[pair.clean_clip, "path"])
        clean = adapter.prepare([clean_wave])
        corrupt, noise = corruption.corrupt_run(adapter, clean_wave, by_id.loc[pair.corrupt_clip, "path"])
        windows = time_windows(max(clean.n_frames[0], corrupt.n_frames[0]), size, stride)
        attr = attribute_pair(adapter, clean, corrupt, sites, windows, metric, noise) if params.attribution else None
        cells = top_cells(attr, params.top_k) if params.exact == "top_k" else None
        df = patch_pair(adapter, clean, corrupt, sites, windows, metric, params.max_batch,
                        corrupt_interventions=noise, cells=cells)
        df = pd.concat([df, attr], ignore_index=True)
        df.insert(0, "pair_id", pair.pair_id)
        effects.append(df)
        if heads:
            n = max(clean.n_frames[0], corrupt.n_frames[0])
            hd = patch_heads_pair(adapter, clean, corrupt, heads, windows, n, metric, params.max_batch,
                                  corrupt_interventions=noise, scopes=scopes)
            if params.attribution:
                hd = pd.concat([hd, attribute_heads_pair(adapter, clean, corrupt, heads, windows, n, metric, noise,
                                                         scopes)], ignore_index=True)
            hd.insert(0, "pair_id", pair.pair_id)
            head_effects.append(hd)
    effects = pd.concat(effects, ignore_index=True)
    if out_heads is not None:
        head_effects = (pd.concat(head_effects, ignore_index=True) if head_effects
                        else pd.DataFrame(columns=["pair_id", *HEAD_KEYS, "raw", "clean", "corrupt", "normalised"]))
        write_tsv(head_effects, out_heads)
        write_tsv(summarise_heads(head_effects, seed=params.seed).assign(**corruption.columns()), out_heads_summary)
    write_tsv(effects, out_effects)
    summary = summarise(effects, seed=params.seed).assign(**corruption.columns())
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


HEAD_SCOPES = {"none": (), "span": ("span",), "windows": ("span", "window")}
"""`patch.heads` -> the spans each head is patched over (affectlens.patching.heads.SCOPES)."""
HEADS_SUMMARY = "heads_summary.tsv"
"""The head-level summary beside a patch summary (the rule `patch` names it; heatmaps reads it there)."""


def head_sites(store, sites: list[str]) -> dict[str, int]:
    """{attn_heads site: its head count as the store records it} among `sites`."""
    out = {}
    for s in sites:
        if parse_site(s).point != "attn_heads":
            continue
        n = store.site_attrs(s).get("n_heads")
        if n is None:
            raise ValueError(f"{store.path}: site {s} records no n_heads (written before head counts were "
                             "stored): delete the store and rerun extract")
        out[s] = int(n)
    return out


def heatmaps(summaries: dict[str, list[dict]], out_dir) -> None:
    """Render every patch summary of every study into out_dir/{study}/ (a PNG and the TSV of its
    numbers per method: exact, and attribution beside it where it was run) with an index page.
    `summaries`: {study: [{"dataset", "model", "contrast", "summary": path}, ...]} (the workflow's
    `patch_summaries`, which also names the paths)."""
    from affectlens.patching.corruptions import corruption_heading
    from affectlens.viz.heatmap import color_limit, methods_of, plot_patch_heatmap, write_index

    out_dir = Path(out_dir)
    entries = []
    for study, items in summaries.items():
        for item in items:
            dataset, model, contrast, p = item["dataset"], item["model"], item["contrast"], item["summary"]
            summary = pd.read_csv(p, sep="\t")
            how = corruption_heading(summary)
            n = int(summary["n_pairs"].max())
            title = f"{study}: {dataset} × {model}, {contrast.replace('-to-', ' → ')} (n = {n} pairs; corrupt: {how})"
            vmax = color_limit(summary)  # one scale for exact and attribution, so colours compare
            maps = []
            for method in methods_of(summary):
                stem = heatmap_stem(dataset, model, contrast, method=method)
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
                note = "; ".join(f"attribution vs exact, {r.direction} ({r.n_cells} cells): "
                                 f"Spearman {r.spearman:.2f}, top cell "
                                 f"{'agrees' if r.top_agree else f'differs ({r.top_attribution} vs {r.top_exact})'}"
                                 for r in agree.itertuples())
            entries.append({"study": study, "title": title, "png": maps[0]["png"], "tsv": maps[0]["tsv"],
                            "maps": maps, "note": note})
            entries += _head_maps(Path(p).with_name(HEADS_SUMMARY), out_dir, study, (dataset, model, contrast), title)
    write_index(entries, out_dir / "index.html")


def _head_maps(heads_tsv: Path, out_dir: Path, study: str, name: tuple[str, str, str], title: str) -> list[dict]:
    """Render the head-level maps of one patch summary into out_dir/{study}/ with their numbers:
    one index entry per map kind (block × head, head × time window), exact and attribution side
    by side on one colour scale; [] when the summary has no head cells."""
    from affectlens.viz.heads import MAPS, plot_head_heatmap
    from affectlens.viz.heatmap import color_limit, methods_of

    if not heads_tsv.exists() or heads_tsv.stat().st_size == 0:
        return []
    heads = pd.read_csv(heads_tsv, sep="\t")
    if heads.empty:
        return []
    vmax = color_limit(heads)
    entries = []
    for kind, (scope, _) in MAPS.items():
        label = {"heads": "block × head (each head over the whole clip)",
                 "head_windows": "head × time window"}[kind]
        maps = []
        for method in methods_of(heads):
            stem = heatmap_stem(*name, kind=kind, method=method)
            png = plot_head_heatmap(heads, kind, out_dir / study / f"{stem}.png", title, method=method, vmax=vmax)
            if png is None:
                continue
            write_tsv(heads[(heads["scope"] == scope) & (heads["method"] == method)], out_dir / study / f"{stem}.tsv")
            maps.append({"label": {"exact": "exact patching",
                                   "attribution": "attribution patching (gradient estimate)"}.get(method, method),
                         "png": f"{study}/{stem}.png", "tsv": f"{study}/{stem}.tsv"})
        if maps:
            entries.append({"study": study, "title": f"{title}: heads, {label}", "png": maps[0]["png"],
                            "tsv": maps[0]["tsv"], "maps": maps, "note": ""})
    return entries


# --- trace (video question answering) --------------------------------------------------------------
TRACE_FAMILIES = ("qwen2-vl", "qwen2.5-vl")


def trace(manifest_path, dataset_cfg: dict, model_cfg: ModelConfig | dict, params: TraceConfig | dict, out_table, out_pairs, out_summary,
          out_heatmaps) -> pd.DataFrame:
    """Causal tracing of video QA (affectlens.patching.video): per question, the model's answer
    among the candidates, each counterfactual video, every LM site x token slice patched both
    ways. Writes the per-question table, its pairs (as the patch stage's, for the probes on patching
    outcomes), the mean over questions and one heatmap per counterfactual."""
    from tqdm import tqdm

    from affectlens.data.manifest import read_manifest
    from affectlens.patching.video import questions_from_manifest, trace_pairs, trace_question, trace_summary
    from affectlens.viz.heatmap import plot_patch_heatmap

    params, model_cfg = TraceConfig.from_dict(params), ModelConfig.from_dict(model_cfg)
    if dataset_cfg.get("source") != "video_qa":
        raise ValueError(f"trace: the dataset's source is {dataset_cfg.get('source')!r}; tracing reads a video_qa "
                         "dataset (questions with candidates about a video)")
    if model_cfg.family not in TRACE_FAMILIES:
        raise ValueError(f"trace: model family {model_cfg.family!r}; tracing runs a video-language model "
                         f"of the families {TRACE_FAMILIES}")
    questions = questions_from_manifest(read_manifest(manifest_path), params.n_questions, params.seed,
                                        where=str(manifest_path))
    adapter = build_adapter(model_cfg)
    sites = adapter.sites(list(params.sites))
    log.info("tracing %d questions: counterfactuals %s, slices %s, %d sites", len(questions),
             params.counterfactuals, params.slices, len(sites))
    tables = [trace_question(adapter, q, list(params.counterfactuals), sites, list(params.slices),
                             max_batch=params.max_batch, answer_style=params.answer_style)
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
