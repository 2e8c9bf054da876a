"""Cheap listings of a user's data (names, sizes, modification times; the bytes of small tables),
summed up in one line that the workflow's `raw` rule takes as a parameter: when the data changes,
the line changes, and Snakemake reruns the dataset's jobs (and only them). No audio is read."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable


def file_entry(path: str | Path, name: str) -> tuple:
    """(name, size, mtime in ns) of a file, links followed; (name, "missing") when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return (name, "missing")
    return (name, st.st_size, st.st_mtime_ns)


def content_entry(path: str | Path, name: str) -> tuple:
    """(name, sha256 of the bytes) of a small file such as an annotation table."""
    try:
        return (name, hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest())
    except OSError:
        return (name, "missing")


def summary(entries: Iterable[tuple]) -> str:
    """One line: how many entries, their bytes, and a digest of them all (order as given)."""
    h = hashlib.sha256()
    n = size = 0
    for entry in entries:
        n += 1
        size += entry[1] if len(entry) == 3 and isinstance(entry[1], int) else 0
        h.update(repr(tuple(os.fsencode(x) if isinstance(x, str) else x for x in entry)).encode())
    return f"{n} entries, {size} bytes, sha256 {h.hexdigest()[:16]}"
