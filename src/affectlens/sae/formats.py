"""SAE folders on disk by format: ours (`cfg.json` + `sae.safetensors`, `registry.save_sae`) and
SAELens's (`cfg.json` + `sae_weights.safetensors`, `saelens`). Both formats name their config
`cfg.json`, so each SAE has a folder of its own."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from affectlens.models.sites import parse_site
from affectlens.sae.registry import load_sae, save_sae
from affectlens.sae.saelens import WEIGHTS_FILE, load_saelens, save_saelens

FORMATS = ("affectlens", "saelens")


def _check(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown SAE format {format!r}; formats are {FORMATS}")


def load(path: str | Path, format: str = "affectlens", device: str | torch.device = "cpu") -> torch.nn.Module:
    """The SAE saved in the folder `path` in `format`, as one of our SAE modules in eval mode."""
    _check(format)
    if format == "saelens":
        return load_saelens(path, device)
    path = Path(path)
    if not (path / "sae.safetensors").exists() and (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{path / 'sae.safetensors'} is missing; {path} holds an SAELens SAE ({WEIGHTS_FILE}): "
                                "load it with format='saelens'")
    return load_sae(path, device)


def save(sae: torch.nn.Module, out_dir: str | Path, format: str = "affectlens", site: str | None = None,
         model_name: str | None = None) -> Path:
    """Write `sae` into the folder `out_dir` in `format`; SAELens's needs the `site` the SAE reads
    (its hook_name) and takes the model's name for its metadata."""
    _check(format)
    if format == "affectlens":
        save_sae(sae, out_dir)
        return Path(out_dir)
    if site is None:
        raise ValueError("an SAELens export needs the site the SAE reads (e.g. encoder.blocks.3.resid_post)")
    return save_saelens(sae, out_dir, site, model_name)


def site_of_folder(sae_dir: str | Path) -> str:
    """The site a trained SAE folder reads: `site` in its metrics.json (the sae rule writes it), else
    the folder's name (the workflow names it results/sae/{dataset}/{model}/{site})."""
    sae_dir = Path(sae_dir)
    metrics = sae_dir / "metrics.json"
    if metrics.is_file():
        try:
            site = json.loads(metrics.read_text()).get("site")
        except (json.JSONDecodeError, AttributeError):
            site = None
        if site:
            return str(parse_site(site))
    try:
        return str(parse_site(sae_dir.resolve().name))
    except ValueError:
        raise ValueError(f"{sae_dir}: no metrics.json with a site and the folder's name is not a site; give the "
                         "site the SAE reads (--site encoder.blocks.3.resid_post)") from None


def export(sae_dir: str | Path, out_dir: str | Path, format: str = "saelens", site: str | None = None,
           model_name: str | None = None) -> Path:
    """Write the SAE trained in `sae_dir` (our format) into `out_dir` in `format`. The site defaults to
    `site_of_folder(sae_dir)`, and the model's name to the workflow's (results/sae/{dataset}/{model}/{site})
    when `sae_dir` is laid out that way."""
    sae_dir, out_dir = Path(sae_dir), Path(out_dir)
    _check(format)
    if out_dir.resolve() == sae_dir.resolve():
        raise ValueError(f"{out_dir}: the export would overwrite the SAE it reads; give another folder")
    sae = load_sae(sae_dir)
    site = str(parse_site(site)) if site is not None else site_of_folder(sae_dir)
    parents = sae_dir.resolve().parents
    if model_name is None and len(parents) > 2 and parents[2].name == "sae":
        model_name = parents[0].name
    return save(sae, out_dir, format, site=site, model_name=model_name)
