"""Video question answering: an annotation JSON plus a folder of videos.

Each annotation is an object with `video_name` and `question` (required) and optionally
`candidates`, `answer`, `answer_number`, `question_id`, `task_name`, `start`, `end`,
`frames_with_answer_object`. The file may be a JSON list of such objects, an object whose
values are such lists (e.g. one per task), or JSON lines.

Manifest: one row per question; path = the video (`video_name`, with one of `video_extensions`
appended when it has none), text = question, label = answer, speaker = the video (questions on
one video never straddle train and test), start/end from the annotation (seconds);
candidates and frames_with_answer_object are kept as JSON text. Questions whose video is not in
the folder are listed in the rejections.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from affectlens.data.annotations import AnnotationError, read_text, rejection, walk
from affectlens.data.download import download, link_or_copy, link_tree
from affectlens.data.listing import content_entry, file_entry

log = logging.getLogger(__name__)

REQUIRED = ("video_name", "question")
VIDEO_EXTENSIONS = ("mp4", "mkv", "webm", "avi", "mov")


@dataclass(frozen=True)
class Options:
    """`datasets.<name>.video_qa` in the config."""

    annotations: str | None = None
    """The annotation JSON: a path or an http(s) URL (required)."""
    annotations_sha256: str | None = None
    """Published sha256 of the annotation file, if any (else the digest of what was fetched is recorded)."""
    videos: str | None = None
    """The folder holding the videos (required)."""
    video_extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    """Extensions tried when video_name has none."""
    tasks: tuple[str, ...] | None = None
    """Keep only these task_name values (null = all)."""

    def __post_init__(self):
        object.__setattr__(self, "video_extensions", tuple(e.lstrip(".") for e in self.video_extensions))
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))


def fetch(raw_dir: Path, opts: Options, cache: Path) -> None:
    if not opts.annotations or not opts.videos:
        raise ValueError("datasets.<name>.video_qa: set both annotations (JSON path or URL) and videos (folder)")
    raw_dir.mkdir(parents=True, exist_ok=True)
    name = Path(opts.annotations.split("?")[0]).name or "annotations.json"
    fetched = download(opts.annotations, cache / name, sha256=opts.annotations_sha256)
    link_or_copy(fetched, raw_dir / "annotations.json")
    link_tree(opts.videos, raw_dir / "videos")


def known_labels(opts: Options, key: str = "datasets.<name>.video_qa") -> None:
    """None: the labels are the questions' answers. Checks that the annotations and the videos are
    set and, where local, there."""
    if not opts.annotations or not opts.videos:
        raise ValueError(f"{key}: set both annotations (JSON path or URL) and videos (folder)")
    if "://" not in opts.annotations and not Path(opts.annotations).expanduser().is_file():
        raise FileNotFoundError(f"{key}.annotations: {opts.annotations} does not exist; set it to your annotation "
                                "JSON (a path or an http(s) URL)")
    if not Path(opts.videos).expanduser().is_dir():
        raise FileNotFoundError(f"{key}.videos: {opts.videos} is not a folder (does it exist?); set it to the "
                                "folder that holds the videos")
    return None

def listing(opts: Options) -> list[tuple]:
    """The annotation file's bytes (a local one; a URL is pinned by annotations_sha256) and the size
    and modification time of each file in the videos folder: cheap, no video is read."""
    entries = []
    if opts.annotations and "://" not in opts.annotations:
        entries.append(content_entry(opts.annotations, "annotations"))
    if opts.videos and Path(opts.videos).expanduser().is_dir():
        root = Path(opts.videos).expanduser()
        entries += [file_entry(d / name, (d / name).relative_to(root).as_posix())
                    for d, _, files in walk(root, max_depth=8, warn=False) for name in files]
    return entries

def read_annotations(path: str | Path) -> list[dict]:
    path = Path(path)
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path}: neither JSON nor JSON lines ({e})") from e
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if not lists:
            raise AnnotationError(f"{path}: a JSON object without lists of questions")
        data = [item for v in lists for item in v]
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a list of question objects")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise AnnotationError(f"{path}: entry {i} is not an object")
        missing = [k for k in REQUIRED if item.get(k) in (None, "")]
        if missing:
            raise AnnotationError(f"{path}: entry {i} lacks required key(s) {missing} (has {sorted(item)})")
    return data


def _video_path(folder: Path, name: str, extensions) -> Path | None:
    p = folder / name
    if p.is_file():
        return p
    if not Path(name).suffix or not p.exists():
        for ext in extensions:
            q = folder / f"{name}.{ext}"
            if q.is_file():
                return q
    return None


def _seconds(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def build_manifest(raw_dir: Path, dataset: str, opts: Options) -> tuple[pd.DataFrame, list[dict]]:
    raw_dir = Path(raw_dir)
    items = read_annotations(raw_dir / "annotations.json")
    videos = raw_dir / "videos"
    ids = [str(it["question_id"]) if it.get("question_id") not in (None, "") else f"q{i:06d}"
           for i, it in enumerate(items)]
    counts = pd.Series(ids).value_counts()
    rows, rejections = [], []
    for i, (item, qid) in enumerate(zip(items, ids)):
        if opts.tasks is not None and item.get("task_name") not in opts.tasks:
            continue
        clip_id = qid if counts[qid] == 1 else f"{qid}_{i}"
        name = str(item["video_name"])
        path = _video_path(videos, name, opts.video_extensions)
        if path is None:
            rejections.append(rejection(clip_id, videos / name, f"question without a video: no {name} "
                                        f"(or {name}.{{{','.join(opts.video_extensions)}}}) in the videos folder"))
            continue
        start, end = _seconds(item.get("start")), _seconds(item.get("end"))
        answer = item.get("answer")
        rows.append({
            "clip_id": clip_id, "dataset": dataset, "path": str(path), "split": "all",
            "label": np.nan if answer in (None, "") else str(answer), "speaker": Path(name).stem,
            "pair_key": np.nan, "text": str(item["question"]), "start": start, "end": end,
            "duration": end - start if not (np.isnan(start) or np.isnan(end)) else np.nan,
            "video_name": name, "question_id": item.get("question_id"), "task_name": item.get("task_name"),
            "answer_number": item.get("answer_number"),
            "candidates": json.dumps(item["candidates"], ensure_ascii=False) if "candidates" in item else np.nan,
            "frames_with_answer_object": json.dumps(item["frames_with_answer_object"], ensure_ascii=False)
            if "frames_with_answer_object" in item else np.nan,
        })
    return pd.DataFrame(rows), rejections
