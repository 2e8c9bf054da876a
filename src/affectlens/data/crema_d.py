"""CREMA-D (Cao et al. 2014): 91 actors say 12 sentences in 6 emotions, some at 3 intensities.

Published layout (the CheyneyComputerScience/CREMA-D repository, audio in Git LFS):
`AudioWAV/{ActorID}_{Sentence}_{Emotion}_{Level}.wav` with ActorID 1001-1091, Emotion one of
ANG DIS FEA HAP NEU SAD, Level LO MD HI or XX (unspecified); `SentenceFilenames.csv` lists the
7442 clips (`Stimulus_Number, Filename`), `VideoDemographics.csv` the actors
(`ActorID, Age, Sex, Race, Ethnicity`).

Checksums: every WAV is a Git LFS object, and its LFS pointer (`oid sha256:...`, `size N`) is the
published digest. Without a checksum table the pointers are fetched from `repo_url` (which
serves pointers, not objects) and each WAV from `media_url` is verified against its pointer; a
table (`name, sha256[, size]`, or sha256sum output) can be given instead
(`crema_d.checksums`), e.g. one written by `checksums_from_lfs_clone` from a clone made with
GIT_LFS_SKIP_SMUDGE=1.

Manifest: label = emotion word (angry, disgust, fearful, happy, neutral, sad), speaker = actor,
pair_key = actor + sentence (same actor and words, different emotion), text = the sentence.
Extras: emotion_code, sentence_code, level, intensity, sex, age.

Split (the corpus has none): speaker-disjoint and stratified by sex. Within each sex, actors are
ordered by sha256(f"{split_seed}:{ActorID}"); the first round(n * test_fraction) are test, the
next round(n * dev_fraction) dev, the rest train. Defaults 0.2 / 0.1 / seed 0.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from affectlens.data.annotations import AnnotationError, read_table, rejection, require_columns, speaker_split
from affectlens.data.download import (DownloadError, ChecksumError, Expected, download, link_or_copy, link_tree,
                                      parse_lfs_pointer, read_checksum_table, write_checksum_table)
from affectlens.io import write_text

log = logging.getLogger(__name__)

REPO_URL = "https://raw.githubusercontent.com/CheyneyComputerScience/CREMA-D/master"
MEDIA_URL = "https://media.githubusercontent.com/media/CheyneyComputerScience/CREMA-D/master"
EMOTIONS = {"ANG": "angry", "DIS": "disgust", "FEA": "fearful", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
LEVELS = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}
SENTENCES = {
    "IEO": "It's eleven o'clock.",
    "TIE": "That is exactly what happened.",
    "IOM": "I'm on my way to the meeting.",
    "IWW": "I wonder what this is about.",
    "TAI": "The airplane is almost full.",
    "MTI": "Maybe tomorrow it will be cold.",
    "IWL": "I would like a new alarm clock.",
    "ITH": "I think I have a doctor's appointment.",
    "DFA": "Don't forget a jacket.",
    "ITS": "I think I've seen this before.",
    "TSI": "The surface is slick.",
    "WSI": "We'll stop in a couple of minutes.",
}
NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
_LFS_PREFIX = b"version https://git-lfs.github.com/spec/"


@dataclass(frozen=True)
class Options:
    """`datasets.<name>.crema_d` in the config."""

    repo_url: str = REPO_URL
    """Base URL of the repository's plain files (tables, and the LFS pointers of the WAVs)."""
    media_url: str = MEDIA_URL
    """Base URL that serves the WAVs themselves (LFS objects)."""
    checksums: str | None = None
    """Checksum table (name, sha256[, size]); null = take each WAV's LFS pointer from repo_url."""
    root: str | None = None
    """A folder (e.g. a git-lfs clone) that already holds AudioWAV/; nothing is downloaded."""
    emotions: tuple[str, ...] = tuple(EMOTIONS)
    """Emotion codes to include."""
    test_fraction: float = 0.2
    """Share of actors (per sex) in the test split."""
    dev_fraction: float = 0.1
    """Share of actors (per sex) in the dev split."""
    split_seed: int = 0
    """Seed of the actor order that assigns splits."""
    download_jobs: int = 8
    """Files fetched in parallel."""

    def __post_init__(self):
        object.__setattr__(self, "emotions", tuple(self.emotions))
        bad = [e for e in self.emotions if e not in EMOTIONS]
        if bad or not self.emotions:
            raise ValueError(f"crema_d.emotions: {bad or '[]'} not among {list(EMOTIONS)}")


