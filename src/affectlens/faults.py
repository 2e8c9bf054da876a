"""Which failures a retry can fix, and how the ones it cannot are reported.

Rules with `retries:` ask for more memory on each attempt (`mem_mb`, workflow/rules/common.smk).
That helps a job the kernel or the scheduler killed for memory, and nothing else: a bad config, a
missing file or a full disk fails the same way every time. So each job records how its attempt
ended (`stages.common.logged` calls `record`), in a marker under `.snakemake/affectlens/attempts/`
named after the job's log:

    fatal    an error a retry cannot fix (our checks' ValueErrors, a missing file, a full or
             read-only disk, a missing package, a programming error): the next attempt stops at
             once with the same reason, asking for no more memory;
    memory   MemoryError or a CUDA/CPU "out of memory": the next attempt gets more memory;
    retry    anything else (a network error, a CUDA fault): retried with the same memory.

A job that leaves no marker was killed before it could write one (the out-of-memory killer, a
scheduler's memory limit, SIGKILL): the next attempt gets more memory. The main Snakemake process
empties the folder when it starts (`reset`), so a new run starts every job afresh; outside a
workflow (no folder) nothing is recorded.

A full or read-only disk ends a job with one line naming the path (`disk_message`), not a
traceback.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

ATTEMPTS = Path(".snakemake") / "affectlens" / "attempts"
"""Where each job's last attempt is recorded, relative to the workflow's working directory."""

DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}
_DISK_FIX = {errno.ENOSPC: "free space or point the output elsewhere",
             errno.EDQUOT: "free space or point the output elsewhere",
             errno.EROFS: "point the output elsewhere (run from a writable folder, or --directory DIR)",
             errno.EACCES: "fix the folder's permissions or point the output elsewhere"}

NOT_RETRYABLE = (ValueError, LookupError, TypeError, AttributeError, NotImplementedError, ImportError,
                 FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
"""Errors that a second attempt of the same job meets again: config and data checks (SettingsError,
ConfigError, SiteError, AnnotationError, ManifestError are ValueErrors), missing files and
packages, programming errors."""


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_error(exc: BaseException) -> OSError | None:
    """The OSError of a full, over-quota, read-only or unwritable disk behind `exc` (itself or
    what it was raised from), or None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e
    return None


def disk_message(e: OSError) -> str:
    """One line: `affectlens: cannot write PATH: no space left on device (free space or ...)`."""
    path = e.filename if e.filename is not None else "the output"
    return f"affectlens: cannot write {path}: {DISK_ERRNOS[e.errno]} ({_DISK_FIX[e.errno]})"


def classify(exc: BaseException) -> str:
    """`fatal`, `memory` or `retry` (see the module's docstring)."""
    if disk_error(exc) is not None:
        return "fatal"
    for e in _chain(exc):
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
                isinstance(e, RuntimeError) and "out of memory" in str(e).lower()):
            return "memory"
    if isinstance(exc, SystemExit):
        return "retry" if exc.code in (None, 0) else "fatal"
    return "fatal" if isinstance(exc, NOT_RETRYABLE) else "retry"


def reset(root: str | Path = ".") -> None:
    """A fresh record for a new run (the main Snakemake process, when the workflow is parsed)."""
    folder = Path(root) / ATTEMPTS
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)


def marker(log_path: str | Path) -> Path:
    """The marker of the job that logs to `log_path`."""
    parts = [p for p in Path(log_path).parts if p not in ("/", "..", ".")]
    return ATTEMPTS.joinpath(*parts).with_name(Path(log_path).name + ".attempt")


def last_attempt(log_path: str | Path) -> tuple[str, str] | None:
    """(kind, reason) of the job's previous attempt in this run, or None (none, or it was killed)."""
    try:
        kind, _, reason = marker(log_path).read_text(encoding="utf-8").partition("\t")
    except OSError:
        return None
    return kind, reason.strip()


def begin(log_path: str | Path) -> tuple[str, str] | None:
    """At the start of an attempt: the previous attempt's record, which is then cleared (an attempt
    that is killed leaves none)."""
    last = last_attempt(log_path)
    marker(log_path).unlink(missing_ok=True)
    return last


def record(log_path: str | Path, kind: str, reason: str) -> None:
    """Note how this attempt ended, inside a workflow's working directory (else nothing)."""
    if not ATTEMPTS.is_dir():
        return
    path = marker(log_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{kind}\t{' '.join(reason.split())}\n", encoding="utf-8")
    except OSError:  # the disk that failed the job may refuse this too: the retry then just runs
        pass


def mem_mb(base: int, attempt: int, log_path: str | Path) -> int:
    """Memory of an attempt: `base` × attempt after an attempt that ran out of memory or was killed
    without a word; `base` on the first attempt and after one that failed for another reason."""
    if attempt <= 1:
        return base
    last = last_attempt(log_path)
    return base * attempt if last is None or last[0] == "memory" else base
