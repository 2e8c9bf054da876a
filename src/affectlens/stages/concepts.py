"""Stage of workflow/rules/concepts.smk, and what `affectlens concept` runs: a concept given by two
folders of recordings (with it, without it), looked up among the features of a trained SAE."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from affectlens.models import build_adapter
from affectlens.models.config import ModelConfig
from affectlens.settings import ConceptConfig
from affectlens.stages.common import write_tsv

log = logging.getLogger("affectlens")


def concepts(sae_dir, model_cfg: ModelConfig | dict, site: str, params: ConceptConfig | dict, out_dir,
             name: str = "concept", keys: tuple[str, str] | None = None):
    """Read `params.with_concept` and `params.without_concept` (grouped by `params.group_by`) through
    the model and the SAE saved in `sae_dir` at `site` (`sae.concept.find_concept`), and write into
    out_dir: features.tsv (every feature, best first: effect size, AUROC and interval, p, q,
    significant), probe.tsv (sparse probe on the top features), top_clips.tsv, clips.tsv (each
    clip's side and group), features.png, dashboard.html, and summary.json last (the folder is
    complete when it is there). `keys` name the two folders in errors (default the config keys
    concepts.<name>.with_concept / without_concept; the CLI passes its flags). Returns the `Concept`."""
    from affectlens.io import write_json
    from affectlens.data.concepts import concept_clips
    from affectlens.sae.concept import find_concept
    from affectlens.sae.registry import load_sae
    from affectlens.viz.concept import concept_figure
    from affectlens.viz.dashboard import write_dashboard

    params = ConceptConfig.from_dict(params)
    keys = keys or (f"concepts.{name}.with_concept", f"concepts.{name}.without_concept")
    m = ModelConfig.from_dict(model_cfg)
    out_dir = Path(out_dir)
    (out_dir / "summary.json").unlink(missing_ok=True)  # a rerun's folder is complete only when it is back
    with_files, with_groups = concept_clips(params.with_concept, params.group_by, keys[0])
    without_files, without_groups = concept_clips(params.without_concept, params.group_by, keys[1])
    both = {f.resolve() for f in with_files} & {f.resolve() for f in without_files}
    if both:
        raise ValueError(f"{len(both)} recording(s) are both with and without the concept, e.g. {sorted(both)[0]}: "
                         f"{keys[0]} ({params.with_concept}) and {keys[1]} ({params.without_concept}) must not "
                         "share files (is one folder inside the other?)")
    sae = load_sae(sae_dir)
    adapter = build_adapter(m)
    log.info("concept %s: %d clips with, %d without, %s at %s, SAE %s", name, len(with_files), len(without_files),
             adapter.model_id, site, sae_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = find_concept(sae, adapter, site, with_files, without_files, with_groups, without_groups,
                     storage_dtype=m.storage_dtype, batch_size=m.batch_size, n_permutations=params.n_permutations,
                     n_boot=params.n_boot, alpha=params.alpha, top_k=params.top_k, top_clips=params.top_clips,
                     n_splits=params.n_splits, seed=params.seed, work_dir=out_dir)
    write_tsv(c.features, out_dir / "features.tsv")
    write_tsv(c.probe, out_dir / "probe.tsv")
    write_tsv(c.top_clips, out_dir / "top_clips.tsv")
    write_tsv(c.clips, out_dir / "clips.tsv")
    summary = {"concept": name, "with_concept": str(params.with_concept), "without_concept": str(params.without_concept),
               "group_by": params.group_by, "model": adapter.model_id, "revision": adapter.revision,
               "sae": str(sae_dir), **c.summary}
    title = f"Concept {name}: SAE features at {site} ({adapter.model_id})"
    concept_figure(c.features, summary, out_dir / "features.png", top_k=params.top_k, title=title)
    write_dashboard(out_dir / "dashboard.html", site, dashboard_stats(c, name, params.top_k), c.top_clips,
                    dict(zip(c.clips["clip_id"], c.clips["path"])), clip_acts=c.acts,
                    clip_labels=dict(zip(c.clips["clip_id"], c.clips["concept"])), metrics=summary,
                    n_features=params.top_k, title=title)
    best = c.features.iloc[0]
    log.info("concept %s: best feature %d (d %.2f, AUROC %.3f [%.3f, %.3f], p %.2g, q %.2g); %d significant at "
             "q <= %g", name, best["feature"], best["effect_size"], best["auroc"], best["auroc_low"],
             best["auroc_high"], best["p_value"], best["q_value"], summary["n_significant"], params.alpha)
    write_json(out_dir / "summary.json", summary)
    return c


def dashboard_stats(c, name: str, top_k: int) -> pd.DataFrame:
    """The `top_k` best features in the dashboard's feature x label layout (the one label: the concept)."""
    top = c.features.head(top_k)
    active = (c.acts > 0).mean(0)
    return pd.DataFrame({
        "feature": top["feature"].to_numpy(), "label": name, "n_clips": int((c.clips["concept"] == "with").sum()),
        "density": active[top["feature"].to_numpy()], "mean_activation": top["mean_with"].to_numpy(),
        "mean_activation_rest": top["mean_without"].to_numpy(), "mean_difference": top["mean_difference"].to_numpy(),
        **{k: top[k].to_numpy() for k in ("effect_size", "auroc", "auroc_low", "auroc_high", "p_value", "q_value")},
    })
