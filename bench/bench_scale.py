"""Scale benchmark: a synthetic corpus grown x1, x4, x16, and per stage (extraction, probes, SAE
training, patching) the wall time and the peak memory, each measured in a fresh subprocess.

The corpus is synthetic "acted prosody" (tones whose pitch, range and level depend on the label,
jittered per speaker and clip; every speaker says every "sentence" in every label, so
counterfactual pairs exist); the model is a tiny random-init wav2vec2 saved in the Hugging Face
layout (a local folder, the loader's real path). Every stage is the workflow's own function
(`affectlens.stages`), with work that grows with the corpus: the SAE trains for a fixed number of
epochs over the frames, patching draws pairs in proportion to the clips. So the expectation is:
time about linear in the corpus, peak memory flat (everything is streamed).

Memory: each measurement is a fresh process that first imports what the stage needs; then the
kernel's peak-RSS mark is reset (/proc/self/clear_refs), so `peak RSS` is the high-water mark
during the stage alone and `growth` that peak minus the RSS when the stage began (everything the
stage itself held at its worst: model, data, buffers).

    python bench/bench_scale.py                  # x1, x4, x16 of 8 speakers x 8 sentences x 2 labels
    python bench/bench_scale.py --speakers 2 --scales 1 4

The tests (tests/test_faults.py, tests/test_determinism.py) build their corpus and model with the
helpers here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LABELS = ("sad", "happy")
SITES = ["encoder.embed", "encoder.blocks.*.resid_post"]
SAE_SITE = "encoder.blocks.1.resid_post"


# --- the corpus and the model -------------------------------------------------------------------------

def clip_wave(speaker: int, sentence: int, label: str, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """About 1 s of a voiced-like tone: label sets pitch, range and level; speaker the base pitch."""
    rng = np.random.default_rng([seed, speaker, sentence, LABELS.index(label) if label in LABELS else 9])
    f0 = 110.0 * 1.25 ** (speaker % 5) * (1.35 if label == "happy" else 0.9) * (1 + 0.03 * rng.standard_normal())
    seconds = (0.8 + 0.1 * (sentence % 4)) * (0.85 if label == "happy" else 1.1)
    t = np.arange(int(seconds * sr)) / sr
    contour = f0 * (1 + (0.15 if label == "happy" else 0.04) * np.sin(2 * np.pi * (1 + sentence % 3) * t))
    phase = 2 * np.pi * np.cumsum(contour) / sr
    amp = (0.35 if label == "happy" else 0.15) * (0.5 + 0.5 * np.sin(np.pi * t / seconds))
    x = amp * (np.sin(phase) + 0.4 * np.sin(2 * phase) + 0.2 * np.sin(3 * phase))
    return (x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def make_corpus(folder: str | Path, n_speakers: int = 4, n_sentences: int = 4, seed: int = 0,
                dataset: str = "synth") -> Path:
    """FLAC clips + a validated manifest (`folder/manifest.tsv`); returns the manifest path."""
    import pandas as pd

    from affectlens.data.manifest import write_manifest
    from affectlens.io import write_audio

    folder = Path(folder)
    rows = []
    for spk in range(n_speakers):
        for sent in range(n_sentences):
            for label in LABELS:
                clip = f"spk{spk:03d}_s{sent:02d}_{label}"
                path = folder / "audio" / f"{clip}.flac"
                x = clip_wave(spk, sent, label, seed=seed)
                write_audio(path, x, 16000)
                rows.append({"clip_id": clip, "dataset": dataset, "path": str(path), "split": "all", "label": label,
                             "speaker": f"spk{spk:03d}", "pair_key": f"spk{spk:03d}_s{sent:02d}", "text": "",
                             "start": np.nan, "end": np.nan, "duration": len(x) / 16000})
    return write_manifest(pd.DataFrame(rows), folder / "manifest.tsv")


def make_model(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random-init wav2vec2 (2 blocks, d = 32) saved as a Hugging Face folder."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    folder = Path(folder)
    torch.manual_seed(seed)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                         conv_dim=(8,) * 7, num_conv_pos_embedding_groups=2, num_conv_pos_embeddings=8)
    Wav2Vec2Model(cfg).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(folder)
    return folder


def workflow_config(model_folder: str | Path, **sections) -> dict:
    """A config validated against the workflow's schema (defaults filled), tiny settings."""
    from snakemake.utils import validate

    cfg = {"datasets": {"synth": {"source": "folder"}},
           "models": {"tiny": {"family": "wav2vec2", "source": str(model_folder), "sites": SITES, "device": "cpu",
                               "batch_size": 8, "chunk_clips": 16, "storage_dtype": "float32",
                               "sae_sites": [SAE_SITE], "readout_site": SAE_SITE}},
           "studies": {"s": {"datasets": ["synth"], "models": ["tiny"], "contrasts": [{"source": "sad",
                                                                                      "target": "happy"}]}},
           "probe": {"n_permutations": 9, "n_boot": 50, "n_splits": 2},
           "sae": {"expansion": 2, "k": 4, "n_samples": 4096, "batch_size": 256, "fidelity_clips": 0,
                   "dashboard_features": 4},
           "patch": {"n_pairs": 2, "window_s": 0.25, "stride_s": 0.25}}
    for key, value in sections.items():
        cfg[key].update(value)
    validate(cfg, str(Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"))
    return cfg


# --- the stages, as the workflow calls them -------------------------------------------------------------

def run_stage(stage: str, work: Path, cfg: dict) -> None:
    from affectlens import stages

    model = cfg["models"]["tiny"]
    manifest, store = work / "corpus" / "manifest.tsv", work / "results" / "store.h5"
    out = work / "results"
    if stage == "extract":
        stages.extract.extract(manifest, model, store)
    elif stage == "probe":
        stages.probe.probe(store, manifest, cfg["probe"], "label", out / "probe" / "sweep.tsv",
                     out / "probe" / "confusion.tsv", out / "probe" / "layer_curve.png", threads=1,
                     readout_site=model["readout_site"])
    elif stage == "sae":
        stages.sae.sae(store, manifest, SAE_SITE, cfg["sae"], "label", out / "sae",
                   checkpoint=out / "sae.checkpoint.pt")
    elif stage == "patch":
        d = out / "patch"
        stages.patch.patch(store, manifest, model, cfg["studies"]["s"]["contrasts"][0], cfg["patch"], "label",
                     d / "pairs.tsv", d / "effects.tsv", d / "summary.tsv", d / "agreement.tsv")
    else:
        raise ValueError(f"unknown stage {stage!r}")


STAGES = ("extract", "probe", "sae", "patch")


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _child(args) -> None:
    """One measurement: import and warm up everything the stage needs (so neither the time nor the
    memory counts one-off imports), reset the peak-RSS mark, run the stage, report."""
    import torch

    torch.set_num_threads(1)
    cfg = json.loads(Path(args.config).read_text())
    import affectlens.extract  # noqa: F401 - imports before the mark
    import affectlens.patching.patch  # noqa: F401
    import affectlens.probes.sweep  # noqa: F401
    import affectlens.sae.train  # noqa: F401
    import affectlens.stages  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model  # noqa: F401

    import gc

    gc.collect()
    exact = _reset_peak()
    before = _status_kib("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    run_stage(args.stage, Path(args.work), cfg)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024, "growth_mb": (peak - before) / 1024,
                      "baseline_mb": before / 1024}))


