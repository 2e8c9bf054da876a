"""Dump every requested site of a model over a dataset into one HDF5 store.

Clips are processed in chunks of `chunk_clips` (manifest order); within a chunk they are batched by
duration, so a batch pads little. Only real positions are stored (each adapter says which rows of
its padded tensors are real, and where each came from), and pooled means are over those alone.

Resumable: the store grows in `<out>.parts/store.h5`, committed after each chunk of clips
(`ResumableStoreWriter`: HDF5's single-writer mode keeps the file readable whenever the process
dies); a rerun made with the same settings continues after the last committed clip, and the
finished file is renamed to `<out>` and the folder removed. Each row is written once: no chunk
files to merge.

Shardable: `clip_range=(first, end)` extracts a slice of the manifest; `merge_stores(...,
require_all=True)` joins the shards (the workflow's `extract` rule does this).

Generated towers: an adapter may name towers that a forward over the clip's input never reaches
(`generated_towers`: Qwen-Omni's Talker and code predictor, which run only while speech is
generated). Their sites are read one clip at a time from the adapter's generation run
(`adapter.generated_rows(clip, sites)`, which also says what their pooled mean covers), apart from
the batched forward that reads every other site of the same store; the adapter's
`generation_settings` join the config digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

from affectlens.naming import shard_name
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from affectlens.store import MERGE_KEYS, ResumableStoreWriter, to_storage, tower_of, towers_of

if TYPE_CHECKING:  # torch is imported where it is used: the workflow imports this module to plan jobs
    import pandas as pd
    import torch

    from affectlens.models.base import Adapter, Batch

log = logging.getLogger(__name__)


def package_versions() -> dict[str, str]:
    names = ["affectlens", "torch", "transformers", "numpy", "h5py", "scikit-learn", "librosa"]
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


# Settings that change where and how fast a model runs, not what it computes: left out of the
# digest, so a job resumed or sharded on another device or batch size reuses finished chunks.
RUNTIME_KEYS = ("device", "device_map", "batch_size", "chunk_clips", "shards")


def config_digest(cfg: dict) -> str:
    cfg = {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def clip_ids_digest(clip_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(clip_ids).encode()).hexdigest()[:16]


def duration_batches(durations: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row indices grouped into batches of similar duration (less padding per batch)."""
    order = np.argsort(durations, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def shard_range(n_clips: int, shard: int, n_shards: int) -> tuple[int, int]:
    """Clip range [first, end) of shard `shard` (0-based) of `n_shards` near-equal shards."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} of {n_shards}: shards are numbered 0..{n_shards - 1}")
    bounds = np.linspace(0, n_clips, n_shards + 1).round().astype(int)
    return int(bounds[shard]), int(bounds[shard + 1])


def shard_paths(dataset: str, model: str, n_shards: int) -> list[str]:
    """The workflow's shard stores of a model sharded `n_shards` ways (none when unsharded)."""
    if n_shards == 1:
        return []
    return [f"results/extract_shard/{dataset}/{model}/{shard_name(i, n_shards)}.h5" for i in range(n_shards)]


def weight_files(source: str) -> list[str]:
    """A local model folder's weight files (none for Hub ids and packaged models): the workflow
    lists them as inputs, so replacing the weights reruns extraction and everything downstream."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return []
    return sorted(str(f) for pattern in ("*.safetensors", "model.bin", "*.ts", "*.pt") for f in folder.glob(pattern))


def clip_loader(adapter: Adapter, load_wave: Callable[[str], np.ndarray] | None = None,
                text_column: str = "text", prompt: str | None = None) -> Callable[[dict], Any]:
    """row -> what `adapter.prepare` takes for one clip (see `Adapter.inputs`): the wave, the
    text of `text_column` (formatted into `prompt`'s `{text}` when given), video frames from the
    row's `frames_path` (npz with `frames`, `times`), or a dict of several."""

    def text_of(row):
        text = row.get(text_column)
        if text is None or (isinstance(text, float) and np.isnan(text)):
            text = ""
        return prompt.format(text=text) if prompt else str(text)

    def video_of(row):
        path = row.get("frames_path")
        if not path:
            raise ValueError(f"clip {row.get('clip_id')}: no frames_path; run the video frame decoding first")
        with np.load(path) as z:
            return {"frames": z["frames"], "times": z["times"]}

    getters = {"audio": lambda row: load_wave(row["path"]), "text": text_of, "video": video_of}
    missing = [k for k in adapter.inputs if k not in getters]
    if missing:
        raise ValueError(f"adapter {adapter.family} needs inputs {missing} that extraction cannot load")
    if "audio" in adapter.inputs and load_wave is None:
        raise ValueError(f"adapter {adapter.family} reads audio: pass load_wave")
    if len(adapter.inputs) == 1:
        return getters[adapter.inputs[0]]
    return lambda row: {k: getters[k](row) for k in adapter.inputs}


def _size(item: Any) -> float:
    """What duration bucketing sorts by: samples of a wave, characters of a text, video frames."""
    if isinstance(item, dict):
        return sum(_size(v) for v in item.values())
    if isinstance(item, str):
        return float(len(item))
    return float(len(item))


STORAGE_DTYPES = ("float16", "float32", "bfloat16")


def to_storage_torch(x: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """[rows, d] activations -> numpy in the store's representation (bfloat16 as its bits)."""
    import torch

    y = x.to(getattr(torch, storage_dtype))
    if storage_dtype == "bfloat16":
        return y.view(torch.int16).cpu().numpy().view(np.uint16)
    return y.cpu().numpy()


class RealRows:
    """The `reduce` of extraction's hooks: inside each hook, a site's real positions are gathered
    (on the model's device) and summed per clip, so the padded activation is freed as the forward
    goes on and only real rows travel to the host, already in the stored dtype."""

    def __init__(self, adapter: Adapter, batch: Batch, sites: list[str], storage_dtype: str):
        import torch

        self.storage_dtype = storage_dtype
        self.positions = {t: adapter.positions(batch, t) for t in dict.fromkeys(tower_of(s) for s in sites)}
        flat = batch.meta.get("flat_towers", set())  # towers whose activations are [row, d] over the batch
        self._index = {}
        for tower, pos in self.positions.items():
            counts = [len(p) for p in pos]
            rows = np.concatenate([p.index for p in pos])
            clip = np.repeat(np.arange(len(pos)), counts)
            self._index[tower] = (None if tower in flat else torch.as_tensor(clip), torch.as_tensor(rows), counts)

    def __call__(self, act: torch.Tensor, site: str) -> tuple[list[np.ndarray], np.ndarray]:
        """-> (each clip's [frame, d] in the stored representation, [clip, d] float32 means)."""
        import torch

        b, t, n = self._index[tower_of(site)]
        dev = act.device
        rows = act[t.to(dev)] if b is None else act[b.to(dev), t.to(dev)]
        ends = np.cumsum(n)
        if dev.type == "cpu":  # means in numpy, one pass each: torch's small parallel reductions stall on a busy CPU
            rows32 = rows.float().numpy()  # exact for every model dtype
            # float64 sums: a clip's mean must not depend on where its rows sit in the batch's buffer
            # (a mean per slice: ~10x faster than np.add.reduceat along axis 0)
            pooled = np.stack([rows32[a:b].mean(0, dtype=np.float64) for a, b in zip(ends - n, ends)])
        else:  # on the accelerator: reduce there, move only real rows in the stored dtype
            pooled = torch.stack([r.float().mean(0) for r in rows.split(n)]).cpu().numpy()
        stored = to_storage_torch(rows, self.storage_dtype)  # on the CPU ~8x faster than numpy's cast to float16
        return np.split(stored, ends[:-1]), pooled.astype(np.float32)


def store_attrs(adapter: Adapter, manifest: pd.DataFrame, config: dict | None, clip_range: tuple[int, int]) -> dict:
    param = next(adapter.model.parameters())
    return {
        "model_id": adapter.model_id, "revision": adapter.revision, "family": adapter.family,
        "sample_rate": adapter.sample_rate, "frame_rate": adapter.frame_rate,
        "model_dtype": str(param.dtype).removeprefix("torch."), "device": str(param.device),
        "input_regime": adapter.input_regime,
        "config_digest": config_digest(config or {}), "versions": package_versions(),
        "clip_range": list(clip_range), "n_clips_total": len(manifest),
        "clip_ids_digest": clip_ids_digest(manifest["clip_id"].astype(str).tolist()),
    }


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse rather than hand it back to the system
    (fixed mmap threshold of 32 MiB, no trimming, the heap grown 1 GiB at a time): between a
    model's blocks, the hooks' copies of real rows otherwise move its dynamic threshold so that the
    forward's next large tensors come from fresh pages, each zeroed by a page fault (measured on
    Whisper base, 16 clips: 120k-700k faults and up to 1.6 s of system time per pass, none once
    set). Freed memory stays with the process until it exits. False where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(mallopt(k, v) for k, v in ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 2**31 - 1),
                                          (m_top_pad, 1 << 30)))


