"""URDU (Latif, Qayyum, Usman & Qadir 2018, "Cross Lingual Speech Emotion Recognition: Urdu vs.
Western Languages", arXiv 1812.10411): 400 utterances cut from Urdu television talk shows, natural
(not acted) speech, 100 per emotion in the folders Angry/, Happy/, Neutral/, Sad/.

Published in the authors' GitHub repository (siddiquelatif/URDU-Dataset, "for research purposes
only"), WAV files; `fetch` downloads the repository's archive (`url`; no checksum is published, so
the digest of what was fetched is recorded beside it, or give `sha256` to pin one) and extracts
it. `root` takes a folder that already holds the emotion folders instead (any audio format: WAV as
published, or FLAC).

File names `SGX_FYY_EZZ`: G = gender (M, F), X = speaker number (the same speaker in every emotion),
YY = the speaker's file number, E = emotion letter (A angry, H happy, N neutral, S sad),
ZZ = running number within the emotion. Speakers are very unbalanced (one says 80 of the 400
clips) and most say a single emotion, so speaker-grouped probes on URDU alone measure little
beyond speaker identity; it serves as a second, natural-speech corpus for transfer.

Manifest: label = emotion word (from the letter; a clip in another emotion's folder is an error
naming the file), speaker = `S{G}{X}` as in the name, sex, file_number; no pair_key (not parallel),
no text. Split (the corpus has none): speaker-disjoint, stratified by sex, as for RAVDESS.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from affectlens.data.annotations import AnnotationError, speaker_split
from affectlens.data.archive import extract
from affectlens.data.download import download, link_tree

log = logging.getLogger(__name__)

URL = "https://github.com/siddiquelatif/URDU-Dataset/archive/refs/heads/master.zip"
EMOTIONS = {"A": "angry", "H": "happy", "N": "neutral", "S": "sad"}
NAME = re.compile(r"^S([MF])(\d+)_F(\d+)_([A-Z])(\d+)$")
EXTENSIONS = (".wav", ".flac")


@dataclass(frozen=True)
class Options:
    """`datasets.<name>.urdu` in the config."""

    root: str | None = None
    """A folder that already holds the emotion folders (Angry/ ... or angry/ ...); nothing is downloaded."""
    url: str = URL
    """Where the authors' repository archive is downloaded from."""
    sha256: str | None = None
    """sha256 of that archive, to pin it (none is published; without it the digest fetched is recorded)."""
    emotions: tuple[str, ...] = tuple(EMOTIONS.values())
    """Emotion words to include."""
    test_fraction: float = 0.2
    """Share of speakers (per sex) in the test split."""
    dev_fraction: float = 0.1
    """Share of speakers (per sex) in the dev split."""
    split_seed: int = 0
    """Seed of the speaker order that assigns splits."""

    def __post_init__(self):
        object.__setattr__(self, "emotions", tuple(self.emotions))
        bad = [e for e in self.emotions if e not in EMOTIONS.values()]
        if bad or not self.emotions:
            raise ValueError(f"urdu.emotions: {bad or '[]'} not among {list(EMOTIONS.values())}")


def known_labels(opts: Options, key: str = "") -> tuple[str, ...]:
    """The labels of the manifest (its `label` column): the configured emotion words."""
    return tuple(opts.emotions)


def fetch(raw_dir: Path, opts: Options, cache: Path) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    if opts.root:
        if not Path(opts.root).is_dir():
            raise FileNotFoundError(f"datasets.<name>.urdu.root: {opts.root} is not a folder")
        link_tree(opts.root, raw_dir / "audio")
        return
    archive = download(opts.url, cache / "URDU-Dataset.zip", sha256=opts.sha256)
    n = extract(archive, raw_dir / "audio")
    log.info("extracted %d files of %s into %s", n, archive, raw_dir / "audio")


def parse_name(stem: str, source: str | Path) -> dict:
    """The fields of an URDU file name; errors name the file."""
    m = NAME.match(stem)
    if not m:
        raise AnnotationError(f"{source}: file name {stem!r} is not SGX_FYY_EZZ (e.g. SM1_F10_A010)")
    gender, speaker, number, emotion, running = m.groups()
    if emotion not in EMOTIONS:
        raise AnnotationError(f"{source}: unknown emotion letter {emotion!r} in file name {stem!r}; "
                              f"known: {sorted(EMOTIONS)}")
    return {"speaker": f"S{gender}{int(speaker)}", "sex": "male" if gender == "M" else "female",
            "file_number": int(number), "emotion": EMOTIONS[emotion], "running": int(running)}


def build_manifest(raw_dir: Path, dataset: str, opts: Options) -> tuple[pd.DataFrame, list[dict]]:
    audio = Path(raw_dir) / "audio"
    if not audio.is_dir():
        raise FileNotFoundError(f"{audio}: no audio folder; did the raw stage run?")
    return index(audio, dataset, opts), []


def index(audio: str | Path, dataset: str = "urdu", opts: Options = Options()) -> pd.DataFrame:
    """The manifest of the URDU clips anywhere below `audio` (e.g. its emotion folders)."""
    audio = Path(audio)
    files = sorted(p for p in audio.glob("**/*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    rows, seen = [], {}
    for p in files:
        f = parse_name(p.stem, p)
        folder = p.parent.name.lower()
        if folder in EMOTIONS.values() and folder != f["emotion"]:
            raise AnnotationError(f"{p}: the name says {f['emotion']} but the clip is in the {p.parent.name}/ folder")
        if f["emotion"] not in opts.emotions:
            continue
        if p.stem in seen:
            raise AnnotationError(f"{p}: clip {p.stem} appears twice (also {seen[p.stem]}); keep one format per clip")
        seen[p.stem] = p
        rows.append({"clip_id": p.stem, "dataset": dataset, "path": str(p), "split": "", "label": f["emotion"],
                     "speaker": f["speaker"], "pair_key": np.nan, "text": np.nan, "start": np.nan, "end": np.nan,
                     "duration": np.nan, "sex": f["sex"], "file_number": f["file_number"]})
    if not rows:
        raise FileNotFoundError(f"{audio}: no URDU clips (SGX_FYY_EZZ.wav/.flac) of emotions {list(opts.emotions)}")
    manifest = pd.DataFrame(rows)
    strata = dict(zip(manifest["speaker"], manifest["sex"]))
    splits = speaker_split(manifest["speaker"], opts.test_fraction, opts.dev_fraction, opts.split_seed, strata)
    manifest["split"] = manifest["speaker"].map(splits)
    return manifest
