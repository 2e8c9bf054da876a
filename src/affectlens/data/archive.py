"""Safe extraction of tar (plain, gz, bz2, xz) and zip archives, nested ones included.

Every entry is checked before a byte of it is written: absolute paths, `..` components, symbolic
and hard links, and device or fifo entries are refused, so nothing can land outside the target.
Extraction goes to a hidden staging folder beside the target; only a complete, checked archive
is moved in, so a truncated archive or a refused entry leaves the target as it was.

Nested archives (MELD's raw tarball holds train/dev/test tarballs) are extracted in one pass
straight from the outer stream, into the folder where the inner archive sits, without writing
the inner archive to disk. macOS resource forks (`._name`, `__MACOSX/`) are skipped.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import io
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, Callable

CHUNK = 1 << 20
NESTED_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")


class ArchiveError(RuntimeError):
    """An archive that cannot be extracted (truncated, corrupt, unknown format); names the archive."""


class UnsafeArchiveError(ArchiveError):
    """An entry that would land outside the target or is a link/device; names the archive and entry."""


def is_nested_archive(name: str) -> bool:
    return name.lower().endswith(NESTED_SUFFIXES)


def is_mac_metadata(name: str) -> bool:
    """macOS resource forks (`._name`, `__MACOSX/`) that archivers made on a Mac carry: not data."""
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    return bool(parts) and (parts[-1].startswith("._") or parts[0] == "__MACOSX")


def safe_relative(name: str, archive: str) -> PurePosixPath | None:
    """The entry's path relative to the target, or raise UnsafeArchiveError. None for the root itself."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has an absolute path; refusing to extract "
                                 "an archive that writes outside its target")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: entry {name!r} climbs out of the target with '..'; "
                                 "refusing to extract it")
    if any("\x00" in p for p in parts):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} contains a NUL byte")
    return PurePosixPath(*parts) if parts else None


def _copy(src: IO[bytes], dest: Path, expected: int | None, archive: str, name: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(dest, "wb") as f:
        while block := src.read(CHUNK):
            f.write(block)
            n += len(block)
    if expected is not None and n != expected:
        raise ArchiveError(f"{archive}: entry {name!r} is truncated ({n} of {expected} bytes); "
                           "the archive is incomplete: delete it and download it again")


def _decompressed(stream: IO[bytes]) -> IO[bytes]:
    """Wrap a byte stream in the decompressor its magic number names (or return it as it is)."""
    buffered = stream if hasattr(stream, "peek") else io.BufferedReader(stream, CHUNK)
    head = buffered.peek(6)[:6]
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # verifies the CRC and length at the end
    if head[:3] == b"BZh":
        return bz2.BZ2File(buffered, mode="rb")
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(buffered, mode="rb")
    return buffered


def _drain(stream: IO[bytes]) -> None:
    # Reading to the end makes gzip/bz2/xz check their trailer: a cut-off archive fails here.
    while stream.read(CHUNK):
        pass


def _extract_tar_stream(stream: IO[bytes], base: Path, archive: str, nested: Callable[[str], bool]) -> int:
    count = 0
    data = _decompressed(stream)
    with tarfile.open(fileobj=data, mode="r|") as tar:
        for m in tar:
            count += _extract_entry(tar, m, base, archive, nested)
    _drain(data)
    return count


def _extract_entry(tar: tarfile.TarFile, m: tarfile.TarInfo, base: Path, archive: str,
                   nested: Callable[[str], bool]) -> int:
    rel = safe_relative(m.name, archive)
    if m.issym() or m.islnk():
        raise UnsafeArchiveError(f"{archive}: entry {m.name!r} is a {'symbolic' if m.issym() else 'hard'} link "
                                 f"(to {m.linkname!r}); links are refused so nothing lands outside the target")
    if not (m.isfile() or m.isdir()):
        raise UnsafeArchiveError(f"{archive}: entry {m.name!r} is a device, fifo or other special file; refused")
    if rel is None or is_mac_metadata(m.name):
        return 0
    dest = base / rel
    if m.isdir():
        dest.mkdir(parents=True, exist_ok=True)
        return 0
    f = tar.extractfile(m)
    if nested(m.name):
        return _extract_stream(f, dest.parent, f"{archive}!{m.name}", nested, m.name)
    _copy(f, dest, m.size, archive, m.name)
    return 1


def _extract_zip(zf: zipfile.ZipFile, base: Path, archive: str, nested: Callable[[str], bool]) -> int:
    count = 0
    for info in zf.infolist():
        rel = safe_relative(info.filename, archive)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeArchiveError(f"{archive}: entry {info.filename!r} is a symbolic link; links are refused "
                                     "so nothing lands outside the target")
        if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UnsafeArchiveError(f"{archive}: entry {info.filename!r} is a special file; refused")
        if rel is None or is_mac_metadata(info.filename):
            continue
        dest = base / rel
        if info.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        with zf.open(info) as f:
            if nested(info.filename):
                count += _extract_stream(f, dest.parent, f"{archive}!{info.filename}", nested, info.filename)
            else:
                _copy(f, dest, info.file_size, archive, info.filename)
                count += 1
    return count


def _extract_stream(stream: IO[bytes], base: Path, archive: str, nested: Callable[[str], bool],
                    name: str) -> int:
    """An archive inside an archive: tar streams straight through; zip needs a seekable copy."""
    if name.lower().endswith(".zip"):
        import tempfile

        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=base) as tmp:
            shutil.copyfileobj(stream, tmp, CHUNK)
            tmp.seek(0)
            with zipfile.ZipFile(tmp) as zf:
                return _extract_zip(zf, base, archive, nested)
    return _extract_tar_stream(stream, base, archive, nested)


def _merge_into(staging: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():
        dest = target / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.replace(entry, dest)


def extract(archive: str | Path, target: str | Path, nested: bool | Callable[[str], bool] = False) -> int:
    """Extract `archive` (tar, tar.gz/bz2/xz or zip) into `target`; returns the number of files written.

    `nested`: True extracts archives found inside (by suffix: .tar.gz, .zip, ...) in place of
    writing them; or a predicate on the entry name. Top-level entries of the archive replace
    same-named entries of `target`; nothing is moved in unless the whole archive was read and
    every entry passed the safety checks.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: no such archive")
    pred = nested if callable(nested) else (is_nested_archive if nested else (lambda _: False))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.extracting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        try:
            with open(archive, "rb") as f:
                magic = f.read(4)
            if magic == b"PK\x03\x04" and not zipfile.is_zipfile(archive):
                raise zipfile.BadZipFile("no end of central directory: the zip file is cut short")
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zf:
                    count = _extract_zip(zf, staging, str(archive), pred)
            else:
                with open(archive, "rb") as f:
                    count = _extract_tar_stream(f, staging, str(archive), pred)
        except UnsafeArchiveError:
            raise
        except ArchiveError:
            raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):  # the disk, not the archive
                raise ArchiveError(f"{archive}: cannot extract into {target}: {e.strerror or e} "
                                   f"(errno {errno.errorcode[e.errno]}); free space (or fix permissions) and rerun. "
                                   f"The archive itself may be fine; {target} was left as it was") from e
            raise ArchiveError(f"{archive}: truncated or corrupt archive ({type(e).__name__}: {e}); "
                               "delete it and download it again") from e
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError) as e:
            raise ArchiveError(f"{archive}: truncated or corrupt archive ({type(e).__name__}: {e}); "
                               "delete it and download it again") from e
        _merge_into(staging, target)
        return count
    finally:
        shutil.rmtree(staging, ignore_errors=True)