def is_lfs_pointer(path: Path) -> bool:
    if path.stat().st_size > 1024:
        return False
    with open(path, "rb") as f:
        return f.read(len(_LFS_PREFIX)) == _LFS_PREFIX


def checksums_from_lfs_clone(audio_dir: str | Path, out: str | Path) -> dict[str, Expected]:
    """A checksum table from the LFS pointer files of a clone made without the objects
    (GIT_LFS_SKIP_SMUDGE=1 git clone ...): {name: Expected(sha256, size)}, written to `out`."""
    table = {}
    for p in sorted(Path(audio_dir).glob("*.wav")):
        table[p.name] = parse_lfs_pointer(p.read_text(encoding="utf-8", errors="replace"), source=str(p))
    write_checksum_table(table, out)
    return table


def read_file_list(path: Path) -> list[str]:
    df = read_table(path)
    df.columns = [c.strip() for c in df.columns]
    require_columns(df, ["Filename"], path)
    return [n.strip() for n in df["Filename"] if n.strip()]


def known_labels(opts: Options, key: str = "") -> tuple[str, ...]:
    """The labels of the manifest (its `label` column): the words of the configured emotion codes."""
    return tuple(EMOTIONS[c] for c in opts.emotions)


def fetch(raw_dir: Path, opts: Options, cache: Path) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    if opts.root:
        root = Path(opts.root)
        audio = root / "AudioWAV" if (root / "AudioWAV").is_dir() else root
        link_tree(audio, raw_dir / "AudioWAV")
        for name in ("VideoDemographics.csv", "SentenceFilenames.csv"):
            if (root / name).is_file():
                link_or_copy(root / name, raw_dir / name)
        return
    tables = {name: download(f"{opts.repo_url}/{name}", cache / name)
              for name in ("SentenceFilenames.csv", "VideoDemographics.csv")}
    for name, path in tables.items():
        link_or_copy(path, raw_dir / name)
    names = [f"{n}.wav" for n in read_file_list(tables["SentenceFilenames.csv"])]
    if opts.checksums:
        table = read_checksum_table(opts.checksums)
    else:
        table = _lfs_checksums(names, opts, cache)
    failures = _download_audio(names, table, opts, cache, raw_dir)
    write_checksum_table({n: table[n] for n in names if n in table}, raw_dir / "checksums.tsv")
    write_text(raw_dir / "download_failures.tsv",
               "name\treason\n" + "".join(f"{n}\t{r}\n" for n, r in sorted(failures.items())))


def _parallel(fn, items, jobs: int) -> list:
    from concurrent.futures import ThreadPoolExecutor

    if jobs <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(fn, items))


def _lfs_checksums(names: list[str], opts: Options, cache: Path) -> dict[str, Expected]:
    def one(name):
        try:
            p = download(f"{opts.repo_url}/AudioWAV/{name}", cache / "lfs-pointers" / name)
        except DownloadError as e:
            log.warning("no LFS pointer for %s (%s): it is fetched unverified", name, e)
            return name, None
        return name, parse_lfs_pointer(p.read_text(encoding="utf-8", errors="replace"), source=f"{p} ({name})")

    return {n: e for n, e in _parallel(one, names, opts.download_jobs) if e is not None}


def _download_audio(names, table, opts: Options, cache: Path, raw_dir: Path) -> dict[str, str]:
    """Fetch and verify every WAV; a file that cannot be fetched is recorded, a checksum mismatch stops."""

    def one(name):
        exp = table.get(name, Expected())
        try:
            p = download(f"{opts.media_url}/AudioWAV/{name}", cache / "AudioWAV" / name, sha256=exp.sha256,
                         size=exp.size, retries=3)
        except ChecksumError:
            raise
        except DownloadError as e:
            return name, str(e)
        link_or_copy(p, raw_dir / "AudioWAV" / name)
        return name, None

    return {n: r for n, r in _parallel(one, names, opts.download_jobs) if r is not None}


