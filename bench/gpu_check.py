"""GPU check: the embedded default's model and corpus (Whisper tiny.en x the espeak-ng demo corpus)
and a Whisper-base RAVDESS slice, run on one device in float32, bfloat16 and float16:

  - agreement of the stored activations with float32 on the same device, per site, over real
    frames only (mean and worst frame cosine, relative error ||a - b|| / ||b||), and with float32
    on the CPU (`--cpu-reference`: what a store made on a laptop and one made on a GPU share);
  - the probe sweep (speaker-grouped folds, pooled out-of-fold macro-F1 and accuracy) on each
    dtype's store, and its largest difference from float32;
  - exact patching of a few sad/happy pairs (every site x 0.5 s windows) per dtype, and its
    largest difference from float32 in the normalised effect;
  - throughput per stage: extraction (clips/s, audio seconds/s), probe sweep, patching (pairs/s).

    python bench/gpu_check.py run --device cuda --out gpu_check    # needs the `test` extra's weights
    python bench/gpu_check.py run --device cpu --dtypes float32,bfloat16 --clips 16
    python bench/gpu_check.py pack PACK    # weights + clips for a machine without the pip packages
    python bench/gpu_check.py run --device cuda --pack PACK --out gpu_check
    bash bench/gpu_check.sh --device cuda   # the same, with the wheels a bare GPU box lacks

`pack` writes each model's encoder weights exactly as the pip packages ship them (float16) plus
its config, and the two corpora as FLAC with their manifests, so that a GPU machine with torch and
transformers but without internet or the packages can run the check (only encoder sites are read;
the decoder is left at random init there and never runs). Writes agreement.tsv, probes.tsv,
patch.tsv, throughput.tsv and summary.md under --out and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_extract import load_wave  # noqa: F401  (bench/ is on the path: this file runs as a script)

ROOT = Path(__file__).resolve().parents[1]
RAVDESS = ROOT.parent / "shared" / "data" / "ravdess"
# case -> (model name, pip source, corpus, readout site for the patching metric)
CASES = {  # case: (the config file that defines the model, model name, dataset name)
    "default": ("config/config.yaml", "whisper-tiny-en", "demo"),
    "ravdess": ("config/studies/ravdess_whisper.yaml", "whisper-base", "ravdess"),
}
PATCH_CONTRAST = ("sad", "happy")
WINDOW_S = 0.5


def model_section(config: str, name: str) -> dict:
    """Model `name`'s section (source, sites, readout site) of the workflow config file `config`
    (relative to the repository): the benches restate nothing about a model."""
    import yaml

    return yaml.safe_load((ROOT / config).read_text())["models"][name]


def case_model(case: str) -> dict:
    path, name, _ = CASES[case]
    return model_section(path, name)


# --- corpora -------------------------------------------------------------------------------------
def demo_corpus(out: Path, sentences: int = 0) -> pd.DataFrame:
    """The embedded default's corpus, built with the settings in config/config.yaml (its first
    `sentences` sentences only, when given)."""
    import yaml

    from affectlens.data.demo import DEFAULT_SENTENCES, build_demo_corpus

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["datasets"]["demo"]["demo"]
    return build_demo_corpus(out, speakers=cfg["speakers"], emotions=cfg["emotions"], seed=cfg["seed"],
                             sentences=DEFAULT_SENTENCES[:sentences or cfg["n_sentences"]], progress=False)


def ravdess_corpus(folder: Path, actors: int, repetitions=("01",), intensities=("01",)) -> pd.DataFrame:
    """A RAVDESS slice: the first `actors` actors, every emotion, both statements, the given
    repetitions and intensities (default repetition 1, normal intensity: 16 clips per actor)."""
    from affectlens.data.ravdess import EMOTIONS, NAME

    rows = []
    for f in sorted(folder.rglob("*.flac")) or sorted(folder.rglob("*.wav")):
        m = NAME.match(f.stem)
        if not m:
            continue
        _, _, emotion, intensity, statement, repetition, actor = m.groups()
        if int(actor) <= actors and repetition in repetitions and intensity in intensities:
            rows.append({"clip_id": f.stem, "path": str(f), "label": EMOTIONS[emotion], "speaker": f"actor{actor}",
                         "pair_key": f"actor{actor}_st{statement}"})
    if not rows:
        raise FileNotFoundError(f"{folder}: no RAVDESS clips (03-01-EE-II-SS-RR-AA.flac); pass the RAVDESS folder")
    return pd.DataFrame(rows)


def corpus(case: str, args, scratch: Path) -> pd.DataFrame:
    name = CASES[case][2]
    if args.pack:
        m = pd.read_csv(args.pack / name / "manifest.tsv", sep="\t", dtype={"clip_id": str})
        m["path"] = [str(args.pack / name / p) for p in m["path"]]
    else:
        m = demo_corpus(scratch / name, args.sentences) if name == "demo" else ravdess_corpus(args.ravdess, args.actors)
    if args.clips:  # spread over speakers and labels
        m = m.iloc[np.linspace(0, len(m) - 1, min(args.clips, len(m))).round().astype(int)]
    return m.reset_index(drop=True)[["clip_id", "path", "label", "speaker", "pair_key"]]


# --- models --------------------------------------------------------------------------------------
def adapter_for(case: str, args, device: str, dtype: str):
    from affectlens.models.whisper import DTYPES, WhisperAdapter

    name, source = CASES[case][1], case_model(case)["source"]
    if not args.pack:
        return WhisperAdapter.from_source(source, device=device, dtype=dtype)
    import torch
    from safetensors import safe_open
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    path = args.pack / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        encoder = {k: f.get_tensor(k) for k in f.keys()}
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig.from_dict(json.loads(meta["config"])))
    model.get_encoder().load_state_dict(encoder, strict=True)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    return WhisperAdapter(model, source, meta["revision"], device)


def pack(out: Path, args) -> None:
    """Encoder weights (float16, as shipped) + config per model, and both corpora as FLAC."""
    from safetensors.torch import save_file

    from affectlens.models.whisper import load_whisper

    out.mkdir(parents=True, exist_ok=True)
    for case, (name, source, corpus_name, _) in CASES.items():
        model, _, _, rev = load_whisper(source)
        encoder = {k: v.to("cpu").half().contiguous() for k, v in model.get_encoder().state_dict().items()}
        save_file(encoder, str(out / f"{name}.safetensors"),
                  metadata={"config": model.config.to_json_string(), "revision": rev, "source": source})
        folder = out / corpus_name
        if folder.exists():
            shutil.rmtree(folder)
        with tempfile.TemporaryDirectory() as tmp:
            m = demo_corpus(Path(tmp), args.sentences) if corpus_name == "demo" else ravdess_corpus(args.ravdess, args.actors)
            rel = []
            for clip_id, path in zip(m["clip_id"], m["path"]):
                target = folder / f"{clip_id}{Path(path).suffix}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                rel.append(target.name)
            m.assign(path=rel)[["clip_id", "path", "label", "speaker", "pair_key"]].to_csv(
                folder / "manifest.tsv", sep="\t", index=False)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"pack {out}: {total / 2**20:.1f} MiB")


# --- the measurements ----------------------------------------------------------------------------
def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def extract(adapter, manifest, waves, out: Path, batch_size: int, sites: list[str]) -> float:
    from affectlens.extract import extract_store

    lookup = dict(zip(manifest["path"], waves))
    t0 = time.perf_counter()
    extract_store(manifest, adapter, sites, out, load_wave=lookup.__getitem__, batch_size=batch_size,
                  chunk_clips=max(len(manifest), 1), storage_dtype="float32", progress=False)
    sync(str(adapter.device))
    return time.perf_counter() - t0


def tiled_throughput(adapter, manifest, waves, tile: int, batch: int, out: Path, case: str, label: str) -> list[dict]:
    """Extraction of the corpus repeated `tile` times, and the input preparation alone (log-mel
    features on the CPU, moved to the device) over the same batches: how much of extraction is
    not the model."""
    import torch

    from affectlens.extract import duration_batches

    big = pd.concat([manifest.assign(clip_id=manifest.clip_id + f"~{i}", path=manifest.path + f"~{i}")
                     for i in range(tile)], ignore_index=True)
    big_waves = [w for _ in range(tile) for w in waves]
    audio_s = sum(len(w) for w in big_waves) / 16000
    seconds = extract(adapter, big, big_waves, out, batch, case_model(case)["sites"])
    out.unlink()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for idx in duration_batches(np.array([len(w) for w in big_waves]), batch):
            adapter.prepare([big_waves[i] for i in idx])
    sync(str(adapter.device))
    prep = time.perf_counter() - t0
    row = {"case": case, "run": label, "items": len(big_waves)}
    return [{**row, "stage": f"extract x{tile}", "seconds": seconds, "per_s": len(big_waves) / seconds,
             "audio_s_per_s": audio_s / seconds},
            {**row, "stage": f"prepare x{tile}", "seconds": prep, "per_s": len(big_waves) / prep,
             "audio_s_per_s": audio_s / prep}]


def agreement(store_path: Path, ref_path: Path) -> list[dict]:
    """Per site: cosine of each real frame with the reference's (mean, 1st percentile, worst),
    relative error ||a - b|| / ||b||."""
    from affectlens.store import Store

    rows = []
    with Store(store_path) as s, Store(ref_path) as r:
        for site in r.sites:
            a = s.h5[f"sites/{site}/frames"][:].astype(np.float64)
            b = r.h5[f"sites/{site}/frames"][:].astype(np.float64)
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
            rows.append({"site": site, "frames": len(a), "cosine_mean": cos.mean(),
                         "cosine_p1": np.percentile(cos, 1), "cosine_min": cos.min(),
                         "rel_error": np.linalg.norm(a - b) / np.linalg.norm(b)})
    return rows


def probes(store_path: Path, manifest: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, float]:
    from affectlens.probes.sweep import probe_sweep

    t0 = time.perf_counter()
    df = probe_sweep(store_path, manifest, n_splits=4, seed=seed, control=False, n_boot=200)
    seconds = time.perf_counter() - t0
    df = df[(df["probe"] == "label") & df["metric"].isin(["macro_f1", "accuracy"])]
    return df[["site", "metric", "value", "ci_low", "ci_high"]].reset_index(drop=True), seconds


def patch_pairs(manifest: pd.DataFrame, n_pairs: int) -> list[tuple[int, int]]:
    """(clean = target, corrupt = source) rows sharing speaker and sentence."""
    source, target = PATCH_CONTRAST
    by_key = manifest.groupby("pair_key")
    pairs = []
    for _, g in by_key:
        s, t = g.index[g["label"] == source], g.index[g["label"] == target]
        if len(s) and len(t):
            pairs.append((int(t[0]), int(s[0])))
    return pairs[:n_pairs]


def patch(adapter, manifest, waves, store32: Path, readout_site: str, sites: list[str], pairs) -> tuple[pd.DataFrame, float]:
    import torch

    from affectlens.patching.patch import ProbeLogitDiff, patch_pair, time_windows
    from affectlens.probes.sweep import fit_readout

    probe = fit_readout(store32, manifest, readout_site, classes=list(PATCH_CONTRAST))
    metric = ProbeLogitDiff.from_readout(readout_site, *probe.readout(), *PATCH_CONTRAST)
    metric.weight, metric.bias = metric.weight.to(adapter.device), metric.bias.to(adapter.device)
    sites = adapter.sites(sites)
    frames_per_window = int(round(WINDOW_S * adapter.frame_rate))
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for clean_i, corrupt_i in pairs:
            clean, corrupt = adapter.prepare([waves[clean_i]]), adapter.prepare([waves[corrupt_i]])
            n = max(clean.n_frames[0], corrupt.n_frames[0])
            df = patch_pair(adapter, clean, corrupt, sites, time_windows(n, frames_per_window, frames_per_window), metric)
            out.append(df.assign(pair=f"{manifest.clip_id[clean_i]}|{manifest.clip_id[corrupt_i]}"))
    sync(str(adapter.device))
    return pd.concat(out, ignore_index=True), time.perf_counter() - t0


def run_case(case: str, args, out: Path, scratch: Path) -> dict[str, list]:
    import torch

    manifest = corpus(case, args, scratch)
    waves = [load_wave(p) for p in manifest["path"]]
    audio_s = sum(len(w) for w in waves) / 16000
    pairs = patch_pairs(manifest, args.pairs)
    readout, sites = case_model(case)["readout_site"], case_model(case)["sites"]
    runs = [(args.device, d) for d in args.dtypes]
    if args.cpu_reference and args.device != "cpu":
        runs.append(("cpu", "float32"))
    res: dict[str, list] = {"agreement": [], "probes": [], "patch": [], "throughput": []}
    stores, patches = {}, {}
    ref = f"{args.device.split(':')[0]}-float32"  # float32 runs first (main checks it), so its store is there
    for device, dtype in runs:
        label = f"{device.split(':')[0]}-{dtype}"
        adapter = adapter_for(case, args, device, dtype)
        batch = args.batch_size if device != "cpu" else min(args.batch_size, 8)
        extract(adapter, manifest.iloc[:batch], waves[:batch], scratch / f"{case}-{label}-warm.h5", batch, sites)  # warm-up
        stores[label] = scratch / f"{case}-{label}.h5"
        seconds = min(extract(adapter, manifest, waves, stores[label].with_suffix(f".{r}.h5"), batch, sites)
                      for r in range(args.repeats))
        stores[label].with_suffix(".0.h5").replace(stores[label])
        res["throughput"].append({"case": case, "run": label, "stage": "extract", "seconds": seconds, "items": len(waves),
                                  "per_s": len(waves) / seconds, "audio_s_per_s": audio_s / seconds})
        if args.tile > 1 and device == args.device:  # throughput at a size where fixed costs fade
            res["throughput"] += tiled_throughput(adapter, manifest, waves, args.tile, batch, scratch / f"{case}-{label}-tiled.h5",
                                                  case, label)
        probe_df, probe_s = probes(stores[label], manifest, args.seed)
        res["probes"].append(probe_df.assign(case=case, run=label))
        res["throughput"].append({"case": case, "run": label, "stage": "probe_sweep", "seconds": probe_s,
                                  "items": probe_df["site"].nunique(), "per_s": probe_df["site"].nunique() / probe_s})
        if pairs and device == args.device:  # the CPU reference is for the stored activations only
            patches[label], patch_s = patch(adapter, manifest, waves, stores[ref], readout, sites, pairs)
            res["throughput"].append({"case": case, "run": label, "stage": "patch", "seconds": patch_s, "items": len(pairs),
                                      "per_s": len(pairs) / patch_s, "cells": len(patches[label])})
        del adapter
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    for label, path in stores.items():
        if label != ref and ref in stores:
            res["agreement"] += [{"case": case, "run": label, "reference": ref, **r} for r in agreement(path, stores[ref])]
        if label != ref and ref in patches and label in patches:
            a, b = patches[label]["normalised"].to_numpy(), patches[ref]["normalised"].to_numpy()
            ok = np.isfinite(a) & np.isfinite(b)
            res["patch"].append({"case": case, "run": label, "reference": ref, "cells": int(ok.sum()),
                                 "max_abs_diff": float(np.abs(a[ok] - b[ok]).max()) if ok.any() else np.nan,
                                 "pearson": float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 2 else np.nan})
    return res


def summary(tables: dict[str, pd.DataFrame], args) -> str:
    import platform

    import torch
    import transformers

    lines = [f"# GPU check on {device_name(args.device)}", "",
             f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}; "
             f"dtypes {', '.join(args.dtypes)}; TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
             f"TF32 cuDNN {torch.backends.cudnn.allow_tf32}; pack {args.pack or 'no (pip packages)'}", ""]
    ag = tables["agreement"]
    if len(ag):
        worst = ag.groupby(["case", "run", "reference"]).agg(
            sites=("site", "count"), cosine_mean_min=("cosine_mean", "min"), cosine_worst_frame=("cosine_min", "min"),
            rel_error_max=("rel_error", "max")).reset_index()
        lines += ["## Stored activations against float32 (worst site)", "", worst.to_markdown(index=False, floatfmt=".4g"), ""]
    pr = tables["probes"]
    if len(pr):
        wide = pr.pivot_table(index=["case", "site", "metric"], columns="run", values="value").reset_index()
        lines += ["## Probe sweep (pooled out-of-fold, speaker-grouped)", "", wide.to_markdown(index=False, floatfmt=".3f"), ""]
    if len(tables["patch"]):
        lines += ["## Exact patching against float32", "", tables["patch"].to_markdown(index=False, floatfmt=".4g"), ""]
    tp = tables["throughput"]
    lines += ["## Throughput per stage", "", tp.to_markdown(index=False, floatfmt=".3g"), ""]
    return "\n".join(lines)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"{device} ({os.cpu_count()} CPU cores)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write weights and clips for an offline GPU machine")
    p.add_argument("out", type=Path)
    r = sub.add_parser("run", help="run the check")
    r.add_argument("--device", default="cuda")
    r.add_argument("--dtypes", default="float32,bfloat16,float16", type=lambda s: s.split(","))
    r.add_argument("--cases", default="default,ravdess", type=lambda s: s.split(","))
    r.add_argument("--pack", type=Path, help="a folder written by `pack` (else the pip packages and ../shared)")
    r.add_argument("--out", type=Path, default=Path("gpu_check"))
    r.add_argument("--clips", type=int, default=0, help="at most this many clips per case (0: all)")
    r.add_argument("--pairs", type=int, default=4, help="sad/happy pairs patched per case")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--tile", type=int, default=0, help="also time extraction of the corpus repeated this many times")
    r.add_argument("--repeats", type=int, default=2, help="extraction timings: best of this many")
    r.add_argument("--cpu-reference", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--seed", type=int, default=0)
    for q in (p, r):
        q.add_argument("--ravdess", type=Path, default=RAVDESS)
        q.add_argument("--actors", type=int, default=6, help="RAVDESS actors in the slice (16 clips each)")
        q.add_argument("--sentences", type=int, default=0,
                       help="demo corpus sentences (16 clips each; 0: the embedded default's 8)")
    args = ap.parse_args(argv)
    if args.command == "pack":
        return pack(args.out, args)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    if args.dtypes[0] != "float32":
        sys.exit("--dtypes must start with float32 (the reference the others are compared with)")
    unknown = set(args.cases) - set(CASES)
    if unknown:
        sys.exit(f"--cases {sorted(unknown)}: choose among {sorted(CASES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    tables: dict[str, list] = {"agreement": [], "probes": [], "patch": [], "throughput": []}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            t0 = time.perf_counter()
            for k, v in run_case(case, args, args.out, Path(tmp)).items():
                tables[k] += v
            print(f"{case}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    frames = {k: (pd.concat(v, ignore_index=True) if v and isinstance(v[0], pd.DataFrame) else pd.DataFrame(v))
              for k, v in tables.items()}
    for k, df in frames.items():
        df.to_csv(args.out / f"{k}.tsv", sep="\t", index=False)
    text = summary(frames, args)
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
