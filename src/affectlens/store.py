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
                         clip_range [first, end), n_clips_total, clip_ids_digest, complete

Storage dtypes: float16 (default), float32, and bfloat16, which HDF5 lacks: its bits are stored as
uint16 (attribute storage_dtype = "bfloat16") and widened exactly to float32 on reading, so a
model run in bfloat16 is stored without loss.

The writer fills `<name>.partial` and renames it when complete; a reader refuses a file without
`complete = True`, so a killed extraction never looks finished. `merge_stores` joins stores of
consecutive clip ranges (shards, or the chunks of a resumable extraction) into one, refusing
overlaps, gaps and stores made with different settings, and checks what it wrote.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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
    def __init__(self, path: str | Path, sites: dict[str, int], clip_ids: list[str], attrs: dict,
                 storage_dtype: str = "float16", site_attrs: dict[str, dict] | None = None):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype {storage_dtype!r}: choose one of {sorted(STORAGE_DTYPES)}")
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
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
        self.h5 = h5py.File(self.tmp, "w")
        self.h5.create_dataset("clip_ids", data=np.array(clip_ids, dtype=object), dtype=h5py.string_dtype())
        for site, d in self.sites.items():
            g = self.h5.create_group(f"sites/{site}")
            g.create_dataset("pooled", shape=(self.n_clips, d), dtype=self.dtype)
            g.create_dataset("frames", shape=(0, d), maxshape=(None, d), dtype=self.dtype,
                             chunks=(min(_CHUNK_ROWS, max(1, 2**20 // (4 * d))), d))
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
            for site in (s for s in self.sites if tower_of(s) == tower):
                g = self.h5[f"sites/{site}"]
                if len(rows[site]) != total:
                    raise ValueError(f"site {site}: {len(rows[site])} rows for {total} frames")
                g["pooled"][self._row:self._row + n] = to_storage(np.asarray(pooled[site]), self.storage_dtype)
                ds = g["frames"]
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

    def _append_positions(self, tower: str, cols: dict[str, np.ndarray], start: int, total: int) -> None:
        g = self.h5.require_group(f"towers/{tower}/positions")
        if "kind" not in g:
            g.attrs["kinds"] = json.dumps(KINDS)
            for name, dtype in (("kind", np.uint8), ("time", np.float64), ("frame", np.int32),
                                ("token", h5py.string_dtype())):
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(16384,))
        for name in ("kind", "time", "frame", "token"):
            if len(cols[name]) != total:
                raise ValueError(f"tower {tower}: {len(cols[name])} positions for {total} frames")
            g[name].resize(start + total, axis=0)
            g[name][start:start + total] = np.asarray(cols[name], dtype=object) if name == "token" else cols[name]

    def close(self) -> None:
        if self._row != self.n_clips:
            raise ValueError(f"store closed after {self._row} of {self.n_clips} clips")
        first = self.towers[0] if self.towers else None
        for tower in self.towers:
            g = self.h5.require_group(f"towers/{tower}")
            g.create_dataset("n_frames", data=self._n_frames[tower])
            g.create_dataset("offsets", data=np.concatenate([[0], np.cumsum(self._n_frames[tower])]))
        n_frames = self._n_frames[first] if first else np.zeros(self.n_clips, dtype=np.int64)
        self.h5.create_dataset("n_frames", data=n_frames)
        self.h5.create_dataset("offsets", data=np.concatenate([[0], np.cumsum(n_frames)]))
        self.h5.attrs["complete"] = True
        self.h5.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.h5.close()
        finally:
            self.tmp.unlink(missing_ok=True)


@contextmanager
def write_store(path, sites, clip_ids, attrs, storage_dtype="float16", site_attrs=None) -> Iterator[StoreWriter]:
    """Write a store; on any error the partial file is removed and nothing appears at `path`."""
    w = StoreWriter(path, sites, clip_ids, attrs, storage_dtype, site_attrs)
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
                 chunk_clips: int = 256) -> Path:
    """Join stores of consecutive clip ranges into one at `out_path` (written atomically).
    Refuses overlapping or missing ranges, and parts whose settings differ (model, revision,
    dtype, sites, config, manifest). With `require_all`, the ranges must cover the whole manifest.
    Reads and writes `chunk_clips` clips at a time, so memory does not grow with the store."""
    stores = []
    for p in parts:  # metadata only: a merge of thousands of chunks must not hold them all open
        with Store(p) as s:  # (each open file keeps ~1 MiB of HDF5 chunk cache, and a descriptor)
            s.dims = {site: s.dim(site) for site in s.sites}
            s.site_meta = {site: s.site_attrs(site) for site in s.sites}
            s.with_positions = {t: f"towers/{t}/positions" in s.h5 for t in s.towers}
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
             if k not in ("complete", "storage_dtype", "sites", "towers", "format_version")}
    attrs["clip_range"] = json.dumps([ranges[0][0], ranges[-1][1]])
    with_positions = ref.with_positions
    with write_store(out_path, sites, clip_ids, attrs, ref.storage_dtype, ref.site_meta) as w:
        for meta in stores:
            if meta.with_positions != with_positions:
                raise MergeError(f"{meta.path} and {ref.path} differ in which towers record positions")
            with Store(meta.path) as s:
                _copy_part(s, w, with_positions, chunk_clips)
    _verify_merge(stores, Path(out_path))
    return Path(out_path)


def _copy_part(s: Store, w: StoreWriter, with_positions: dict, chunk_clips: int) -> None:
    for c0 in range(0, len(s.clip_ids), chunk_clips):
        c1 = min(c0 + chunk_clips, len(s.clip_ids))
        n_frames, rows, pooled, positions = {}, {}, {}, {}
        for tower in s.towers:
            off = s.offsets_of(tower)
            n_frames[tower] = np.diff(off[c0:c1 + 1])
            if with_positions[tower]:
                g = s.h5[f"towers/{tower}/positions"]
                positions[tower] = {k: g[k][off[c0]:off[c1]] for k in ("kind", "time", "frame", "token")}
        for site in s.sites:
            off = s.offsets_of(site)
            rows[site] = s._site(site)["frames"][off[c0]:off[c1]]
            pooled[site] = s._site(site)["pooled"][c0:c1]
        w.append_rows(n_frames, rows, pooled, positions or None)


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