def parse_name(stem: str, source: str | Path) -> dict:
    m = NAME.match(stem)
    if not m:
        raise AnnotationError(f"{source}: file name {stem!r} is not ActorID_Sentence_Emotion_Level "
                              "(e.g. 1001_DFA_ANG_XX)")
    actor, sentence, emotion, level = m.groups()
    for value, known, what in ((sentence, SENTENCES, "sentence"), (emotion, EMOTIONS, "emotion"),
                               (level, LEVELS, "level")):
        if value not in known:
            raise AnnotationError(f"{source}: unknown {what} code {value!r} in file name {stem!r} "
                                  f"(field {what}); known: {sorted(known)}")
    return {"actor": actor, "sentence": sentence, "emotion": emotion, "level": level}


def _demographics(raw_dir: Path) -> pd.DataFrame | None:
    path = raw_dir / "VideoDemographics.csv"
    if not path.is_file():
        return None
    df = read_table(path)
    df.columns = [c.strip() for c in df.columns]
    require_columns(df, ["ActorID", "Sex"], path)
    return df.set_index(df["ActorID"].str.strip())


def build_manifest(raw_dir: Path, dataset: str, opts: Options) -> tuple[pd.DataFrame, list[dict]]:
    raw_dir = Path(raw_dir)
    audio = raw_dir / "AudioWAV"
    if not audio.is_dir():
        raise FileNotFoundError(f"{audio}: no AudioWAV/ folder; did the raw stage run?")
    files = sorted(p for p in audio.iterdir() if p.is_file() and p.suffix.lower() == ".wav")
    rejections = []
    failures = {}
    if (raw_dir / "download_failures.tsv").is_file():
        failures = dict(read_table(raw_dir / "download_failures.tsv", sep="\t")[["name", "reason"]].values)
    listed = raw_dir / "SentenceFilenames.csv"
    if listed.is_file():
        present = {p.stem for p in files}
        for stem in read_file_list(listed):
            if stem not in present:
                reason = failures.get(f"{stem}.wav")
                rejections.append(rejection(stem, audio / f"{stem}.wav", f"download failed: {reason}" if reason else
                                            "listed in SentenceFilenames.csv but no file in AudioWAV/"))
    demo = _demographics(raw_dir)
    rows = []
    for p in files:
        f = parse_name(p.stem, p)
        if f["emotion"] not in opts.emotions:
            continue
        if is_lfs_pointer(p):
            rejections.append(rejection(p.stem, p, "a Git LFS pointer, not audio: the clone was made without "
                                        "the LFS objects (run `git lfs pull`)"))
            continue
        sex = demo["Sex"].get(f["actor"], np.nan) if demo is not None else np.nan
        age = demo["Age"].get(f["actor"], np.nan) if demo is not None and "Age" in demo else np.nan
        rows.append({
            "clip_id": p.stem, "dataset": dataset, "path": str(p), "split": "",
            "label": EMOTIONS[f["emotion"]], "speaker": f["actor"], "pair_key": f"{f['actor']}_{f['sentence']}",
            "text": SENTENCES[f["sentence"]], "start": np.nan, "end": np.nan, "duration": np.nan,
            "emotion_code": f["emotion"], "sentence_code": f["sentence"], "level": f["level"],
            "intensity": LEVELS[f["level"]], "sex": sex, "age": age,
        })
    if not rows:
        raise FileNotFoundError(f"{audio}: no CREMA-D clips of emotions {list(opts.emotions)}")
    manifest = pd.DataFrame(rows)
    strata = {spk: sex if isinstance(sex, str) else "" for spk, sex in zip(manifest["speaker"], manifest["sex"])}
    splits = speaker_split(manifest["speaker"], opts.test_fraction, opts.dev_fraction, opts.split_seed, strata)
    manifest["split"] = manifest["speaker"].map(splits)
    return manifest, rejections
