"""A user's own labelled recordings.

Two layouts:
  * one sub-folder per label under `root` (`root/happy/a.wav`, `root/sad/take2/b.flac`, ...):
    the first folder below root is the label;
  * a table `csv` with columns `path,label` and optionally `speaker, pair_key, text, split,
    start, end` and any others (kept as extra manifest columns); paths are relative to `root`
    (or absolute).
`pattern`, a regular expression matched against each file's path relative to root, can supply
`speaker`, `pair_key` and `split` through named groups, e.g. `^[^/]+/(?P<speaker>[^_]+)_`.
Without speaker information each clip is its own group in cross-validation (a warning says so).
`labels` lists the allowed labels: any other stops with an error naming the file or row.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import pandas as pd

from affectlens.data.annotations import AnnotationError, check_labels, read_table, rejection, require_columns, walk
from affectlens.data.decode import check_range
from affectlens.data.download import link_or_copy, link_tree
from affectlens.data.listing import content_entry, file_entry

log = logging.getLogger(__name__)

EXTENSIONS = ("wav", "flac", "mp3", "ogg", "opus", "m4a", "aac", "mp4", "webm", "mkv")
MAX_DEPTH = 32  # folders below root that are searched for recordings


@dataclass(frozen=True)
class Options:
    """`datasets.<name>.folder` in the config."""

    root: str | None = None
    """The folder holding the recordings (required)."""
    csv: str | None = None
    """A table path,label[,speaker,...]; null = one sub-folder per label."""
    labels: tuple[str, ...] | None = None
    """Allowed labels; null = whatever the folders or table hold."""
    pattern: str | None = None
    """Regex on the path relative to root whose named groups give speaker, pair_key, split."""
    extensions: tuple[str, ...] = EXTENSIONS
    """File extensions counted as recordings (folder layout)."""

    def __post_init__(self):
        object.__setattr__(self, "extensions", tuple(e.lower().lstrip(".") for e in self.extensions))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))
        if self.pattern is not None:
            try:
                rx = re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"folder.pattern: {self.pattern!r} is not a regular expression: {e}") from None
            unknown = set(rx.groupindex) - {"speaker", "pair_key", "split"}
            if unknown:
                raise ValueError(f"folder.pattern: named groups {sorted(unknown)} are not speaker, pair_key or split")


def fetch(raw_dir: Path, opts: Options, cache: Path) -> None:
    if not opts.root:
        raise ValueError("datasets.<name>.folder.root: set it to the folder that holds your recordings")
    raw_dir.mkdir(parents=True, exist_ok=True)
    link_tree(opts.root, raw_dir / "data")
    if opts.csv:
        if not Path(opts.csv).is_file():
            raise FileNotFoundError(f"datasets.<name>.folder.csv: {opts.csv} does not exist")
        link_or_copy(opts.csv, raw_dir / "labels.csv")


def recordings(root: str | Path, opts: Options, warn: bool = True) -> Iterator[tuple[Path, str]]:
    """(path, path relative to root in POSIX form) of every file under root with a recording
    extension, in a stable order; links are followed, each real folder once (`walk`)."""
    root = Path(root)
    for d, _, files in walk(root, max_depth=MAX_DEPTH, warn=warn):
        for name in files:
            p = d / name
            if p.suffix.lower().lstrip(".") in opts.extensions:
                yield p, p.relative_to(root).as_posix()


def read_labels_table(path: str | Path, opts: Options) -> pd.DataFrame:
    """The table of the table layout with stripped column names and labels, checked: path and label
    columns, no empty label, only `folder.labels` (when given)."""
    table = read_table(path, sep=None)
    table.columns = [c.strip() for c in table.columns]
    require_columns(table, ["path", "label"], opts.csv or path)
    table["label"] = table["label"].str.strip()
    empty = table["label"] == ""
    if empty.any():
        raise AnnotationError(f"{opts.csv or path}: column 'label' is empty in rows {table.index[empty][:5].tolist()}")
    if opts.labels is not None:
        check_labels(table["label"], opts.labels, opts.csv or path, "label")
    return table


def _folder_label(rel: str, opts: Options) -> str:
    """The label of a recording in the folder layout: the first folder below root."""
    if "/" not in rel:
        raise AnnotationError(f"{opts.root}: {rel} is not inside a label folder; put each recording "
                              "under root/<label>/ or give a csv")
    label = rel.split("/", 1)[0]
    if opts.labels is not None and label not in opts.labels:
        raise AnnotationError(f"{opts.root}/{label}: folder {label!r} is not a known label "
                              f"(folder.labels = {list(opts.labels)}); file {rel}")
    return label


def _check_paths(opts: Options, key: str) -> None:
    if not opts.root:
        raise ValueError(f"{key}.root: set it to the folder that holds your recordings")
    if not Path(opts.root).expanduser().is_dir():
        raise FileNotFoundError(f"{key}.root: {opts.root} is not a folder (does it exist?); set it to the folder "
                                "that holds your recordings")
    if opts.csv and not Path(opts.csv).expanduser().is_file():
        raise FileNotFoundError(f"{key}.csv: {opts.csv} does not exist; set it to your table path,label[,...] "
                                "or to null for one sub-folder per label")


def known_labels(opts: Options, key: str = "datasets.<name>.folder") -> tuple[str, ...]:
    """The labels the manifest will hold, from the table or the folder names alone (no audio is
    read); the checks the manifest stage makes of them (label folders, `folder.labels`, empty
    labels) fail here, before anything is computed. `key` names the config block in errors."""
    _check_paths(opts, key)
    if opts.csv:
        return tuple(sorted(set(read_labels_table(opts.csv, opts)["label"])))
    labels = set()
    for _, rel in recordings(opts.root, opts, warn=False):
        if not _undecodable(rel):  # such a file is rejected alone by the manifest
            labels.add(_folder_label(rel, opts))
    return tuple(sorted(labels))


def listing(opts: Options) -> list[tuple]:
    """What the manifest is made from, cheaply (no audio read): the table's bytes and the size and
    modification time of each file it names, or of each recording in the folder layout. Adding,
    removing, moving (relabelling) or replacing a recording, or editing the table, changes it."""
    if not opts.root or not Path(opts.root).expanduser().is_dir():
        return [("root", str(opts.root), "missing")]
    root = Path(opts.root).expanduser()
    if not opts.csv:
        return [file_entry(p, rel) for p, rel in recordings(root, opts, warn=False)]
    entries = [content_entry(opts.csv, "table")]
    try:
        paths = read_table(opts.csv, sep=None).rename(columns=str.strip)["path"]
    except Exception:  # an unreadable table: its bytes are listed, and the manifest names the fault
        return entries
    return entries + [file_entry(root / rel.strip(), rel.strip()) for rel in paths]


def _from_pattern(rel: str, rx: re.Pattern | None, source: str) -> dict:
    if rx is None:
        return {}
    m = rx.search(rel)
    if m is None:
        raise AnnotationError(f"{source}: path {rel!r} does not match folder.pattern {rx.pattern!r}")
    return {k: v for k, v in m.groupdict().items() if v is not None}


def _clip_id(rel: str) -> str:
    return str(PurePosixPath(rel).with_suffix(""))


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None  # empty, or not a number: validate_manifest names the column
    return None if np.isnan(value) else value


def _printable(name: str) -> str:
    """A file name as text that can be written anywhere: bytes that are not UTF-8 as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _undecodable(rel: str) -> bool:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:  # os.walk hands such bytes over as lone surrogates
        return True
    return False


