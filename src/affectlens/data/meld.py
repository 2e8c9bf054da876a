"""MELD (Poria et al. 2019): utterances of the TV series Friends with emotion and sentiment labels.

Published layout. The raw tarball `MELD.Raw.tar.gz` holds the annotation tables
`{train,dev,test}_sent_emo.csv` (columns `Sr No., Utterance, Speaker, Emotion, Sentiment,
Dialogue_ID, Utterance_ID, Season, Episode, StartTime, EndTime`; 9989 / 1109 / 2610 rows) and
three nested tarballs whose folders hold one video clip per utterance,
`dia{Dialogue_ID}_utt{Utterance_ID}.mp4`:

    train.tar.gz -> train_splits/        dev.tar.gz -> dev_splits_complete/
    test.tar.gz  -> output_repeated_splits_test/

Manifest: one row per annotated utterance that has a clip, in the official splits;
clip_id `{split}_dia{D}_utt{U}` (dialogue ids restart in every split), label = Emotion (or
Sentiment), speaker = the Speaker column, text = the Utterance exactly as published, no
pair_key (MELD has no parallel utterances). Extras: emotion, sentiment, dialogue_id,
utterance_id, season, episode, episode_start/episode_end (seconds into the episode) and
annotated_duration (EndTime - StartTime), which the clip checks compare with the clip to find
mis-cut clips. Annotation rows without a clip, clips without an annotation row and files that
are not named like a clip are listed in the rejections with their reason.

Text only (`meld.modality: text`): a clip is the utterance's text, for text encoders. Only the
annotation tables are read (from `annotations_dir`, `annotations_hub` or `root`; the 10.9 GB
tarball of videos is never fetched), every annotated utterance is a clip, and `path` names the
table its text was read from. The manifest stage checks no media and decode passes the rows on.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from affectlens.data.annotations import (AnnotationError, check_labels, find_dir, find_file, read_table,
                                         rejection, require_columns, to_int)
from affectlens.data.archive import extract
from affectlens.data.download import download, link_tree

log = logging.getLogger(__name__)

URL = "https://web.eecs.umich.edu/~mihalcea/downloads/MELD.Raw.tar.gz"
SPLITS = ("train", "dev", "test")
CLIP_FOLDERS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
EMOTIONS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
SENTIMENTS = ("neutral", "positive", "negative")
MODALITIES = ("audiovisual", "text")
COLUMNS = ("Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
           "Episode", "StartTime", "EndTime")
REQUIRED = ("Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "StartTime", "EndTime")
CLIP_NAME = re.compile(r"^dia(\d+)_utt(\d+)\.mp4$")
_TIME = re.compile(r"^(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})$")


@dataclass(frozen=True)
class Options:
    """`datasets.<name>.meld` in the config."""

    url: str = URL
    """Where the raw tarball is downloaded from."""
    sha256: str | None = None
    """Published sha256 of the tarball (none is published; the digest of what was fetched is recorded)."""
    archive: str | None = None
    """A local copy of MELD.Raw.tar.gz to extract instead of downloading."""
    root: str | None = None
    """A folder that already holds the extracted clip folders; nothing is downloaded."""
    annotations_dir: str | None = None
    """A folder holding {train,dev,test}_sent_emo.csv, used instead of the tables inside the tarball."""
    annotations_hub: str | None = None
    """A Hugging Face dataset with the published columns (e.g. TwinkStart/MELD), read through
    `datasets` instead of the tables inside the tarball."""
    annotations_hub_revision: str | None = None
    """The Hub dataset's commit to read (pins the annotations a study used)."""
    annotations_hub_splits: dict | None = None
    """Hub split name of each official split, where they differ (default: dev -> validation)."""
    splits: tuple[str, ...] = SPLITS
    """Official splits to include."""
    label: str = "emotion"
    """Which annotation is the class label: emotion (7 classes) or sentiment (3)."""
    modality: str = "audiovisual"
    """What a clip is: `audiovisual`, the utterance's video clip (audio decoded, frames sampled), or
    `text`, the utterance's text alone, read from the annotation tables (no clip is fetched)."""

    def __post_init__(self):
        object.__setattr__(self, "splits", tuple(self.splits))
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"meld.splits: {list(self.splits)} must be a non-empty subset of {list(SPLITS)}")
        if self.annotations_dir and self.annotations_hub:
            raise ValueError("meld.annotations_dir and meld.annotations_hub: give one source of annotations")
        if self.label not in ("emotion", "sentiment"):
            raise ValueError(f"meld.label: {self.label!r} must be 'emotion' or 'sentiment'")
        if self.modality not in MODALITIES:
            raise ValueError(f"meld.modality: {self.modality!r} must be one of {list(MODALITIES)}")
        if self.modality == "text" and not (self.annotations_dir or self.annotations_hub or self.root):
            raise ValueError("meld.modality text reads only the annotation tables: set meld.annotations_dir (a "
                             "folder with {train,dev,test}_sent_emo.csv), meld.annotations_hub or meld.root; the "
                             "tarball (meld.url, meld.archive) is 10.9 GB of video and is not fetched for text")


