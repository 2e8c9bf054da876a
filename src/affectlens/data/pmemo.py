"""PMEmo (Zhang et al. 2018): chorus excerpts of 794 pop songs with valence/arousal ratings.

Published layout (PMEmo2019):
    PMEmo2019/metadata.csv                         musicId, fileName, title, artist, album,
                                                   duration, chorus_start_time, chorus_end_time
    PMEmo2019/chorus/{fileName}                    the chorus MP3s ({musicId}.mp3)
    PMEmo2019/annotations/static_annotations.csv   musicId, Arousal(mean), Valence(mean)
    PMEmo2019/annotations/static_annotations_std.csv   musicId, Arousal(std), Valence(std)
    PMEmo2019/annotations/dynamic_annotations.csv  musicId, frameTime, Arousal(mean), Valence(mean)
Ratings are in [0, 1] (midpoint 0.5); dynamic ones at 2 Hz from 15 s into each chorus.
`read_ratings` gives the dynamic ones per manifest clip (affectlens.data.music.clip_ratings).

Manifest: one row per song with a static rating and a chorus file (or per window with
`segment_s`), label from valence/arousal (see affectlens.data.music), speaker = artist (songs
of one artist never straddle train and test), split "all" (PMEmo publishes none).
Songs listed in metadata.csv without a static rating, and ratings without a chorus file, are
listed in the rejections.

PMEmo is distributed by its authors on request/by link; give `url` (or `archive`/`root`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from affectlens.data.annotations import (find_dir, find_file, read_table, rejection, require_columns, to_float)
from affectlens.data.archive import extract
from affectlens.data.download import download, link_tree
from affectlens.data.music import LABELS, clip_ratings, label_names, segments, va_label

log = logging.getLogger(__name__)

MIDPOINT = 0.5
SCALE = "[0, 1]"  # static and dynamic ratings alike


@dataclass(frozen=True)
class Options:
    """`datasets.<name>.pmemo` in the config."""

    url: str | None = None
    """Where PMEmo2019.zip is downloaded from (null: use `archive` or `root`)."""
    sha256: str | None = None
    """Published sha256 of the archive, if any (else the digest of what was fetched is recorded)."""
    archive: str | None = None
    """A local copy of the PMEmo2019 zip archive."""
    root: str | None = None
    """A folder that already holds PMEmo2019/ (metadata.csv, chorus/, annotations/)."""
    label: str = "quadrant"
    """Class label from the ratings: quadrant, valence or arousal."""
    segment_s: float | None = None
    """Cut choruses into windows of this many seconds labelled by the dynamic ratings (null: whole chorus)."""

    def __post_init__(self):
        if self.label not in LABELS:
            raise ValueError(f"pmemo.label: {self.label!r} is not one of {LABELS}")


def known_labels(opts: Options, key: str = "") -> tuple[str, ...]:
    """The labels of the manifest (its `label` column): those of `pmemo.label`."""
    return label_names(opts.label)


def fetch(raw_dir: Path, opts: Options, cache: Path) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    if opts.root:
        link_tree(opts.root, raw_dir / "PMEmo2019")
        return
    if not (opts.archive or opts.url):
        raise ValueError("datasets.<name>.pmemo: set url (PMEmo2019.zip), archive (a local copy) or root "
                         "(an extracted PMEmo2019 folder); PMEmo is shared by its authors, not from a fixed URL")
    archive = Path(opts.archive) if opts.archive else download(opts.url, cache / "PMEmo2019.zip", sha256=opts.sha256)
    extract(archive, raw_dir, nested=False)


def _find(raw_dir: Path, name: str, required: bool = True) -> Path | None:
    path = find_file(raw_dir, name)
    if path is None and required:
        raise FileNotFoundError(f"{raw_dir}: no {name} found; is this the PMEmo2019 release?")
    return path


def read_dynamic(path: Path) -> dict[str, pd.DataFrame]:
    df = read_table(path)
    df.columns = [c.strip() for c in df.columns]
    require_columns(df, ["musicId", "frameTime", "Arousal(mean)", "Valence(mean)"], path)
    out = pd.DataFrame({"song_key": df["musicId"].str.strip(),
                        "time": to_float(df["frameTime"], path, "frameTime"),
                        "arousal": to_float(df["Arousal(mean)"], path, "Arousal(mean)"),
                        "valence": to_float(df["Valence(mean)"], path, "Valence(mean)")})
    return {k: g.sort_values("time").reset_index(drop=True) for k, g in out.groupby("song_key")}


def build_manifest(raw_dir: Path, dataset: str, opts: Options) -> tuple[pd.DataFrame, list[dict]]:
    raw_dir = Path(raw_dir)
    static_path = _find(raw_dir, "static_annotations.csv")
    static = read_table(static_path)
    static.columns = [c.strip() for c in static.columns]
    require_columns(static, ["musicId", "Arousal(mean)", "Valence(mean)"], static_path)
    static["musicId"] = static["musicId"].str.strip()
    static["valence"] = to_float(static["Valence(mean)"], static_path, "Valence(mean)")
    static["arousal"] = to_float(static["Arousal(mean)"], static_path, "Arousal(mean)")
    std_path = _find(raw_dir, "static_annotations_std.csv", required=False)
    if std_path is not None:
        std = read_table(std_path)
        std.columns = [c.strip() for c in std.columns]
        require_columns(std, ["musicId", "Arousal(std)", "Valence(std)"], std_path)
        std = std.set_index(std["musicId"].str.strip())
        static["valence_std"] = static["musicId"].map(to_float(std["Valence(std)"], std_path, "Valence(std)"))
        static["arousal_std"] = static["musicId"].map(to_float(std["Arousal(std)"], std_path, "Arousal(std)"))
    meta_path = _find(raw_dir, "metadata.csv")
    meta = read_table(meta_path)
    meta.columns = [c.strip() for c in meta.columns]
    require_columns(meta, ["musicId", "fileName"], meta_path)
    meta = meta.set_index(meta["musicId"].str.strip())
    chorus = find_dir(raw_dir, "chorus")
    if chorus is None:
        raise FileNotFoundError(f"{raw_dir}: no chorus/ folder; is this the PMEmo2019 release?")

    rejections = [rejection(f"pmemo_{mid}", "", f"song in {meta_path.name} without a static rating in "
                            f"{static_path.name}") for mid in meta.index if mid not in set(static["musicId"])]
    rows = []
    for r in static.to_dict("records"):
        mid = r["musicId"]
        m = meta.loc[mid] if mid in meta.index else None
        file_name = m["fileName"].strip() if m is not None and m["fileName"].strip() else f"{mid}.mp3"
        path = chorus / file_name
        if not path.is_file():
            rejections.append(rejection(f"pmemo_{mid}", path,
                                        f"rating without a chorus file: no {file_name} in chorus/"))
            continue
        artist = m["artist"].strip() if m is not None and "artist" in m and m["artist"].strip() else f"song_{mid}"
        rows.append({
            "clip_id": f"pmemo_{mid}", "dataset": dataset, "path": str(path), "split": "all",
            "label": va_label(r["valence"], r["arousal"], MIDPOINT, opts.label), "speaker": artist,
            "pair_key": np.nan, "text": np.nan, "start": np.nan, "end": np.nan, "duration": np.nan,
            "valence": r["valence"], "arousal": r["arousal"],
            "valence_std": r.get("valence_std", np.nan), "arousal_std": r.get("arousal_std", np.nan),
            "music_id": mid, "title": m["title"] if m is not None and "title" in m else np.nan,
            "artist": artist, "song_key": mid,
        })
    manifest = pd.DataFrame(rows)
    if opts.segment_s:
        dyn_path = _find(raw_dir, "dynamic_annotations.csv")
        windows, missing = segments(manifest, read_dynamic(dyn_path), opts.segment_s, MIDPOINT, opts.label)
        rejections += [rejection(f"pmemo_{k}", "", f"no dynamic rating in {dyn_path.name} to cut segments from")
                       for k in missing]
        manifest = pd.DataFrame(windows, columns=list(manifest.columns) + ["song_valence", "song_arousal"])
    return manifest.drop(columns=["song_key"]), rejections


def read_ratings(raw_dir: Path, manifest: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The 2 Hz dynamic ratings of the manifest's clips (whole choruses or segments), times from
    each clip's start, on PMEmo's [0, 1] scale: (table, clip ids without any rating)."""
    return clip_ratings(manifest, read_dynamic(_find(Path(raw_dir), "dynamic_annotations.csv")), "music_id", SCALE)