def measure(stage: str, work: Path, config_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", stage, "--work", str(work), "--config", str(config_path)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{stage} at {work} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speakers", type=int, default=8, help="speakers at x1 (x4 and x16 multiply them)")
    ap.add_argument("--sentences", type=int, default=8)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--work", type=Path, default=Path("/tmp/affectlens_bench_scale"))
    ap.add_argument("--child", choices=STAGES, dest="stage")
    ap.add_argument("--config")
    args = ap.parse_args()
    if args.stage:
        return _child(args)

    import shutil

    import h5py

    model = make_model(args.work / "model")
    rows = []
    for scale in args.scales:
        work = args.work / f"x{scale}"
        shutil.rmtree(work, ignore_errors=True)
        manifest = make_corpus(work / "corpus", n_speakers=args.speakers * scale, n_sentences=args.sentences)
        n_clips = sum(1 for _ in open(manifest)) - 1
        # work that grows with the corpus: 8 pairs per x1, and 2 SAE epochs
        pilot = workflow_config(model)
        config_path = work / "config.json"
        for stage in STAGES:
            if stage == "sae":
                with h5py.File(work / "results" / "store.h5") as f:
                    frames = int(f["offsets"][-1])
                pilot = workflow_config(model, sae={"n_samples": max(2048, 2 * frames)},
                                        patch={"n_pairs": 8 * scale})
            config_path.write_text(json.dumps(pilot))
            m = measure(stage, work, config_path)
            rows.append({"scale": scale, "clips": n_clips, "stage": stage, **m})
            print(f"x{scale:<3} {n_clips:5d} clips  {stage:8s} {m['seconds']:8.2f} s  peak RSS {m['peak_rss_mb']:7.1f} MiB"
                  f"  growth {m['growth_mb']:6.1f} MiB", flush=True)
    print()
    print(f"{'stage':8s} | " + " | ".join(f"x{s} ({r['clips']} clips) s / growth MiB / peak MiB"
                                           for s, r in zip(args.scales, [next(r for r in rows if r['scale'] == s)
                                                                          for s in args.scales])))
    for stage in STAGES:
        cells = [next(r for r in rows if r["scale"] == s and r["stage"] == stage) for s in args.scales]
        base = cells[0]["seconds"]
        print(f"{stage:8s} | " + " | ".join(f"{c['seconds']:7.2f} s ({c['seconds'] / base:4.1f}x) / {c['growth_mb']:6.1f} / "
                                            f"{c['peak_rss_mb']:6.0f}" for c in cells))
    print("\nper stage, time = fixed + slope x clips (least squares over the scales), and memory growth "
          "at the largest scale over the smallest:")
    for stage in STAGES:
        cells = [next(r for r in rows if r["scale"] == s and r["stage"] == stage) for s in args.scales]
        clips = np.array([c["clips"] for c in cells], float)
        secs = np.array([c["seconds"] for c in cells])
        slope, fixed = np.polyfit(clips, secs, 1) if len(cells) > 1 else (np.nan, np.nan)
        off = np.max(np.abs(fixed + slope * clips - secs) / secs) if len(cells) > 1 else np.nan
        print(f"{stage:8s} fixed {fixed:6.2f} s + {1000 * slope:6.2f} ms/clip (worst point {off:4.0%} off the line); "
              f"memory growth x{cells[-1]['growth_mb'] / max(cells[0]['growth_mb'], 1e-9):.2f} "
              f"for x{clips[-1] / clips[0]:.0f} clips")


if __name__ == "__main__":
    main()