def text_only(opts: Options) -> bool:
    """Whether a clip is the utterance's text alone (`meld.modality: text`): no media to check or decode."""
    return opts.modality == "text"


def known_labels(opts: Options, key: str = "") -> tuple[str, ...]:
    """The labels of the manifest (its `label` column): MELD's emotions or sentiments (`meld.label`)."""
    return EMOTIONS if opts.label == "emotion" else SENTIMENTS


def fetch(raw_dir: Path, opts: Options, cache: Path) -> None:
    """Download (or take) the raw tarball and extract clips and tables into `raw_dir`."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    if opts.root:
        link_tree(opts.root, raw_dir / "MELD.Raw")
    elif not text_only(opts):
        archive = Path(opts.archive) if opts.archive else download(opts.url, cache / "MELD.Raw.tar.gz",
                                                                   sha256=opts.sha256)
        n = extract(archive, raw_dir, nested=True)
        log.info("extracted %d files of %s into %s", n, archive, raw_dir)
    if opts.annotations_dir:
        for split in opts.splits:
            src = Path(opts.annotations_dir) / f"{split}_sent_emo.csv"
            if not src.is_file():
                raise FileNotFoundError(f"meld.annotations_dir: {src} does not exist")
            (raw_dir / "annotations").mkdir(exist_ok=True)
            shutil.copyfile(src, raw_dir / "annotations" / src.name)
    if opts.annotations_hub:
        annotations_from_hub(opts.annotations_hub, raw_dir / "annotations", opts.splits,
                             opts.annotations_hub_revision, opts.annotations_hub_splits)


def annotations_from_hub(repo: str, out_dir: Path, splits=SPLITS, revision: str | None = None,
                         split_names: dict | None = None) -> list[Path]:
    """Write `{split}_sent_emo.csv` for each official split from a Hub dataset (id or local
    folder) that carries the published columns, so that the rest of the adapter reads them
    exactly as it reads the tarball's tables. Other columns (audio, paths) are dropped."""
    from datasets import load_dataset

    from affectlens.io import atomic_path

    names = {"dev": "validation", **(split_names or {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split in splits:
        name = names.get(split, split)
        try:
            ds = load_dataset(repo, split=name, revision=revision)
        except ValueError as e:  # an unknown split name
            raise AnnotationError(f"meld.annotations_hub {repo!r}: no split {name!r} for official split {split!r} "
                                  f"({e}); map it with meld.annotations_hub_splits") from None
        missing = [c for c in REQUIRED if c not in ds.column_names]
        if missing:
            raise AnnotationError(f"meld.annotations_hub {repo!r} split {name!r}: columns {missing} are missing "
                                  f"(it has {ds.column_names}); it must carry the published MELD columns")
        table = ds.select_columns([c for c in COLUMNS if c in ds.column_names]).to_pandas()
        with atomic_path(out_dir / f"{split}_sent_emo.csv") as tmp:
            table.to_csv(tmp, index=False, encoding="utf-8")
        written.append(out_dir / f"{split}_sent_emo.csv")
        log.info("%s split %s: %d annotation rows from the Hub", repo, name, len(table))
    return written


def parse_time(value: str) -> float:
    """`00:16:16,059` (SRT style, as MELD writes it) -> seconds; NaN when it does not parse."""
    m = _TIME.match(str(value).strip())
    if not m:
        return float("nan")
    h, mnt, s, ms = m.groups()
    return int(h) * 3600 + int(mnt) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


def read_annotations(path: str | Path) -> pd.DataFrame:
    """One published `{split}_sent_emo.csv`, checked: required columns present, labels known,
    ids integers, (Dialogue_ID, Utterance_ID) unique. Text is kept exactly as published."""
    path = Path(path)
    df = read_table(path)
    df.columns = [c.strip() for c in df.columns]
    require_columns(df, REQUIRED, path)
    df["Emotion"] = df["Emotion"].str.strip()
    df["Sentiment"] = df["Sentiment"].str.strip()
    check_labels(df["Emotion"], EMOTIONS, path, "Emotion")
    check_labels(df["Sentiment"], SENTIMENTS, path, "Sentiment")
    df["Dialogue_ID"] = to_int(df["Dialogue_ID"], path, "Dialogue_ID")
    df["Utterance_ID"] = to_int(df["Utterance_ID"], path, "Utterance_ID")
    dup = df.duplicated(["Dialogue_ID", "Utterance_ID"], keep=False)
    if dup.any():
        pairs = sorted(set(zip(df.loc[dup, "Dialogue_ID"], df.loc[dup, "Utterance_ID"])))[:5]
        raise AnnotationError(f"{path}: (Dialogue_ID, Utterance_ID) repeats for {pairs}; each utterance must "
                              "appear once")
    return df


def annotation_table(paths: dict[str, Path], dataset: str, label: str = "emotion") -> pd.DataFrame:
    """Manifest rows (without clip paths) for the given {split: csv}."""
    frames = []
    for split, path in paths.items():
        df = read_annotations(path)
        start = df["StartTime"].map(parse_time)
        end = df["EndTime"].map(parse_time)
        clip_id = "dia" + df["Dialogue_ID"].astype(str) + "_utt" + df["Utterance_ID"].astype(str)
        out = pd.DataFrame({
            "clip_id": split + "_" + clip_id,
            "dataset": dataset,
            "path": clip_id + ".mp4",  # relative to the split's clip folder until the clip is found
            "split": split,
            "label": df["Emotion"] if label == "emotion" else df["Sentiment"],
            "speaker": df["Speaker"].str.strip(),
            "pair_key": np.nan,
            "text": df["Utterance"],
            "start": np.nan,
            "end": np.nan,
            "duration": end - start,
            "emotion": df["Emotion"],
            "sentiment": df["Sentiment"],
            "dialogue_id": df["Dialogue_ID"],
            "utterance_id": df["Utterance_ID"],
            "season": df["Season"] if "Season" in df else np.nan,
            "episode": df["Episode"] if "Episode" in df else np.nan,
            "episode_start": start,
            "episode_end": end,
            "annotated_duration": end - start,
            "source_table": str(path),
        })
        frames.append(out)
    return pd.concat(frames, ignore_index=True)


def _tables(raw_dir: Path, splits) -> dict[str, Path]:
    out = {}
    for split in splits:
        name = f"{split}_sent_emo.csv"
        path = raw_dir / "annotations" / name
        if not path.is_file():
            path = find_file(raw_dir, name)
        if path is None:
            raise FileNotFoundError(f"{raw_dir}: no {name} found; MELD.Raw ships it, or set "
                                    "meld.annotations_dir to a folder that holds it")
        out[split] = path
    return out


def text_manifest(table: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """`meld.modality: text`: every annotated utterance with text is a clip whose `path` is the
    table it was read from; an utterance without text is rejected."""
    empty = table["text"].isna() | (table["text"].astype(str).str.strip() == "")
    rejections = [rejection(r.clip_id, r.source_table, f"no utterance text in {Path(r.source_table).name}")
                  for r in table[empty].itertuples()]
    manifest = table[~empty].assign(path=table["source_table"]).drop(columns=["source_table"])
    return manifest.reset_index(drop=True), rejections


def build_manifest(raw_dir: Path, dataset: str, opts: Options) -> tuple[pd.DataFrame, list[dict]]:
    """Manifest of every annotated utterance that has a clip (with `meld.modality: text`, of every
    annotated utterance), and rejections with reasons."""
    raw_dir = Path(raw_dir)
    table = annotation_table(_tables(raw_dir, opts.splits), dataset, opts.label)
    if text_only(opts):
        return text_manifest(table)
    rows, rejections = [], []
    for split in opts.splits:
        ann = table[table["split"] == split]
        folder = find_dir(raw_dir, CLIP_FOLDERS[split])
        clips: dict[str, Path] = {}
        if folder is None:
            log.warning("%s: no %s/ folder; every %s utterance is left out", raw_dir, CLIP_FOLDERS[split], split)
        else:
            for p in sorted(folder.iterdir()):
                if p.is_file() and CLIP_NAME.match(p.name):
                    clips[p.name] = p
                elif p.is_file():
                    rejections.append(rejection(f"{split}_{p.stem}", p, "file name is not dia{D}_utt{U}.mp4: "
                                                "not a MELD clip"))
        names = ann["path"]
        have = names.isin(clips.keys())
        for r in ann[~have].itertuples():
            where = f"{CLIP_FOLDERS[split]}/" if folder is not None else f"a missing {CLIP_FOLDERS[split]}/ folder"
            rejections.append(rejection(r.clip_id, folder / r.path if folder is not None else "",
                                        f"annotation without a clip: no {r.path} in {where} "
                                        f"({Path(r.source_table).name})"))
        found = ann[have].copy()
        found["path"] = [str(clips[n]) for n in found["path"]]
        rows.append(found)
        annotated = set(names)
        for name, p in clips.items():
            if name not in annotated:
                rejections.append(rejection(f"{split}_{p.stem}", p, f"clip without an annotation row in "
                                            f"{split}_sent_emo.csv"))
    manifest = pd.concat(rows, ignore_index=True).drop(columns=["source_table"])
    return manifest, rejections
