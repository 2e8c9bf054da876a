"""Helpers every dataset adapter shares: reading published tables, checking their columns and
labels with errors that name the file and column, finding files in extracted trees, and the
speaker-disjoint split."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd

log = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """A published annotation file that breaks its documented layout; names the file and column."""


def options(cls, values: Mapping | None, key: str):
    """Build an options dataclass from a config mapping; unknown keys name the config key at fault
    (`models.config.build_section`, as every config section is built)."""
    from affectlens.models.config import build_section

    return build_section(cls, values, key)


def read_text(path: str | Path, encodings: Sequence[str] = ("utf-8-sig", "cp1252")) -> str:
    """A text file decoded with the first encoding that fits (UTF-8, else Windows-1252, as some
    annotation tables were saved); the text is kept exactly as published."""
    data = Path(path).read_bytes()
    for i, enc in enumerate(encodings):
        try:
            text = data.decode(enc)
        except UnicodeDecodeError:
            continue
        if i:
            log.warning("%s is not UTF-8; read it as %s", path, enc)
        return text
    raise AnnotationError(f"{path}: cannot be decoded as any of {list(encodings)}")


def read_table(path: str | Path, sep: str | None = ",") -> pd.DataFrame:
    """A CSV read as strings: no cell is turned into NaN (an utterance "NA" stays "NA")."""
    path = Path(path)
    try:
        return pd.read_csv(io.StringIO(read_text(path)), sep=sep, dtype=str, keep_default_na=False,
                           engine="python" if sep is None else "c")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise AnnotationError(f"{path}: not a readable table ({e})") from e


def require_columns(df: pd.DataFrame, columns: Iterable[str], source: str | Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AnnotationError(f"{source}: missing required column(s) {missing}; the file has {list(df.columns)}. "
                              "Is this the published file, unmodified?")


def check_labels(values: pd.Series, known: Iterable[str], source: str | Path, column: str) -> None:
    known = set(known)
    bad = values[~values.isin(known)]
    if len(bad):
        shown = sorted(set(bad.astype(str)))[:10]
        rows = bad.index[:5].tolist()
        raise AnnotationError(f"{source}: column {column!r} has unknown value(s) {shown} (rows {rows}); "
                              f"known values: {sorted(known)}")


def to_int(values: pd.Series, source: str | Path, column: str) -> pd.Series:
    out = pd.to_numeric(values.str.strip(), errors="coerce")
    bad = out.isna() | (out != out.round())
    if bad.any():
        raise AnnotationError(f"{source}: column {column!r} must hold integers; bad value(s) "
                              f"{values[bad].head(5).tolist()} in rows {values.index[bad][:5].tolist()}")
    return out.astype(int)


def to_float(values: pd.Series, source: str | Path, column: str) -> pd.Series:
    out = pd.to_numeric(values.astype(str).str.strip(), errors="coerce")
    bad = out.isna() & (values.astype(str).str.strip() != "")
    if bad.any():
        raise AnnotationError(f"{source}: column {column!r} must hold numbers; bad value(s) "
                              f"{values[bad].head(5).tolist()} in rows {values.index[bad][:5].tolist()}")
    return out.astype(float)


def walk(root: str | Path, max_depth: int = 6, warn: bool = True):
    """(dirpath, dirnames, filenames) under `root`, following symlinks (a linked dataset folder),
    each real folder once: a link to a folder that is listed at its own place under `root`, or was
    already reached through another link (a loop back to an ancestor included), is skipped (with a
    warning, unless `warn` is false)."""
    root = Path(root)
    base = len(root.parts)
    real_dirs = {os.path.realpath(d) for d, _, _ in os.walk(root)}  # without following links
    seen = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        depth = len(Path(dirpath).parts) - base
        keep = []
        for d in sorted(dirnames) if depth < max_depth else []:
            full = os.path.join(dirpath, d)
            real = os.path.realpath(full)
            if d.startswith(".") or real in seen or (os.path.islink(full) and real in real_dirs):
                if warn and not d.startswith("."):
                    log.warning("%s: a link to %s, which is listed once already; skipped", full, real)
                continue
            seen.add(real)
            keep.append(d)
        dirnames[:] = keep
        yield Path(dirpath), dirnames, sorted(filenames)


def find_dir(root: str | Path, name: str, max_depth: int = 6) -> Path | None:
    """The shallowest folder called `name` under `root` (inclusive), or None."""
    root = Path(root)
    if root.name == name and root.is_dir():
        return root
    for dirpath, dirnames, _ in walk(root, max_depth):
        if name in dirnames:
            return dirpath / name
    return None


def find_file(root: str | Path, name: str, max_depth: int = 6) -> Path | None:
    """The shallowest file called `name` under `root`, or None."""
    for dirpath, _, filenames in walk(root, max_depth):
        if name in filenames:
            return dirpath / name
    return None


def speaker_split(speakers: Iterable[str], test_fraction: float, dev_fraction: float, seed: int,
                  strata: Mapping[str, str] | None = None) -> dict[str, str]:
    """{speaker: "train" | "dev" | "test"}, every speaker in exactly one split.

    Within each stratum (e.g. sex), speakers are ordered by sha256(f"{seed}:{speaker}"); the first
    round(n * test_fraction) go to test, the next round(n * dev_fraction) to dev, the rest to train.
    The order depends on the speaker id only, so adding a speaker never moves another one.
    """
    if not 0 <= test_fraction < 1 or not 0 <= dev_fraction < 1 or test_fraction + dev_fraction >= 1:
        raise ValueError(f"split fractions test={test_fraction}, dev={dev_fraction} must be in [0, 1) and sum < 1")
    groups: dict[str, list[str]] = {}
    for spk in sorted(set(speakers)):
        groups.setdefault((strata or {}).get(spk, ""), []).append(spk)
    out = {}
    for members in groups.values():
        members.sort(key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
        n_test, n_dev = round(len(members) * test_fraction), round(len(members) * dev_fraction)
        for i, spk in enumerate(members):
            out[spk] = "test" if i < n_test else "dev" if i < n_test + n_dev else "train"
    return out


def rejection(clip_id: str, path, reason: str, **extra) -> dict:
    return {"clip_id": str(clip_id), "path": "" if path is None else str(path), "reason": reason, **extra}
