"""The dataset sources the workflow knows, one module each, behind two calls:

    fetch(raw_dir, dataset, dataset_cfg)  download / verify / extract into raw_dir   (rule raw)
    build(raw_dir, dataset, dataset_cfg)  -> (manifest, rejections)                (rule manifest)

Each module has an `Options` dataclass (its `datasets.<name>.<source>` config block), `fetch`
and `build_manifest`. Downloads go to `{download_dir}/{dataset}/`, outside the raw folder, so a
partial download survives a failed or retried job and resumes.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pandas as pd

from affectlens.data.annotations import options

MODULES = {
    "meld": "affectlens.data.meld",
    "crema_d": "affectlens.data.crema_d",
    "ravdess": "affectlens.data.ravdess",
    "pmemo": "affectlens.data.pmemo",
    "deam": "affectlens.data.deam",
    "folder": "affectlens.data.folder",
    "video_qa": "affectlens.data.videoqa",
}
VIDEO_SOURCES = frozenset({"video_qa"})  # checked as video: their clips need not carry audio
DEFAULT_DOWNLOAD_DIR = "resources/download"


def module(source: str) -> ModuleType:
    if source not in MODULES:
        raise ValueError(f"unknown dataset source {source!r}; known: {sorted(MODULES)}")
    return importlib.import_module(MODULES[source])


def source_options(dataset: str, dataset_cfg: dict):
    source = dataset_cfg["source"]
    return options(module(source).Options, dataset_cfg.get(source), f"datasets.{dataset}.{source}")


def fetch(raw_dir: str | Path, dataset: str, dataset_cfg: dict) -> None:
    source = dataset_cfg["source"]
    cache = Path(dataset_cfg.get("download_dir", DEFAULT_DOWNLOAD_DIR)) / dataset
    module(source).fetch(Path(raw_dir), source_options(dataset, dataset_cfg), cache)


def build(raw_dir: str | Path, dataset: str, dataset_cfg: dict) -> tuple[pd.DataFrame, list[dict]]:
    source = dataset_cfg["source"]
    return module(source).build_manifest(Path(raw_dir), dataset, source_options(dataset, dataset_cfg))
