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
    "urdu": "affectlens.data.urdu",
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


def text_only(dataset: str, dataset_cfg: dict) -> bool:
    """Whether the dataset's clips are texts alone, with no audio or video file (MELD with
    `meld.modality: text`): the manifest stage checks no media, decode passes the rows on, and the
    probe stage gets no acoustic baseline. A source says so with its own `text_only(opts)`."""
    source = dataset_cfg["source"]
    find = getattr(module(source), "text_only", None) if source in MODULES else None
    return bool(find is not None and find(source_options(dataset, dataset_cfg)))


def data_listing(dataset: str, dataset_cfg: dict) -> str:
    """One line that changes when the user's own data does (a `folder` source's recordings or
    table, a `video_qa` source's annotations and videos): names, sizes and modification times, no
    audio read. The workflow's `raw` rule takes it as a parameter, so adding, removing, moving or
    replacing a recording, or editing the table, reruns that dataset's jobs and nothing else. Empty
    for the published corpora, which are pinned by their checksums, and for the demo corpus."""
    from affectlens.data.listing import summary

    source = dataset_cfg["source"]
    if source not in MODULES or not hasattr(module(source), "listing"):
        return ""
    return summary(module(source).listing(source_options(dataset, dataset_cfg)))


def known_labels(dataset: str, dataset_cfg: dict) -> tuple[str, ...] | None:
    """The labels of the dataset's `label_column`, where they are known before anything is
    computed: the demo corpus's emotions, a published corpus's configured classes, a folder's label
    folders or its table's labels (read, not decoded); None where they are not (another label
    column, video QA answers). A source's checks of its settings and local paths run here too, so
    they fail when the workflow is planned, naming the config key."""
    source = dataset_cfg["source"]
    if source == "demo":
        labels = tuple(dataset_cfg.get("demo", {}).get("emotions") or ())
        if not labels:
            from affectlens.data.demo import DEFAULT_EMOTIONS

            labels = DEFAULT_EMOTIONS
    else:
        opts = source_options(dataset, dataset_cfg)
        find = getattr(module(source), "known_labels", None)
        labels = None if find is None else find(opts, f"datasets.{dataset}.{source}")
    return labels if dataset_cfg.get("label_column", "label") == "label" else None
