"""Serving files from inside the results folder only."""

from __future__ import annotations

import mimetypes
from pathlib import Path

# What the page may fetch: figures, audio, tables and the HTML pages the workflow writes.
SERVED_SUFFIXES = {".png", ".svg", ".jpg", ".jpeg", ".wav", ".flac", ".mp3", ".ogg", ".tsv", ".csv", ".json",
                   ".html", ".txt"}
MIME = {".tsv": "text/tab-separated-values; charset=utf-8", ".flac": "audio/flac", ".wav": "audio/wav",
        ".json": "application/json"}


def resolve_inside(root: str | Path, relpath: str) -> Path | None:
    """The file `relpath` names under `root`, or None when it is not a served file inside `root`:
    absolute paths, `..`, symbolic links that lead out, folders and other suffixes all give None."""
    root = Path(root).resolve()
    if not relpath or "\x00" in relpath or "\\" in relpath or relpath.startswith("/"):
        return None
    parts = relpath.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    try:
        path = (root / relpath).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(root) or not path.is_file() or path.suffix.lower() not in SERVED_SUFFIXES:
        return None
    return path


def mime_type(path: Path) -> str:
    return MIME.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
