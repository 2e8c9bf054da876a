"""Atomic file writes: write to a hidden temp name in the same folder, then os.replace.

A killed job then leaves either the old file or the new one, never half a file that a rerun (or
Snakemake) would take for finished output. Same folder = same filesystem, so the rename is atomic.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import numpy as np


def _temp_name(path: Path) -> Path:
    # Keep the suffix last so libraries that infer the format from the name still work.
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial{path.suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write to; it becomes `path` when the block ends without error. An
    OSError that names no file (a write to a full disk) is given `path`, so its message says what
    could not be written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """`open()` that only publishes the file when the block ends without error."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | Path, obj, indent: int | None = 2, default=None) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=False, default=default)
        f.write("\n")


def write_audio(path: str | Path, samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write [sample] or [sample, channel] audio; the format (FLAC, WAV, ...) comes from the suffix."""
    import soundfile as sf

    path = Path(path)
    fmt = path.suffix.lstrip(".").upper()
    if fmt not in sf.available_formats():
        raise ValueError(f"cannot write audio to {path}: unknown format {fmt!r}; use .flac or .wav")
    with atomic_path(path) as tmp:
        sf.write(tmp, samples, sample_rate, subtype=subtype, format=fmt)
