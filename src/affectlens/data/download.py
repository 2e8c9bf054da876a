"""Downloads that resume, retry and verify, and never leave half a file under the final name.

`download(url, dest)` streams into `dest.part`, resuming with an HTTP Range request after a
dropped connection (and across runs: the `.part` stays in the download cache), then checks the
size the server announced and the sha256: against the published digest when there is one, else
the digest of what was fetched is recorded. Only then is `.part` renamed to `dest`, and a sidecar
`dest.sha256.json` (url, sha256, size, whether the digest was published) marks it complete, so a
rerun skips the file without hashing it again.

http(s):// and file:// URLs and plain local paths are accepted (the last two are copied).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from affectlens.io import write_json

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# Errors of the local disk, not of the transfer: retrying cannot help, so they stop at once.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(RuntimeError):
    """A file that could not be fetched; the message names the URL and what to do."""


class ChecksumError(DownloadError):
    """The fetched bytes are not the published ones; the message names file, expected and actual digest."""


@dataclass(frozen=True)
class Expected:
    """What a file should be, where published: sha256 (hex) and/or size in bytes."""

    sha256: str | None = None
    size: int | None = None

    def __post_init__(self):
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise ValueError(f"not a sha256 hex digest: {self.sha256!r}")


def sidecar_path(dest: str | Path) -> Path:
    dest = Path(dest)
    return dest.with_name(dest.name + ".sha256.json")


def part_path(dest: str | Path) -> Path:
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def sha256_file(path: str | Path, chunk: int = CHUNK) -> str:
    return file_digest(path, "sha256", chunk)


def file_digest(path: str | Path, algorithm: str, chunk: int = CHUNK) -> str:
    """Hex digest of a file read in chunks (sha256 for our records; md5 where a host publishes only that)."""
    h = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_sidecar(dest: str | Path) -> dict | None:
    p = sidecar_path(dest)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(dest: Path, expected: Expected) -> bool:
    """`dest` exists and its sidecar says it was verified against what we expect now."""
    side = read_sidecar(dest)
    if not dest.is_file() or side is None:
        return False
    if side.get("size") != dest.stat().st_size:
        return False
    if expected.size is not None and side.get("size") != expected.size:
        return False
    return expected.sha256 is None or side.get("sha256") == expected.sha256


def _local_source(url: str) -> Path | None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(url)
    return None


def _verify(tmp: Path, digest: str, size: int, expected: Expected, url: str, dest: Path) -> None:
    if expected.size is not None and size != expected.size:
        tmp.unlink(missing_ok=True)
        raise ChecksumError(f"{dest}: size mismatch for {url}: expected {expected.size} bytes, got {size}; "
                            "the partial download was removed, rerun to fetch it again")
    if expected.sha256 is not None and digest != expected.sha256:
        tmp.unlink(missing_ok=True)
        raise ChecksumError(f"{dest}: checksum mismatch for {url}: expected sha256 {expected.sha256}, "
                            f"got {digest}; the download was removed. If the source changed on purpose, "
                            "update the checksum in the config or checksum table")


def _finish(tmp: Path, dest: Path, url: str, digest: str, size: int, expected: Expected) -> Path:
    _verify(tmp, digest, size, expected, url, dest)
    os.replace(tmp, dest)
    write_json(sidecar_path(dest), {"url": url, "sha256": digest, "size": size,
                                    "verified": "published" if expected.sha256 else "recorded"})
    return dest


def _copy_local(src: Path, dest: Path, url: str, expected: Expected) -> Path:
    if not src.is_file():
        raise DownloadError(f"{url}: no such file; fix the path or URL in the config")
    tmp = part_path(dest)
    h, size = hashlib.sha256(), 0
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(CHUNK):
                h.update(block)
                fout.write(block)
                size += len(block)
    except OSError as e:  # a local copy restarts from scratch: leave no part behind
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"{url}: copying to {dest} failed: {e}; nothing was left under {dest.name}") from e
    return _finish(tmp, dest, url, h.hexdigest(), size, expected)


def _content_range_total(value: str | None) -> tuple[int | None, int | None]:
    """`bytes 100-199/1000` -> (100, 1000); `bytes */1000` -> (None, 1000)."""
    if not value:
        return None, None
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value.strip())
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _fetch_once(url: str, tmp: Path, headers: Mapping[str, str], timeout: float,
                on_progress: Callable[[int, int | None], None] | None) -> tuple[str, int, int | None]:
    """One attempt: resume `tmp` from its current length. Returns (sha256, size, total announced)."""
    have = tmp.stat().st_size if tmp.exists() else 0
    h = hashlib.sha256()
    if have:
        with open(tmp, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
    req = urllib.request.Request(url, headers={"User-Agent": "affectlens", **headers})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part may already be whole
            _, total = _content_range_total(e.headers.get("Content-Range"))
            if total == have:
                return h.hexdigest(), have, total
            tmp.unlink(missing_ok=True)  # the part is longer than the file: start over
        raise
    with resp:
        status = getattr(resp, "status", 200)
        total = None
        if status == 206:
            start, total = _content_range_total(resp.headers.get("Content-Range"))
            if start != have:
                tmp.unlink(missing_ok=True)
                raise ConnectionError(f"server resumed at byte {start}, not {have}; starting over")
            mode = "ab"
        else:  # 200: the server ignored the Range header; start over
            have, h, mode = 0, hashlib.sha256(), "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        size = have
        with open(tmp, mode) as f:
            while block := resp.read(CHUNK):
                f.write(block)
                h.update(block)
                size += len(block)
                if on_progress is not None:
                    on_progress(size, total)
    if total is not None and size != total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")
    return h.hexdigest(), size, total


def _progress_logger(url: str, every_s: float = 30.0) -> Callable[[int, int | None], None]:
    """Log a long transfer's progress at most every `every_s` seconds (into the rule's log)."""
    last = [time.monotonic()]

    def report(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            of = f" of {total / 1e6:.0f} MB ({100 * done / total:.0f} %)" if total else ""
            log.info("%s: %.0f MB%s", url, done / 1e6, of)

    return report


def download(url: str, dest: str | Path, sha256: str | None = None, size: int | None = None,
             retries: int = 5, backoff: float = 2.0, timeout: float = 60.0,
             headers: Mapping[str, str] | None = None,
             on_progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Fetch `url` to `dest` (resumable, retried, verified) and return `dest`.

    `sha256`/`size`: the published digest and length, when there are any; a mismatch raises
    ChecksumError naming the file and both digests. Without them the sha256 of what was fetched
    is recorded in `dest.sha256.json`.
    """
    dest = Path(dest)
    expected = Expected(sha256.lower() if sha256 else None, size)
    if _is_complete(dest, expected):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():  # present but unverified (or verified against another digest): check it now
        digest, n = sha256_file(dest), dest.stat().st_size
        if (expected.sha256 in (None, digest)) and (expected.size in (None, n)):
            write_json(sidecar_path(dest), {"url": url, "sha256": digest, "size": n,
                                            "verified": "published" if expected.sha256 else "recorded"})
            return dest
        dest.unlink()
    local = _local_source(url)
    if local is not None:
        return _copy_local(local, dest, url, expected)
    tmp = part_path(dest)
    on_progress = on_progress or _progress_logger(url)
    last_error: Exception | None = None
    have, failures = -1, 0
    for attempt in range(retries + 1):
        if attempt:
            now = tmp.stat().st_size if tmp.exists() else 0
            # A transfer that got further resumes at once; one that got nowhere backs off.
            failures = 0 if now > have else failures + 1
            have = now
            wait = backoff * 2 ** (failures - 1) if failures else 0.0
            log.warning("download %s failed (%s); retry %d/%d in %.1f s from byte %d", url, last_error, attempt,
                        retries, wait, now)
            time.sleep(wait)
        else:
            have = tmp.stat().st_size if tmp.exists() else 0
        try:
            digest, n, _ = _fetch_once(url, tmp, headers or {}, timeout, on_progress)
        except urllib.error.HTTPError as e:
            last_error = e
            if e.code not in _RETRY_STATUS and e.code != 416:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; check the URL in the config "
                                    "(or download the file by hand and give its path)") from e
            continue
        except DownloadError:
            raise
        except OSError as e:
            if e.errno in _DISK_ERRNOS and not isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError)):
                raise DownloadError(f"{url}: cannot write {tmp}: {e.strerror or e} (errno {errno.errorcode[e.errno]}); "
                                    f"free space (or fix permissions) and rerun: {tmp.name} keeps what was fetched "
                                    "and the next run resumes from it") from e
            last_error = e
            continue
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            last_error = e
            continue
        return _finish(tmp, dest, url, digest, n, expected)
    raise DownloadError(f"{url}: download failed after {retries + 1} attempts ({last_error}); "
                        f"{tmp} keeps what was fetched and the next run resumes from it")


