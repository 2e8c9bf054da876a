"""RAVDESS speech (Livingstone & Russo 2018): 24 actors say two statements in 8 emotions.

Published on Zenodo (record 1188976) as `Audio_Speech_Actors_01-24.zip` (1440 WAV files,
48 kHz, folders `Actor_01/` .. `Actor_24/`). Zenodo publishes an MD5 per file in the record's
metadata (`/api/records/1188976`): `fetch` reads it there, downloads the zip (resumable), and
stops on a mismatch naming the file and both digests. `root` takes a folder that already holds
the `Actor_NN/` folders instead (any audio format: WAV as published, or FLAC).

File names `MM-VV-EE-II-SS-RR-AA`: modality (01 audio-video, 02 video-only, 03 audio-only),
vocal channel (01 speech, 02 song), emotion (01 neutral, 02 calm, 03 happy, 04 sad, 05 angry,
06 fearful, 07 disgust, 08 surprised), intensity (01 normal, 02 strong; neutral has only
normal), statement (01 "Kids are talking by the door", 02 "Dogs are sitting by the door"),
repetition (01, 02), actor (01-24; odd = male, even = female).

Manifest: label = emotion word, speaker = actor, pair_key = actor + statement + intensity +
repetition (the same words, take and intensity in another emotion: every clip has partners),
text = the statement. Extras: emotion_code, statement, intensity, repetition, sex.
Only audio-only speech files (modality 03, channel 01) are indexed; others are skipped.

Split (the corpus has none): speaker-disjoint and stratified by sex, as for CREMA-D; with 24
actors the defaults 0.2 / 0.1 give 2+2 test and 1+1 dev actors. Probes on `splits: official`
use it; the RAVDESS study cross-validates over actors instead, and steering holds out each
steered clip's actor on its own.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from affectlens.data.annotations import AnnotationError, speaker_split
from affectlens.data.archive import extract
from affectlens.data.download import ChecksumError, DownloadError, download, file_digest, link_tree, sidecar_path

log = logging.getLogger(__name__)

ZENODO_API = "https://zenodo.org/api"
RECORD = "1188976"
ARCHIVE = "Audio_Speech_Actors_01-24.zip"
EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
            "07": "disgust", "08": "surprised"}
STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}
INTENSITIES = {"01": "normal", "02": "strong"}
NAME = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")
EXTENSIONS = (".wav", ".flac")


@dataclass(frozen=True)
class Options:
    """`datasets.<name>.ravdess` in the config."""

    root: str | None = None
    """A folder that already holds Actor_NN/ folders of speech clips; nothing is downloaded."""
    api_url: str = ZENODO_API
    """Zenodo API base; the record's metadata gives the archive's URL and MD5."""
    record: str = RECORD
    """Zenodo record id of the audio-only speech archive."""
    archive: str = ARCHIVE
    """File name of the archive inside the record."""
    actors: tuple[int, ...] | None = None
    """Actor numbers to include (1-24); null = all."""
    emotions: tuple[str, ...] = tuple(EMOTIONS.values())
    """Emotion words to include."""
    test_fraction: float = 0.2
    """Share of actors (per sex) in the test split."""
    dev_fraction: float = 0.1
    """Share of actors (per sex) in the dev split."""
    split_seed: int = 0
    """Seed of the actor order that assigns splits."""

    def __post_init__(self):
        object.__setattr__(self, "emotions", tuple(self.emotions))
        bad = [e for e in self.emotions if e not in EMOTIONS.values()]
        if bad or not self.emotions:
            raise ValueError(f"ravdess.emotions: {bad or '[]'} not among {list(EMOTIONS.values())}")
        if self.actors is not None:
            object.__setattr__(self, "actors", tuple(int(a) for a in self.actors))
            out = [a for a in self.actors if not 1 <= a <= 24]
            if out or not self.actors:
                raise ValueError(f"ravdess.actors: {out or '[]'} not within 1..24")


def zenodo_file(api_url: str, record: str, name: str, cache: Path) -> tuple[str, str | None, int | None]:
    """(download URL, md5 or None, size or None) of file `name` in a Zenodo record's metadata."""
    meta_path = download(f"{api_url.rstrip('/')}/records/{record}", cache / f"zenodo-{record}.json")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        meta_path.unlink()
        sidecar_path(meta_path).unlink(missing_ok=True)
        raise DownloadError(f"{api_url}/records/{record}: not JSON ({e}); is ravdess.api_url a Zenodo API?") from None
    files = meta.get("files") or []
    for f in files:
        if (f.get("key") or f.get("filename")) == name:
            links = f.get("links") or {}
            url = links.get("self") or links.get("download") or links.get("content")
            checksum = f.get("checksum") or ""
            md5 = checksum.split(":", 1)[1] if checksum.startswith("md5:") else None
            return url, md5, f.get("size") or f.get("filesize")
    raise DownloadError(f"{api_url}/records/{record}: no file {name!r} in the record "
                        f"(files: {[f.get('key') or f.get('filename') for f in files]})")


