"""The HDF5 activation store: one file per (dataset, model), or per clip range of one (a shard).

Layout
    /clip_ids            [clip]            utf-8 strings, manifest order
    /n_frames            [clip]            real (unpadded) positions per clip of the first tower
    /offsets             [clip + 1]        row of each clip's first frame, first tower
    /towers/{tower}/n_frames, offsets      the same for every tower (towers differ in length:
                                           Whisper's encoder has audio frames, its decoder tokens)
    /towers/{tower}/positions/{kind,time,frame,token}
                                           [tower_frame] where each stored position came from
                                           (models/positions.py); kind as uint8 codes into the
                                           attribute `kinds`
    /sites/{site}/pooled [clip, d]         mean over the clip's real positions (generated
                                           towers: over the rows its adapter names, e.g.
                                           Qwen-Omni Talker code rows)
    /sites/{site}/frames [tower_frame, d]  every real position (pooling is an analysis choice)
    /sites/{site} attrs  what a site's columns mean beyond the grammar: attn_heads sites record
                         n_heads and d_head (head h is columns h * d_head ... (h + 1) * d_head - 1)
    attrs                model_id, revision, family, sample_rate, frame_rate, storage_dtype,
                         config_digest, versions (json), sites (json), towers (json),
                         clip_range [first, end), n_clips_total, clip_ids_digest, complete;
                         an extraction's store also clips_written (its commits, see
                         `ResumableStoreWriter`), and is in HDF5's 1.10 file format

Storage dtypes: float16 (default), float32, and bfloat16, which HDF5 lacks: its bits are stored as
uint16 (attribute storage_dtype = "bfloat16") and widened exactly to float32 on reading, so a
model run in bfloat16 is stored without loss.

The writer fills `<name>.partial` (an extraction: a growing file beside it, committed chunk by
chunk) and renames it when complete; a reader refuses a file without `complete = True`, so a
killed extraction never looks finished. `merge_stores` joins stores of consecutive clip ranges
(the shards of an extraction) into one, refusing overlaps, gaps and stores made with different
settings, and checks what it wrote.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

from affectlens.models.positions import KINDS, Positions
from affectlens.models.sites import TOWERS

STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
_CHUNK_ROWS = 4096
FORMAT_VERSION = 2
# Attributes that must agree between stores merged into one.
MERGE_KEYS = ("model_id", "revision", "family", "sample_rate", "frame_rate", "input_regime", "storage_dtype",
              "config_digest", "sites", "towers", "n_clips_total", "clip_ids_digest")


log = logging.getLogger(__name__)


class IncompleteStoreError(RuntimeError):
    """The file is not a finished store (a killed or failed extraction)."""


class MergeError(ValueError):
    """Stores that cannot be joined into one (overlap, gap, or different settings)."""


def tower_of(site: str) -> str:
    return site.split(".", 1)[0]


def towers_of(sites) -> list[str]:
    """The towers of `sites` in canonical order (encoder before decoder): the first one's frame
    counts are the store's /n_frames."""
    return sorted({tower_of(s) for s in sites}, key=lambda t: (TOWERS.index(t) if t in TOWERS else len(TOWERS), t))


# --- dtype conversion ---------------------------------------------------------------------------
def to_storage(x: np.ndarray, storage_dtype: str) -> np.ndarray:
    """float array -> what the store holds (bfloat16: its bits, rounded to nearest even). An array
    already in the stored representation (uint16 for bfloat16) passes unchanged."""
    if storage_dtype == "bfloat16":
        if x.dtype == np.uint16:
            return x
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))  # round to nearest, ties to even
        return np.where(np.isnan(x), (bits >> 16) | 0x40, rounded >> 16).astype(np.uint16)
    return np.asarray(x, dtype=STORAGE_DTYPES[storage_dtype])


def from_storage(x: np.ndarray, storage_dtype: str) -> np.ndarray:
    """Stored array -> float32 (exact for every storage dtype)."""
    if storage_dtype == "bfloat16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