# --- checksum tables --------------------------------------------------------------------------------

def parse_lfs_pointer(text: str, source: str = "LFS pointer") -> Expected:
    """sha256 and size from a Git LFS pointer file (`version ...`, `oid sha256:...`, `size N`)."""
    fields = dict(line.split(" ", 1) for line in text.strip().splitlines() if " " in line)
    oid, size = fields.get("oid", ""), fields.get("size", "")
    if not fields.get("version", "").startswith("https://git-lfs.github.com/spec/") or \
            not oid.startswith("sha256:") or not size.strip().isdigit():
        raise ValueError(f"{source}: not a Git LFS pointer (expected version/oid sha256:/size lines)")
    return Expected(sha256=oid[len("sha256:"):].strip().lower(), size=int(size))


def read_checksum_table(path: str | Path) -> dict[str, Expected]:
    """{file name: Expected} from a checksum table.

    Accepted: `sha256sum` output (`<hex>  <name>`), or a TSV/CSV with a header holding a name
    column (`name`, `file` or `path`), `sha256` and optionally `size`. Names are compared by their
    last path component.
    """
    import pandas as pd

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    first = text.lstrip().split("\n", 1)[0]
    if re.match(r"^[0-9a-fA-F]{64}\s+\*?\S", first):
        out = {}
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                m = re.match(r"^([0-9a-fA-F]{64})\s+\*?(.+)$", line.strip())
                if not m:
                    raise ValueError(f"{path}: line {n} is not `<sha256>  <name>`: {line!r}")
                out[Path(m.group(2)).name] = Expected(m.group(1).lower())
        return out
    df = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
    cols = {c.strip().lower(): c for c in df.columns}
    name_col = next((cols[c] for c in ("name", "file", "filename", "path") if c in cols), None)
    if name_col is None or "sha256" not in cols:
        raise ValueError(f"{path}: a checksum table needs a name column (name, file or path) and a sha256 "
                         f"column; found {list(df.columns)}")
    out = {}
    for rec in df.to_dict("records"):
        size = rec.get(cols.get("size", ""), "")
        out[Path(rec[name_col]).name] = Expected(rec[cols["sha256"]].strip().lower(),
                                                 int(size) if str(size).strip() else None)
    return out


def write_checksum_table(table: Mapping[str, Expected], path: str | Path) -> None:
    """Write {name: Expected} as a TSV (name, sha256, size) that `read_checksum_table` reads back."""
    from affectlens.io import atomic_open

    with atomic_open(path, "w") as f:
        f.write("name\tsha256\tsize\n")
        for name in sorted(table):
            e = table[name]
            f.write(f"{name}\t{e.sha256 or ''}\t{'' if e.size is None else e.size}\n")


# --- placing files ----------------------------------------------------------------------------------

def link_or_copy(src: str | Path, dest: str | Path) -> Path:
    """Hard-link `src` to `dest` (same filesystem: no extra space), else copy; atomic either way."""
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.linking")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest


def link_tree(src: str | Path, dest: str | Path) -> Path:
    """Make `dest` a symlink to the existing folder `src` (a dataset the user already has on disk)."""
    src, dest = Path(src).resolve(), Path(dest)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    dest.symlink_to(src, target_is_directory=True)
    return dest
