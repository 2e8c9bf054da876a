"""DEAM (Aljanaki et al. 2017): 1802 songs with valence/arousal ratings, static and at 2 Hz.

Published layout (two zip archives):
    DEAM_audio.zip        MEMD_audio/{song_id}.mp3   (45 s excerpts; the 2015 songs are whole songs)
    DEAM_Annotations.zip  annotations/annotations averaged per song/
        song_level/static_annotations_averaged_songs_1_2000.csv
        song_level/static_annotations_averaged_songs_2000_2058.csv
            song_id, valence_mean, valence_std, arousal_mean, arousal_std, ...  (1-9 scale;
            the published headers carry a space after each comma)
        dynamic (per second annotations)/valence.csv, arousal.csv
            song_id, sample_15000ms, sample_15500ms, ...  ([-1, 1], 2 Hz from 15 s)
`read_ratings` gives the dynamic ones per manifest clip (affectlens.data.music.clip_ratings).

Manifest: one row per song with a static rating and an MP3 (or per window with `segment_s`);
label from valence/arousal (see affectlens.data.music; static midpoint 5, dynamic midpoint 0);
split as in MediaEval 2015: songs 1-2000 "train", 2001-2058 "test"; speaker = the song (DEAM's
songs are by distinct artists, and the artist table is not loaded).
No checksums are published: the sha256 of each archive fetched is recorded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from affectlens.data.annotations import (AnnotationError, find_dir, read_table, rejection, require_columns,
                                         to_float, to_int, walk)
from affectlens.data.archive import extract
from affectlens.data.download import download, link_tree
from affectlens.data.music import LABELS, clip_ratings, label_names, segments, va_label

log = logging.getLogger(__name__)

BASE_URL = "http://cvml.unige.ch/databases/DEAM"
STATIC_MIDPOINT = 5.0
DYNAMIC_MIDPOINT = 0.0
DYNAMIC_SCALE = "[-1, 1]"
LAST_TRAIN_SONG = 2000
_SAMPLE = re.compile(r"^sample_(\d+)ms$")


@dataclass(frozen=True)
class Options:
    """`datasets.<name>.deam` in the config."""

    audio_url: str = f"{BASE_URL}/DEAM_audio.zip"
    """Where the audio archive is downloaded from."""
    annotations_url: str = f"{BASE_URL}/DEAM_Annotations.zip"
    """Where the annotation archive is downloaded from."""
    audio_sha256: str | None = None
    """Published sha256 of the audio archive (none is published; the fetched digest is recorded)."""
    annotations_sha256: str | None = None
    """Published sha256 of the annotation archive (none is published; the fetched digest is recorded)."""
    audio_archive: str | None = None
    """A local copy of DEAM_audio.zip."""
    annotations_archive: str | None = None
    """A local copy of DEAM_Annotations.zip."""
    root: str | None = None
    """A folder that already holds MEMD_audio/ and annotations/; nothing is downloaded."""
    label: str = "quadrant"
    """Class label from the ratings: quadrant, valence or arousal."""
    segment_s: float | None = None
    """Cut songs into windows of this many seconds labelled by the dynamic ratings (null: whole song)."""

    def __post_init__(self):
        if self.label not in LABELS:
            raise ValueError(f"deam.label: {self.label!r} is not one of {LABELS}")


def known_labels(opts: Options, key: str = "") -> tuple[str, ...]:
    """The labels of the manifest (its `label` column): those of `deam.label`."""
    return label_names(opts.label)


def fetch(raw_dir: Path, opts: Options, cache: Path) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    if opts.root:
        link_tree(opts.root, raw_dir / "DEAM")
        return
    for url, sha, local, name in ((opts.annotations_url, opts.annotations_sha256, opts.annotations_archive,
                                   "DEAM_Annotations.zip"),
                                  (opts.audio_url, opts.audio_sha256, opts.audio_archive, "DEAM_audio.zip")):
        archive = Path(local) if local else download(url, cache / name, sha256=sha)
        extract(archive, raw_dir, nested=False)


def _candidates(raw_dir: Path, pattern: str) -> list[Path]:
    rx = re.compile(pattern)
    found = [d / f for d, _, fs in walk(raw_dir, max_depth=8) for f in fs if rx.match(f)]
    # The averaged tables, not the per-rater ones.
    return sorted(found, key=lambda p: ("averaged" not in str(p), len(p.parts), str(p)))


def read_static(paths: list[Path]) -> pd.DataFrame:
    frames = []
    for path in paths:
        df = read_table(path)
        df.columns = [c.strip() for c in df.columns]
        require_columns(df, ["song_id", "valence_mean", "arousal_mean"], path)
        out = pd.DataFrame({"song_id": to_int(df["song_id"], path, "song_id"),
                            "valence": to_float(df["valence_mean"], path, "valence_mean"),
                            "arousal": to_float(df["arousal_mean"], path, "arousal_mean")})
        for col in ("valence_std", "arousal_std"):
            if col in df:
                out[col] = to_float(df[col], path, col)
        frames.append(out)
    static = pd.concat(frames, ignore_index=True)
    dup = static["song_id"][static["song_id"].duplicated()]
    if len(dup):
        raise AnnotationError(f"{[str(p) for p in paths]}: song_id {sorted(set(dup))[:5]} rated twice")
    return static


def read_dynamic_table(path: Path, value: str) -> pd.DataFrame:
    """A wide dynamic table (song_id, sample_15000ms, ...) -> long rows song_id, time, value."""
    df = read_table(path)
    df.columns = [c.strip() for c in df.columns]
    require_columns(df, ["song_id"], path)
    times = {c: int(_SAMPLE.match(c).group(1)) / 1000 for c in df.columns if _SAMPLE.match(c)}
    if not times:
        raise AnnotationError(f"{path}: no sample_<ms>ms columns; is this a DEAM dynamic annotation table?")
    long = df.melt(id_vars=["song_id"], value_vars=list(times), var_name="column", value_name=value)
    long = long[long[value].str.strip() != ""]
    return pd.DataFrame({"song_id": to_int(long["song_id"], path, "song_id").to_numpy(),
                         "time": long["column"].map(times).to_numpy(),
                         value: to_float(long[value], path, value).to_numpy()})


def read_dynamic(raw_dir: Path, needed_by: str) -> dict[int, pd.DataFrame]:
    """{song_id: rows time, valence, arousal} from the dynamic valence.csv and arousal.csv (times
    where both are rated)."""
    found = {v: _candidates(Path(raw_dir), rf"^{v}\.csv$") for v in ("valence", "arousal")}
    for v, paths in found.items():
        if not paths:
            raise FileNotFoundError(f"{raw_dir}: no dynamic {v}.csv; {needed_by} needs DEAM's dynamic annotations "
                                    "(DEAM_Annotations.zip)")
    dyn = read_dynamic_table(found["valence"][0], "valence").merge(
        read_dynamic_table(found["arousal"][0], "arousal"), on=["song_id", "time"], how="inner")
    return {sid: g.sort_values("time").reset_index(drop=True) for sid, g in dyn.groupby("song_id")}


def read_ratings(raw_dir: Path, manifest: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The 2 Hz dynamic ratings of the manifest's clips (whole excerpts or segments), times from
    each clip's start, on DEAM's dynamic [-1, 1] scale: (table, clip ids without any rating)."""
    dynamic = {str(k): v for k, v in read_dynamic(raw_dir, "the dynamic ratings table").items()}
    return clip_ratings(manifest, dynamic, "song_id", DYNAMIC_SCALE)