def known_labels(opts: Options, key: str = "") -> tuple[str, ...]:
    """The labels of the manifest (its `label` column): the configured emotion words."""
    return tuple(opts.emotions)


def fetch(raw_dir: Path, opts: Options, cache: Path) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    if opts.root:
        if not Path(opts.root).is_dir():
            raise FileNotFoundError(f"datasets.<name>.ravdess.root: {opts.root} is not a folder")
        link_tree(opts.root, raw_dir / "audio")
        return
    url, md5, size = zenodo_file(opts.api_url, opts.record, opts.archive, cache)
    archive = download(url, cache / opts.archive, size=size)
    if md5 is not None:
        actual = file_digest(archive, "md5")
        if actual != md5:
            archive.unlink()
            sidecar_path(archive).unlink(missing_ok=True)
            raise ChecksumError(f"{archive.name} from {url}: md5 {actual}, but Zenodo record {opts.record} "
                                f"publishes {md5}; the file was removed, rerun to fetch it again")
    else:
        log.warning("Zenodo record %s publishes no md5 for %s: recorded its sha256 instead", opts.record, opts.archive)
    n = extract(archive, raw_dir / "audio")
    log.info("extracted %d files of %s into %s", n, archive, raw_dir / "audio")


def parse_name(stem: str, source: str | Path) -> dict | None:
    """The fields of a RAVDESS file name; None for files that are not audio-only speech."""
    m = NAME.match(stem)
    if not m:
        raise AnnotationError(f"{source}: file name {stem!r} is not MM-VV-EE-II-SS-RR-AA (e.g. 03-01-05-02-01-01-12)")
    modality, channel, emotion, intensity, statement, repetition, actor = m.groups()
    if (modality, channel) != ("03", "01"):
        return None
    for value, known, what in ((emotion, EMOTIONS, "emotion"), (intensity, INTENSITIES, "intensity"),
                               (statement, STATEMENTS, "statement"), (repetition, ("01", "02"), "repetition")):
        if value not in known:
            raise AnnotationError(f"{source}: unknown {what} code {value!r} in file name {stem!r}; "
                                  f"known: {sorted(known)}")
    if not 1 <= int(actor) <= 24:
        raise AnnotationError(f"{source}: actor {actor} in file name {stem!r} is not within 01..24")
    return {"emotion": emotion, "intensity": intensity, "statement": statement, "repetition": repetition,
            "actor": int(actor)}


def build_manifest(raw_dir: Path, dataset: str, opts: Options) -> tuple[pd.DataFrame, list[dict]]:
    audio = Path(raw_dir) / "audio"
    if not audio.is_dir():
        raise FileNotFoundError(f"{audio}: no audio folder; did the raw stage run?")
    return index(audio, dataset, opts), []


def index(audio: str | Path, dataset: str = "ravdess", opts: Options = Options()) -> pd.DataFrame:
    """The manifest of the RAVDESS speech clips anywhere below `audio` (e.g. its Actor_NN/ folders)."""
    audio = Path(audio)
    files = sorted(p for p in audio.glob("**/*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    rows, seen = [], {}
    for p in files:
        f = parse_name(p.stem, p)
        if f is None or EMOTIONS[f["emotion"]] not in opts.emotions:
            continue
        if opts.actors is not None and f["actor"] not in opts.actors:
            continue
        if p.stem in seen:
            raise AnnotationError(f"{p}: clip {p.stem} appears twice (also {seen[p.stem]}); keep one format per clip")
        seen[p.stem] = p
        actor = f"actor{f['actor']:02d}"
        rows.append({
            "clip_id": p.stem, "dataset": dataset, "path": str(p), "split": "",
            "label": EMOTIONS[f["emotion"]], "speaker": actor,
            "pair_key": f"{actor}_s{f['statement']}_i{f['intensity']}_r{f['repetition']}",
            "text": STATEMENTS[f["statement"]], "start": np.nan, "end": np.nan, "duration": np.nan,
            "emotion_code": f["emotion"], "statement": f["statement"], "intensity": INTENSITIES[f["intensity"]],
            "repetition": int(f["repetition"]), "sex": "male" if f["actor"] % 2 else "female",
        })
    if not rows:
        raise FileNotFoundError(f"{audio}: no RAVDESS audio-only speech clips (03-01-*) of emotions "
                                f"{list(opts.emotions)}" + (f" and actors {list(opts.actors)}" if opts.actors else ""))
    manifest = pd.DataFrame(rows)
    strata = dict(zip(manifest["speaker"], manifest["sex"]))
    splits = speaker_split(manifest["speaker"], opts.test_fraction, opts.dev_fraction, opts.split_seed, strata)
    manifest["split"] = manifest["speaker"].map(splits)
    return manifest