def extract_store(manifest: pd.DataFrame, adapter: Adapter, sites: list[str], out_path: str | Path,
                  load_wave: Callable[[str], np.ndarray] | None = None, batch_size: int = 8,
                  chunk_clips: int = 64, storage_dtype: str = "float16", config: dict | None = None,
                  progress: bool = True, clip_range: tuple[int, int] | None = None,
                  load_clip: Callable[[dict], Any] | None = None) -> Path:
    """Run `adapter` over the manifest's clips (or the slice `clip_range`) and write pooled and
    per-position activations of `sites` to `out_path`. See the module docstring for chunks,
    resuming and shards. `load_clip(row)` overrides how a clip's input is read (default:
    `clip_loader(adapter, load_wave)`)."""
    from tqdm import tqdm

    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype {storage_dtype!r}: choose one of {STORAGE_DTYPES}")
    sites = adapter.sites(sites)
    out_path = Path(out_path)
    lo, hi = clip_range or (0, len(manifest))
    if not 0 <= lo < hi <= len(manifest):
        raise ValueError(f"clip_range ({lo}, {hi}) is not a non-empty slice of the {len(manifest)} clips")
    load_clip = load_clip or clip_loader(adapter, load_wave)
    if _generated(adapter, sites):  # how the generation run is made changes what is stored
        config = {**(config or {}), "generation_settings": adapter.generation_settings}
    attrs = store_attrs(adapter, manifest, config, (lo, hi))
    if attrs["device"] == "cpu":
        keep_freed_memory()

    parts_dir = out_path.with_name(out_path.name + ".parts")
    growing = parts_dir / "store.h5"
    parts_dir.mkdir(parents=True, exist_ok=True)
    for f in parts_dir.iterdir():  # what older versions left (chunk files), and a resume cut short
        if f != growing:
            f.unlink()
    clip_ids = manifest["clip_id"].astype(str).tolist()
    writer = ResumableStoreWriter.resume(out_path, growing, lambda got: _same(got, attrs, sites, storage_dtype))
    done = writer.clips_written if writer else 0
    bar = tqdm(total=hi - lo, initial=done, desc=f"extract {adapter.model_id}", unit="clip", disable=not progress)
    try:
        for a in range(lo + done, hi, chunk_clips):
            b = min(a + chunk_clips, hi)
            t0 = time.perf_counter()
            per_clip, positions, pooled = _extract_chunk(manifest, adapter, sites, load_clip, (a, b), batch_size,
                                                         storage_dtype, bar)
            if writer is None:
                dims = {s: int(per_clip[s][0].shape[1]) for s in sites}
                writer = ResumableStoreWriter(out_path, growing, dims, clip_ids[lo:hi], attrs, storage_dtype,
                                              {s: adapter.site_attrs(s) for s in sites})
            writer.append(per_clip, positions=positions, pooled=pooled)
            writer.commit()
            log.info("clips %d-%d done in %.1f s", a, b, time.perf_counter() - t0)
    except BaseException:
        if writer is not None and writer.clips_written:
            writer.suspend()  # the committed clips stay for the rerun
        elif writer is not None:
            writer.abort()
        raise
    bar.close()
    writer.close()
    shutil.rmtree(parts_dir)
    return out_path


