"""SAE architectures by name, and their artifacts (one folder: cfg.json + sae.safetensors)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from affectlens.sae.base import SAEConfig
from affectlens.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from affectlens.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from affectlens.sae.relu import ReLUConfig, ReLUSAE
from affectlens.sae.topk import TopKConfig, TopKSAE

ARCHITECTURES = {
    "topk": (TopKConfig, TopKSAE),
    "batchtopk": (BatchTopKConfig, BatchTopKSAE),
    "jumprelu": (JumpReLUConfig, JumpReLUSAE),
    "relu": (ReLUConfig, ReLUSAE),
}


def _lookup(architecture: str):
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown SAE architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture]


def own_keys(architecture: str) -> tuple[str, ...]:
    """The config keys `architecture` adds to the shared SAEConfig (topk: k; relu: l1_coef; ...)."""
    shared = {f.name for f in dataclasses.fields(SAEConfig)}
    return tuple(f.name for f in dataclasses.fields(_lookup(architecture)[0]) if f.name not in shared)


def config_from_settings(architecture: str, settings: Mapping, **fixed) -> SAEConfig:
    """The config of `architecture` from a settings mapping (the workflow's `sae:` section) that
    holds the keys of every architecture: this architecture's config takes the shared keys and its
    own (`own_keys`) that the mapping has, and leaves the other architectures' keys alone; `fixed`
    (e.g. d_in, read off the data) is given as is."""
    config_cls = _lookup(architecture)[0]
    known = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls.from_dict({**{k: v for k, v in settings.items() if k in known}, **fixed})


def build(architecture: str, **cfg) -> torch.nn.Module:
    """A freshly initialised SAE of `architecture` with config keys `cfg` (unknown keys rejected)."""
    config_cls, module_cls = _lookup(architecture)
    return module_cls(config_cls.from_dict(cfg))


def architecture_of(obj) -> str:
    """The registered name of an SAE module or config."""
    for name, classes in ARCHITECTURES.items():
        if type(obj) in classes:
            return name
    raise ValueError(f"{type(obj).__name__} is not a registered SAE architecture or config ({sorted(ARCHITECTURES)})")


def save_sae(sae: torch.nn.Module, out_dir: str | Path) -> None:
    """Write `cfg.json` and `sae.safetensors` into `out_dir`, each via a temporary file + rename."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": architecture_of(sae), **sae.cfg.to_dict()}
    tmp = out_dir / "cfg.json.tmp"
    try:  # a failed write (disk full) leaves no temp file and nothing under the final name
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
        os.replace(tmp, out_dir / "cfg.json")
        tmp = out_dir / "sae.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}, str(tmp))
        os.replace(tmp, out_dir / "sae.safetensors")
    finally:
        tmp.unlink(missing_ok=True)


def load_sae(out_dir: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The SAE saved in `out_dir` by `save_sae`, in eval mode."""
    out_dir = Path(out_dir)
    cfg_path, weights = out_dir / "cfg.json", out_dir / "sae.safetensors"
    for p in (cfg_path, weights):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing; {out_dir} is not a saved SAE (rerun the sae rule)")
    cfg = json.loads(cfg_path.read_text())
    architecture = cfg.pop("architecture", None)
    if architecture is None:
        raise ValueError(f"{cfg_path} has no 'architecture' key")
    try:
        sae = build(architecture, **cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: not a valid SAE config ({e})") from e
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as e:  # noqa: BLE001 - truncated or not safetensors
        raise ValueError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e}); "
                         "rerun the sae rule") from e
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not match {cfg_path} ({architecture}, d_in={cfg.get('d_in')}): "
                         f"{e}") from e
    return sae.to(device).eval()