def _once_per_file(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows, rejections): each real file once, however many links (symbolic or hard) lead to it;
    the file at its own place is kept over a link to it, else the first in walk order."""
    keys, first = [], {}
    for n, row in enumerate(rows):
        try:
            st = os.stat(row["path"])
            key = (st.st_dev, st.st_ino)
        except OSError:  # a dangling link: the clip check says "missing"
            key = ("missing", n)
        keys.append(key)
        other = first.get(key)
        if other is None or (Path(rows[other]["path"]).is_symlink() and not Path(row["path"]).is_symlink()):
            first[key] = n
    kept, rejected = [], []
    for n, (row, key) in enumerate(zip(rows, keys)):
        if first[key] == n:
            kept.append(row)
        else:
            rejected.append(rejection(row["clip_id"], row["path"], f"the same file as {rows[first[key]]['path']} "
                                      "(a link to it); each file is listed once"))
    return kept, rejected


def build_manifest(raw_dir: Path, dataset: str, opts: Options) -> tuple[pd.DataFrame, list[dict]]:
    raw_dir = Path(raw_dir)
    data = raw_dir / "data"
    rx = re.compile(opts.pattern) if opts.pattern else None
    rows, rejections = [], []
    if (raw_dir / "labels.csv").is_file():
        table = read_labels_table(raw_dir / "labels.csv", opts)
        for i, rec in enumerate(table.to_dict("records")):
            rel = rec.pop("path").strip()
            path = Path(rel) if Path(rel).is_absolute() else data / rel
            row = {"clip_id": _clip_id(rel), "dataset": dataset, "path": str(path), "split": "all",
                   "speaker": np.nan, "pair_key": np.nan, "text": np.nan, "start": np.nan, "end": np.nan,
                   "duration": np.nan}
            row.update({k: (v if v != "" else np.nan) for k, v in rec.items()})
            reason = check_range(path, _number(row["start"]), _number(row["end"]), None)
            if reason is not None:
                rejections.append(rejection(row["clip_id"], path, f"{opts.csv} row {i}: {reason}"))
                continue
            row.update(_from_pattern(rel, rx, f"{opts.csv} row {i}"))
            rows.append(row)
    else:
        if not data.is_dir():
            raise FileNotFoundError(f"{data}: the recordings folder is missing; did the raw stage run?")
        for p, rel in recordings(data, opts):
            if _undecodable(rel):
                rejections.append(rejection(_clip_id(_printable(rel)), _printable(str(p)),
                                            "the file name is not UTF-8 text; rename the file"))
                continue
            row = {"clip_id": _clip_id(rel), "dataset": dataset, "path": str(p), "split": "all",
                   "label": _folder_label(rel, opts), "speaker": np.nan, "pair_key": np.nan, "text": np.nan,
                   "start": np.nan, "end": np.nan, "duration": np.nan}
            row.update(_from_pattern(rel, rx, str(opts.root)))
            rows.append(row)
        rows, links = _once_per_file(rows)
        rejections += links
    if not rows and not rejections:
        raise FileNotFoundError(f"{opts.root}: no recordings found (extensions {list(opts.extensions)})")
    if not rows:
        return pd.DataFrame(columns=["clip_id"]), rejections
    manifest = pd.DataFrame(rows)
    no_speaker = manifest["speaker"].isna()
    if no_speaker.any():
        log.warning("%d of %d clips have no speaker: each is its own group in cross-validation "
                    "(give a speaker column or folder.pattern to group them)", int(no_speaker.sum()), len(manifest))
        # object first: a column of only missing speakers is float, which refuses the string ids
        manifest["speaker"] = manifest["speaker"].astype(object).where(~no_speaker, manifest["clip_id"])
    return manifest, rejections