def _same(got: dict, want: dict, sites: list[str], storage_dtype: str) -> bool:
    """Whether a store left by an earlier run was made by these settings (else it is redone)."""
    expect = {**{k: want.get(k) for k in MERGE_KEYS}, "sites": json.dumps(sites), "storage_dtype": storage_dtype,
              "towers": json.dumps(towers_of(sites)), "clip_range": json.dumps(want["clip_range"])}
    return all(got.get(k) == v for k, v in expect.items())


def _generated(adapter: Adapter, sites: list[str]) -> list[str]:
    """The sites of towers the adapter reads from a generation run, not from `forward`."""
    towers = set(getattr(adapter, "generated_towers", ()))
    return [s for s in sites if tower_of(s) in towers]


def _extract_chunk(manifest, adapter, sites, load_clip, clip_range, batch_size, storage_dtype, bar):
    """Clips [a, b) of the manifest through the model: per site each clip's stored frames, per
    tower each clip's positions, per site the pooled means."""
    a, b = clip_range
    rows = manifest.iloc[a:b]
    items = [load_clip(r) for r in rows.to_dict("records")]
    per_clip: dict[str, list] = {s: [None] * len(items) for s in sites}
    pooled: dict[str, np.ndarray] = {}
    towers = list(dict.fromkeys(tower_of(s) for s in sites))
    positions: dict[str, list] = {t: [None] * len(items) for t in towers}
    generated = _generated(adapter, sites)
    forward_sites = [s for s in sites if s not in generated]
    import torch

    for idx in duration_batches(np.array([_size(x) for x in items]), batch_size) if forward_sites else ():
        batch = adapter.prepare([items[i] for i in idx])
        real = RealRows(adapter, batch, forward_sites, storage_dtype)
        with torch.inference_mode(), adapter.hooks(capture=forward_sites, reduce=real) as cache:
            adapter.forward(batch)
        missing = [s for s in forward_sites if s not in cache]
        if missing:
            raise RuntimeError(f"{adapter.family}: the forward pass never reached {missing}")
        for s in forward_sites:
            frames, means = cache[s]
            pooled.setdefault(s, np.zeros((len(items), means.shape[1]), dtype=np.float32))[idx] = means
            for j, i in enumerate(idx):
                per_clip[s][i] = frames[j]
        for t in real.positions:
            for j, i in enumerate(idx):
                positions[t][i] = real.positions[t][j]
        if not generated:
            bar.update(len(idx))
    clip_ids = rows["clip_id"].astype(str).tolist()
    for i, item in enumerate(items if generated else ()):  # one generation run per clip
        try:
            got = adapter.generated_rows(item, generated)
        except ValueError as e:
            raise ValueError(f"clip {clip_ids[i]}: {e}") from e
        for s in generated:
            per_clip[s][i] = to_storage(got.frames[s], storage_dtype)
            pooled.setdefault(s, np.zeros((len(items), len(got.pooled[s])), dtype=np.float32))[i] = got.pooled[s]
        for t, pos in got.positions.items():
            positions[t][i] = pos
        bar.update(1)
    return per_clip, positions, pooled