def build_manifest(raw_dir: Path, dataset: str, opts: Options) -> tuple[pd.DataFrame, list[dict]]:
    raw_dir = Path(raw_dir)
    static_paths = _candidates(raw_dir, r"^static_annotations_averaged_songs_.*\.csv$")
    if not static_paths:
        raise FileNotFoundError(f"{raw_dir}: no static_annotations_averaged_songs_*.csv; is this DEAM_Annotations?")
    static = read_static(static_paths)
    audio = find_dir(raw_dir, "MEMD_audio", max_depth=8)
    if audio is None:
        raise FileNotFoundError(f"{raw_dir}: no MEMD_audio/ folder; is DEAM_audio.zip extracted?")
    rows, rejections = [], []
    for r in static.sort_values("song_id").to_dict("records"):
        sid = int(r["song_id"])
        path = audio / f"{sid}.mp3"
        if not path.is_file():
            rejections.append(rejection(f"deam_{sid}", path, f"rating without audio: no {sid}.mp3 in MEMD_audio/"))
            continue
        rows.append({
            "clip_id": f"deam_{sid}", "dataset": dataset, "path": str(path),
            "split": "train" if sid <= LAST_TRAIN_SONG else "test",
            "label": va_label(r["valence"], r["arousal"], STATIC_MIDPOINT, opts.label), "speaker": f"song_{sid}",
            "pair_key": np.nan, "text": np.nan, "start": np.nan, "end": np.nan, "duration": np.nan,
            "valence": r["valence"], "arousal": r["arousal"],
            "valence_std": r.get("valence_std", np.nan), "arousal_std": r.get("arousal_std", np.nan),
            "song_id": sid, "song_key": sid,
        })
    rated = set(static["song_id"])
    rejections += [rejection(f"deam_{p.stem}", p, "audio without a static rating")
                   for p in sorted(audio.glob("*.mp3")) if p.stem.isdigit() and int(p.stem) not in rated]
    manifest = pd.DataFrame(rows)
    if opts.segment_s:
        dynamic = read_dynamic(raw_dir, "segment_s")
        windows, missing = segments(manifest, dynamic, opts.segment_s, DYNAMIC_MIDPOINT, opts.label)
        rejections += [rejection(f"deam_{k}", "", "no dynamic rating to cut segments from") for k in missing]
        manifest = pd.DataFrame(windows, columns=list(manifest.columns) + ["song_valence", "song_arousal"])
    return manifest.drop(columns=["song_key"]), rejections