# --- writing ------------------------------------------------------------------------------------
class StoreWriter:
    """Fills a store clip by clip. With `n_rows` (each tower's total frames, when the writer
    knows them up front, as a merge does) the frame and position matrices are laid out
    contiguously at their final size, so nothing is resized and a row block is one write;
    otherwise they grow in chunks as clips come."""

    _libver: str | None = None  # h5py's default file format

    def __init__(self, path: str | Path, sites: dict[str, int], clip_ids: list[str], attrs: dict,
                 storage_dtype: str = "float16", site_attrs: dict[str, dict] | None = None,
                 n_rows: dict[str, int] | None = None, tmp: str | Path | None = None):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype {storage_dtype!r}: choose one of {sorted(STORAGE_DTYPES)}")
        self.path = Path(path)
        self.tmp = Path(tmp) if tmp else self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.storage_dtype = storage_dtype
        self.dtype = STORAGE_DTYPES[storage_dtype]
        self.sites = dict(sites)
        self.towers = towers_of(self.sites)
        self.n_clips = len(clip_ids)
        self._row = 0  # next clip
        self._frame_row = {t: 0 for t in self.towers}
        self._n_frames = {t: np.zeros(self.n_clips, dtype=np.int64) for t in self.towers}
        self._has_positions: dict[str, bool] = {}
        if n_rows is not None and set(n_rows) != set(self.towers):
            raise ValueError(f"n_rows names towers {sorted(n_rows)}; the sites' towers are {self.towers}")
        self.n_rows = None if n_rows is None else {t: int(n) for t, n in n_rows.items()}
        self.h5 = h5py.File(self.tmp, "w", libver=self._libver)
        self.h5.create_dataset("clip_ids", data=np.array(clip_ids, dtype=object), dtype=h5py.string_dtype())
        for site, d in self.sites.items():
            g = self.h5.create_group(f"sites/{site}")
            g.create_dataset("pooled", shape=(self.n_clips, d), dtype=self.dtype)
            if self.n_rows is None:
                g.create_dataset("frames", shape=(0, d), maxshape=(None, d), dtype=self.dtype,
                                 chunks=(min(_CHUNK_ROWS, max(1, 2**20 // (4 * d))), d))
            else:
                g.create_dataset("frames", shape=(self.n_rows[tower_of(site)], d), dtype=self.dtype)
            g.attrs.update((site_attrs or {}).get(site, {}))
        self.h5.attrs.update({k: (json.dumps(v) if isinstance(v, (dict, list, tuple)) else v)
                              for k, v in attrs.items()})
        self.h5.attrs["storage_dtype"] = storage_dtype
        self.h5.attrs["sites"] = json.dumps(list(self.sites))
        self.h5.attrs["towers"] = json.dumps(self.towers)
        self.h5.attrs["format_version"] = FORMAT_VERSION
        self.h5.attrs.setdefault("clip_range", json.dumps([0, self.n_clips]))
        self.h5.attrs.setdefault("n_clips_total", self.n_clips)
        self.h5.attrs["complete"] = False

    def append(self, frames: dict[str, list[np.ndarray]], positions: dict[str, list[Positions]] | None = None,
               pooled: dict[str, np.ndarray] | None = None) -> None:
        """Add the next clips: per site, one [frame, d] array per clip (real positions only), float
        or already in the stored representation; optionally per tower one Positions per clip, and
        per site the pooled [clip, d] means (else they are computed here from the frames)."""
        n = len(next(iter(frames.values())))
        if self._row + n > self.n_clips:
            raise ValueError(f"more clips appended than the {self.n_clips} declared")
        counts: dict[str, list[int]] = {}
        for site in self.sites:
            if site not in frames:
                raise ValueError(f"site {site} is missing from the appended clips")
            per_clip = frames[site]
            c = [len(a) for a in per_clip]
            if len(c) != n:
                raise ValueError(f"site {site}: {len(c)} clips appended, other sites {n}")
            tower = tower_of(site)
            if tower not in counts:
                if any(k == 0 for k in c):
                    raise ValueError(f"tower {tower}: a clip with zero positions cannot be stored")
                counts[tower] = c
            elif c != counts[tower]:
                raise ValueError(f"site {site}: frame counts differ from the other sites of tower {tower}")
        rows = {s: np.concatenate(frames[s]) for s in self.sites}
        if pooled is None:
            pooled = {s: np.stack([from_storage(a, self.storage_dtype).mean(0) if a.dtype == np.uint16
                                   else np.asarray(a, dtype=np.float32).mean(0) for a in frames[s]])
                      for s in self.sites}
        pos_rows = None
        if positions:
            pos_rows = {}
            for tower, per_clip in positions.items():
                if tower not in counts:
                    continue
                if [len(p) for p in per_clip] != counts[tower]:
                    raise ValueError(f"tower {tower}: positions do not match the stored frame counts")
                p = Positions.concat(per_clip)
                pos_rows[tower] = {"kind": np.array([KINDS.index(k) for k in p.kind], dtype=np.uint8),
                                   "time": p.time, "frame": p.frame.astype(np.int32),
                                   "token": p.token}
        self.append_rows({t: np.asarray(c) for t, c in counts.items()}, rows, pooled, pos_rows)

    def append_rows(self, n_frames: dict[str, np.ndarray], rows: dict[str, np.ndarray],
                    pooled: dict[str, np.ndarray], positions: dict[str, dict[str, np.ndarray]] | None = None) -> None:
        """Low-level append of consecutive clips: per tower their frame counts, per site the
        concatenated frame rows and the pooled rows, per tower the position columns."""
        n = len(next(iter(n_frames.values())))
        for tower in self.towers:
            total = int(np.sum(n_frames[tower]))
            start = self._frame_row[tower]
            if self.n_rows is not None and start + total > self.n_rows[tower]:
                raise ValueError(f"tower {tower}: {start + total} frames appended, {self.n_rows[tower]} declared")
            for site in (s for s in self.sites if tower_of(s) == tower):
                g = self.h5[f"sites/{site}"]
                if len(rows[site]) != total:
                    raise ValueError(f"site {site}: {len(rows[site])} rows for {total} frames")
                g["pooled"][self._row:self._row + n] = to_storage(np.asarray(pooled[site]), self.storage_dtype)
                ds = g["frames"]
                if self.n_rows is None:
                    ds.resize(start + total, axis=0)
                ds[start:start + total] = to_storage(rows[site], self.storage_dtype)
            has = positions is not None and tower in positions
            if self._has_positions.setdefault(tower, has) != has:
                raise ValueError(f"tower {tower}: positions given for some clips but not for others")
            if has:
                self._append_positions(tower, positions[tower], start, total)
            self._n_frames[tower][self._row:self._row + n] = n_frames[tower]
            self._frame_row[tower] = start + total
        self._row += n

    def _positions_group(self, tower: str) -> h5py.Group:
        g = self.h5.require_group(f"towers/{tower}/positions")
        if "kind" not in g:
            g.attrs["kinds"] = json.dumps(KINDS)
            for name, dtype in (("kind", np.uint8), ("time", np.float64), ("frame", np.int32),
                                ("token", h5py.string_dtype())):
                if self.n_rows is None:
                    g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(16384,))
                else:
                    g.create_dataset(name, shape=(self.n_rows[tower],), dtype=dtype)
        return g

    def _append_positions(self, tower: str, cols: dict[str, np.ndarray], start: int, total: int) -> None:
        g = self._positions_group(tower)
        for name in ("kind", "time", "frame", "token"):
            if len(cols[name]) != total:
                raise ValueError(f"tower {tower}: {len(cols[name])} positions for {total} frames")
            if self.n_rows is None:
                g[name].resize(start + total, axis=0)
            g[name][start:start + total] = np.asarray(cols[name], dtype=object) if name == "token" else cols[name]

    def close(self) -> None:
        if self._row != self.n_clips:
            raise ValueError(f"store closed after {self._row} of {self.n_clips} clips")
        short = {t: (self._frame_row[t], n) for t, n in (self.n_rows or {}).items() if self._frame_row[t] != n}
        if short:
            raise ValueError(f"store closed with frames (written, declared) per tower {short}")
        self._write_counts(top=True)
        self.h5.attrs["complete"] = True
        self.h5.close()
        os.replace(self.tmp, self.path)

    def _write_counts(self, top: bool) -> None:
        """Each tower's n_frames and offsets (and, with `top`, the first tower's as the store's)."""
        first = self.towers[0] if self.towers else None
        for tower in self.towers:
            self._put(f"towers/{tower}/n_frames", self._n_frames[tower])
            self._put(f"towers/{tower}/offsets", np.concatenate([[0], np.cumsum(self._n_frames[tower])]))
        if top:
            n_frames = self._n_frames[first] if first else np.zeros(self.n_clips, dtype=np.int64)
            self._put("n_frames", n_frames)
            self._put("offsets", np.concatenate([[0], np.cumsum(n_frames)]))

    def _put(self, name: str, data: np.ndarray) -> None:
        if name in self.h5:
            self.h5[name][...] = data
        else:
            self.h5.create_dataset(name, data=data)

    def abort(self) -> None:
        try:
            self.h5.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class ResumableStoreWriter(StoreWriter):
    """A store filled over one or more runs in `progress` (a file the caller keeps beside `path`).
    `commit()` makes the clips appended so far survive a kill: the file is written in HDF5's
    single-writer mode, whose ordered flushes keep it readable whenever the process dies, and
    every dataset exists from the start (that mode creates nothing), so a commit only writes rows,
    the frame counts and the attribute `clips_written`. `resume(...)` reopens an earlier run's
    progress; `close()` marks the store complete and renames it to `path`, so each row is written
    once (no merge of chunk files)."""

    _libver = "latest"  # the single-writer mode needs HDF5's 1.10 file format

    def __init__(self, path: str | Path, progress: str | Path, sites: dict[str, int], clip_ids: list[str],
                 attrs: dict, storage_dtype: str = "float16", site_attrs: dict[str, dict] | None = None):
        super().__init__(path, sites, clip_ids, attrs, storage_dtype, site_attrs, tmp=progress)
        for tower in self.towers:
            self._positions_group(tower)
        self._write_counts(top=True)
        self.h5.attrs["clips_written"] = self._committed = 0
        self.h5.swmr_mode = True

    @property
    def clips_written(self) -> int:
        """The clips committed: what a rerun would resume after."""
        return self._committed

    def commit(self) -> None:
        """The clips appended so far become what a rerun resumes from."""
        self.h5.flush()  # the rows first, then the counts that make them part of the store
        self._write_counts(top=False)
        self.h5.attrs["clips_written"] = self._committed = self._row
        self.h5.flush()

    def suspend(self) -> None:
        """Close without finishing: the committed clips stay for `resume`."""
        self.h5.close()

    def close(self) -> None:
        if self._row != self.n_clips:
            raise ValueError(f"store closed after {self._row} of {self.n_clips} clips")
        missing = [t for t in self.towers if not self._has_positions.get(t)]
        if missing:
            raise ValueError(f"towers {missing}: a resumable store records every tower's positions")
        super().close()

    @classmethod
    def resume(cls, path: str | Path, progress: str | Path, same_settings: Callable[[dict], bool],
               block_rows: int = 1 << 16) -> ResumableStoreWriter | None:
        """A writer holding the committed clips of the progress file an earlier run left, copied
        into a fresh file (a file a killed single-writer left cannot be reopened for writing).
        None, and the file removed, when there is none to use: unreadable, or made with other
        settings (`same_settings(attrs)` says which)."""
        progress = Path(progress)
        fresh = progress.with_name(progress.name + ".resumed")
        w = None
        try:
            with _open_left_behind(progress) as old:
                attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in old.attrs.items()}
                if "clips_written" not in attrs or not same_settings(attrs):
                    raise _Unusable("made with other settings")
                done = int(attrs["clips_written"])
                sites = json.loads(attrs["sites"])
                keep = {k: v for k, v in attrs.items() if k not in ("complete", "clips_written", "storage_dtype",
                                                                    "sites", "towers", "format_version")}
                w = cls(path, fresh, {s: old[f"sites/{s}/pooled"].shape[1] for s in sites},
                        [c.decode() if isinstance(c, bytes) else c for c in old["clip_ids"][:]], keep,
                        attrs["storage_dtype"], {s: dict(old[f"sites/{s}"].attrs) for s in sites})
                _copy_clips(old, w, {t: old[f"towers/{t}/offsets"][:done + 1] for t in w.towers}, done, block_rows)
                w.commit()
        except BaseException as e:
            if w is not None:
                w.abort()
            no_space = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
            if no_space or not isinstance(e, (OSError, KeyError, ValueError, _Unusable)):
                raise
            if progress.exists():  # absent, damaged or of other settings: computed again
                log.warning("%s is not resumed from (%s); starting over", progress, e)
                progress.unlink()
            return None
        os.replace(fresh, progress)
        w.tmp = progress
        return w


class _Unusable(Exception):
    """What an earlier run left cannot be resumed from."""


def _open_left_behind(path: Path) -> h5py.File:
    """Open, read-only, a file a single-writer may have left (its flag stays set when the process
    was killed, and only a single-writer reader opens it). Such a reader retries a metadata read
    whose checksum fails 100 times with growing pauses, for minutes on a damaged file, since it
    takes it for a write in flight; no writer is left, so one attempt is made (the limit is set
    through the HDF5 library h5py loaded, where it can be found)."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    set_attempts = _hdf5_function("H5Pset_metadata_read_attempts")
    if set_attempts is not None:
        set_attempts.argtypes = [ctypes.c_int64, ctypes.c_uint]
        set_attempts(fapl.id, 1)
    return h5py.File(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl))


def _hdf5_function(name: str):
    """A function of the HDF5 library this process loaded for h5py (None where none is found)."""
    candidates = []
    try:
        with open("/proc/self/maps") as maps:  # Linux: the very file h5py loaded
            candidates += [line.split()[-1] for line in maps if "libhdf5" in line and "hdf5_hl" not in line]
    except OSError:
        pass
    here = Path(h5py.__file__).parent
    candidates += [str(f) for f in [*here.parent.glob("h5py.libs/libhdf5-*"), *here.glob(".dylibs/libhdf5*")]
                   if "hdf5_hl" not in f.name]
    for path in dict.fromkeys(candidates):
        try:
            return getattr(ctypes.CDLL(path), name)
        except (OSError, AttributeError):
            continue
    return None


def _copy_clips(h5: h5py.File, w: StoreWriter, offsets: dict[str, np.ndarray], n_clips: int, block_rows: int) -> None:
    """Append the first `n_clips` clips of an open store (its towers' `offsets`) to `w`, in blocks
    of about `block_rows` frames, so memory does not grow with the store."""
    c0 = 0
    while c0 < n_clips:
        ends = {t: np.searchsorted(o, o[c0] + block_rows, side="right") - 1 for t, o in offsets.items()}
        c1 = min(n_clips, max(c0 + 1, min(ends.values())))
        w.append_rows(*_read_clips(h5, list(w.sites), offsets, c0, c1))
        c0 = c1


def _read_clips(h5: h5py.File, sites: list[str], offsets: dict[str, np.ndarray], c0: int, c1: int):
    """Clips [c0, c1) of an open store (its towers' `offsets`) as `append_rows` takes them."""
    n_frames, rows, pooled, positions = {}, {}, {}, {}
    for t, off in offsets.items():
        n_frames[t] = np.diff(off[c0:c1 + 1])
        if f"towers/{t}/positions" in h5:
            g = h5[f"towers/{t}/positions"]
            positions[t] = {k: g[k][off[c0]:off[c1]] for k in ("kind", "time", "frame", "token")}
    for site in sites:
        off = offsets[tower_of(site)]
        rows[site] = h5[f"sites/{site}/frames"][off[c0]:off[c1]]
        pooled[site] = h5[f"sites/{site}/pooled"][c0:c1]
    return n_frames, rows, pooled, positions or None


@contextmanager
def write_store(path, sites, clip_ids, attrs, storage_dtype="float16", site_attrs=None,
                n_rows=None) -> Iterator[StoreWriter]:
    """Write a store; on any error the partial file is removed and nothing appears at `path`."""
    w = StoreWriter(path, sites, clip_ids, attrs, storage_dtype, site_attrs, n_rows)
    try:
        yield w
    except BaseException:
        w.abort()
        raise
    w.close()


# --- reading ------------------------------------------------------------------------------------
class Store:
    """Read-only view. Matrices are read on demand; nothing needs the whole file in memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"activation store {self.path} does not exist")
        try:
            self.h5 = h5py.File(self.path, "r")
        except OSError as e:
            raise IncompleteStoreError(f"{self.path} is not a readable HDF5 store ({e}); delete it and rerun extract") from e
        if not bool(self.h5.attrs.get("complete", False)):
            self.h5.close()
            raise IncompleteStoreError(f"{self.path} is an incomplete store (no complete=True); delete it and rerun extract")
        self.clip_ids = [s.decode() if isinstance(s, bytes) else s for s in self.h5["clip_ids"][:]]
        self.n_frames = self.h5["n_frames"][:]
        self.offsets = self.h5["offsets"][:]
        self.sites = json.loads(self.h5.attrs["sites"])
        self.attrs = dict(self.h5.attrs)
        self.storage_dtype = str(self.attrs.get("storage_dtype", "float16"))
        self.towers = json.loads(self.attrs["towers"]) if "towers" in self.attrs else \
            list(dict.fromkeys(tower_of(s) for s in self.sites))
        self._offsets = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.h5.close()

    def _site(self, site: str) -> h5py.Group:
        if site not in self.sites:
            raise KeyError(f"site {site!r} is not in {self.path}; it holds {self.sites}")
        return self.h5[f"sites/{site}"]

    def offsets_of(self, site_or_tower: str) -> np.ndarray:
        """[clip + 1] first frame row of each clip in the frame matrices of this site's tower."""
        tower = tower_of(site_or_tower)
        if tower not in self._offsets:
            if f"towers/{tower}/offsets" in self.h5:
                self._offsets[tower] = self.h5[f"towers/{tower}/offsets"][:]
            elif tower in self.towers:  # a store written before towers had their own offsets
                self._offsets[tower] = self.offsets
            else:
                raise KeyError(f"tower {tower!r} is not in {self.path}; it holds {self.towers}")
        return self._offsets[tower]

    def n_frames_of(self, site_or_tower: str) -> np.ndarray:
        return np.diff(self.offsets_of(site_or_tower))

    def dim(self, site: str) -> int:
        return self._site(site)["pooled"].shape[1]

    def site_attrs(self, site: str) -> dict:
        """What the store records about a site's columns ({} for most; attn_heads: n_heads, d_head)."""
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self._site(site).attrs.items()}

    def pooled(self, site: str, kind: str | None = None) -> np.ndarray:
        """[clip, d] float32: the stored mean over all real positions, or with `kind` ("audio",
        "text", ...) the mean over the positions of that kind (NaN rows for clips without any)."""
        if kind is None:
            return from_storage(self._site(site)["pooled"][:], self.storage_dtype)
        offsets, kinds = self.offsets_of(site), self.positions_of(site).kind
        out = np.full((len(self.clip_ids), self.dim(site)), np.nan, dtype=np.float32)
        for clip in range(len(self.clip_ids)):
            rows = np.flatnonzero(kinds[offsets[clip]:offsets[clip + 1]] == kind)
            if len(rows):
                out[clip] = self.clip_frames(site, clip)[rows].mean(0)
        return out

    def clip_frames(self, site: str, clip: int) -> np.ndarray:
        """[frame, d] float32 for one clip (by row)."""
        offsets = self.offsets_of(site)
        a, b = offsets[clip], offsets[clip + 1]
        return from_storage(self._site(site)["frames"][a:b], self.storage_dtype)

    def positions_of(self, site_or_tower: str, clip: int | None = None) -> Positions:
        """Where each stored position of the tower came from (one clip's, or all clips' rows);
        `index` counts positions within each clip."""
        tower = tower_of(site_or_tower)
        g = self.h5.get(f"towers/{tower}/positions")
        if g is None:
            raise KeyError(f"{self.path} records no positions for tower {tower!r}")
        offsets = self.offsets_of(tower)
        if clip is None:
            a, b = 0, int(offsets[-1])
            index = np.arange(b) - np.repeat(offsets[:-1], np.diff(offsets))
        else:
            a, b = int(offsets[clip]), int(offsets[clip + 1])
            index = np.arange(b - a)
        kinds = json.loads(g.attrs["kinds"])
        tokens = [t.decode() if isinstance(t, bytes) else t for t in g["token"][a:b]]
        return Positions(index, np.array(kinds, dtype=object)[g["kind"][a:b]], g["time"][a:b].astype(np.float64),
                         g["frame"][a:b].astype(np.int64), np.array(tokens, dtype=object))

    @property
    def total_frames(self) -> int:
        return int(self.offsets[-1])

    def frame_chunks(self, site: str, chunk_rows: int = 65536, shuffle: bool = False,
                     seed: int = 0) -> Iterator[np.ndarray]:
        """Stream the frame matrix in chunks of rows; with `shuffle`, chunks come in random order
        and rows are shuffled within each chunk (the usual streaming approximation)."""
        ds = self._site(site)["frames"]
        starts = np.arange(0, ds.shape[0], chunk_rows)
        rng = np.random.default_rng(seed)
        if shuffle:
            rng.shuffle(starts)
        for s in starts:
            x = from_storage(ds[s:s + chunk_rows], self.storage_dtype)
            if shuffle:
                x = x[rng.permutation(len(x))]
            yield x


# --- merging ------------------------------------------------------------------------------------
def _attr(store: Store, key: str):
    v = store.attrs.get(key)
    return v.item() if isinstance(v, np.generic) else v


def merge_stores(parts: list[str | Path], out_path: str | Path, require_all: bool = False,
                 block_rows: int = 1 << 16) -> Path:
    """Join stores of consecutive clip ranges into one at `out_path` (written atomically).
    Refuses overlapping or missing ranges, and parts whose settings differ (model, revision,
    dtype, sites, config, manifest). With `require_all`, the ranges must cover the whole manifest.
    Copies about `block_rows` frames at a time, so memory does not grow with the store."""
    stores = []
    for p in parts:  # metadata only: a merge of thousands of chunks must not hold them all open
        with Store(p) as s:  # (each open file keeps ~1 MiB of HDF5 chunk cache, and a descriptor)
            s.dims = {site: s.dim(site) for site in s.sites}
            s.site_meta = {site: s.site_attrs(site) for site in s.sites}
            s.with_positions = {t: f"towers/{t}/positions" in s.h5 for t in s.towers}
            s.n_rows = {t: int(s.offsets_of(t)[-1]) for t in s.towers}
        stores.append(s)
    if not stores:
        raise MergeError(f"no stores to merge into {out_path}")
    ranges = [tuple(json.loads(_attr(s, "clip_range"))) for s in stores]
    order = np.argsort([r[0] for r in ranges], kind="stable")
    stores, ranges = [stores[i] for i in order], [ranges[i] for i in order]
    ref = stores[0]
    for s in stores[1:]:
        diff = [k for k in MERGE_KEYS if _attr(s, k) != _attr(ref, k)]
        diff += [f"{site} attrs" for site in ref.sites if s.site_meta.get(site) != ref.site_meta[site]]
        if diff:
            raise MergeError(f"{s.path} and {ref.path} differ in {diff} "
                             f"({[(_attr(s, k), _attr(ref, k)) for k in diff]}); they were not made by one extraction "
                             "configuration: rerun the stale shards")
    for s, (a, b) in zip(stores, ranges):
        if len(s.clip_ids) != b - a:
            raise MergeError(f"{s.path}: clip_range [{a}, {b}) but {len(s.clip_ids)} clips")
    for (a0, b0), (a1, b1), s0, s1 in zip(ranges, ranges[1:], stores, stores[1:]):
        if a1 < b0:
            raise MergeError(f"{s0.path} [{a0}, {b0}) and {s1.path} [{a1}, {b1}) overlap")
        if a1 > b0:
            raise MergeError(f"clips [{b0}, {a1}) are in none of the stores (between {s0.path} and {s1.path})")
    total = _attr(ref, "n_clips_total")
    if require_all and (ranges[0][0] != 0 or ranges[-1][1] != total):
        raise MergeError(f"the stores cover clips [{ranges[0][0]}, {ranges[-1][1]}) of {total}; "
                         "a shard is missing")

    sites = dict(ref.dims)
    clip_ids = [c for s in stores for c in s.clip_ids]
    attrs = {k: v for k, v in ref.attrs.items()
             if k not in ("complete", "clips_written", "storage_dtype", "sites", "towers", "format_version")}
    attrs["clip_range"] = json.dumps([ranges[0][0], ranges[-1][1]])
    with_positions = ref.with_positions
    n_rows = {t: sum(s.n_rows[t] for s in stores) for t in ref.towers}
    with write_store(out_path, sites, clip_ids, attrs, ref.storage_dtype, ref.site_meta, n_rows) as w:
        for meta in stores:
            if meta.with_positions != with_positions:
                raise MergeError(f"{meta.path} and {ref.path} differ in which towers record positions")
            with Store(meta.path) as s:
                _copy_clips(s.h5, w, {t: s.offsets_of(t) for t in s.towers}, len(s.clip_ids), block_rows)
    _verify_merge(stores, Path(out_path))
    return Path(out_path)


def _verify_merge(stores: list[Store], out_path: Path) -> None:
    """Re-read the merged store: clip ids, frame counts and each part's first and last rows."""
    try:
        with Store(out_path) as merged:
            if merged.clip_ids != [c for s in stores for c in s.clip_ids]:
                raise MergeError(f"{out_path}: merged clip ids differ from the parts'")
            clip0 = 0
            for meta in stores:
                with Store(meta.path) as s:
                    _verify_part(merged, s, clip0, out_path)
                clip0 += len(meta.clip_ids)
    except MergeError:
        out_path.unlink(missing_ok=True)
        raise


def _verify_part(merged: Store, s: Store, clip0: int, out_path: Path) -> None:
    n = len(s.clip_ids)
    for site in s.sites:
        got, want = merged.n_frames_of(site)[clip0:clip0 + n], s.n_frames_of(site)
        if not np.array_equal(got, want):
            raise MergeError(f"{out_path}: frame counts of {site} differ from {s.path}'s")
        for i in {0, n - 1}:
            if not np.array_equal(merged.clip_frames(site, clip0 + i), s.clip_frames(site, i)):
                raise MergeError(f"{out_path}: frames of clip {s.clip_ids[i]} at {site} differ from {s.path}'s")
