"""`patch.exact: top_k` against the full exact grid (`exact: all`) on a finished run's store and
manifest: the workflow's patch stage runs both ways (timed, into --out), and per direction it
prints how many of each pair's k largest exact effects attribution's top k screened in (for the
configured k and the --also-k values, read off the full run, which holds both methods on every
cell), how many pairs kept their largest exact cell, whether the mean map's top cell survives, and
the chance level k / cells. The screened run's exact rows must equal the full run's on its cells.

    python bench/bench_patch_top_k.py --run-dir /work/defaultrun --out /tmp/top_k --threads 2

--run-dir is the workflow's working directory (results/extract, results/decode; the manifest's
audio paths are relative to it); nothing is written there.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["pair_id", "direction", "site", "frame_start"]


def workflow_config(path: Path) -> dict:
    """The config as the workflow sees it: validated against the schema, defaults filled."""
    from snakemake.utils import validate

    cfg = yaml.safe_load(path.read_text())
    validate(cfg, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    return cfg


def run_stage(run_dir: Path, cfg: dict, dataset: str, model: str, contrast: str, out: Path, **patch) -> float:
    """The patch stage as the `patch` rule runs it, with `patch` settings on top; wall seconds."""
    from affectlens import stages

    source, target = contrast.split("-to-")
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    stages.patch.patch(run_dir / f"results/extract/{dataset}/{model}.h5",
                       run_dir / f"results/decode/{dataset}/manifest.tsv", cfg["models"][model], {"source": source, "target": target}, {**cfg["patch"], **patch},
                       cfg["datasets"][dataset]["label_column"], out / "pairs.tsv", out / "effects.tsv",
                       out / "summary.tsv", out / "agreement.tsv")
    return time.perf_counter() - t


def recall(effects: pd.DataFrame, k: int) -> pd.DataFrame:
    """Per direction, over pairs: cells of the exact grid's top k that attribution's top k holds,
    pairs whose largest exact cell it holds, and the grid's cells per pair."""
    from affectlens.patching.patch import top_cells

    rows = []
    for pair, e in effects.groupby("pair_id", sort=False):
        exact, screened = (top_cells(e[e["method"] == m], k) for m in ("exact", "attribution"))
        first = top_cells(e[e["method"] == "exact"], 1)
        for direction in ("denoising", "noising"):
            want = {c for c in exact if c[0] == direction}
            rows.append({"direction": direction, "found": len(want & screened), "wanted": len(want),
                         "top_cell_kept": bool({c for c in first if c[0] == direction} <= screened),
                         "cells": int(((e["method"] == "exact") & (e["direction"] == direction)).sum())})
    df = pd.DataFrame(rows)
    return df.groupby("direction").agg(found=("found", "sum"), wanted=("wanted", "sum"),
                                       top_cell_kept=("top_cell_kept", "sum"), pairs=("found", "size"),
                                       cells=("cells", "mean"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished run's working directory")
    ap.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--model", default="whisper-tiny-en")
    ap.add_argument("--contrast", default="sad-to-happy")
    ap.add_argument("--top-k", type=int, default=None, help="the screened run's k (default: patch.top_k)")
    ap.add_argument("--also-k", type=int, nargs="*", default=[5, 20], help="recall read off the full run too")
    ap.add_argument("--out", type=Path, required=True, help="where both runs' outputs go")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from affectlens.patching.attribution import top_cell

    cfg = workflow_config(args.config.resolve())
    k = args.top_k or cfg["patch"]["top_k"]
    out = args.out.resolve()
    os.chdir(args.run_dir)  # the manifest's audio paths are relative to the run's working directory
    where = (Path("."), cfg, args.dataset, args.model, args.contrast)
    t_all = run_stage(*where, out / "all", exact="all")
    t_top = run_stage(*where, out / "top_k", exact="top_k", top_k=k)
    full, top = (pd.read_csv(out / name / "effects.tsv", sep="\t") for name in ("all", "top_k"))
    exact = [e[e["method"] == "exact"].set_index(KEYS)["raw"] for e in (full, top)]
    diff = float((exact[1] - exact[0].loc[exact[1].index]).abs().max())
    print(f"{args.dataset} x {args.model}, {args.contrast}, {full['pair_id'].nunique()} pairs, "
          f"{args.threads} thread(s)")
    print(f"patch stage, exact: all   {t_all:7.1f} s ({len(exact[0])} exact cells)")
    print(f"patch stage, exact: top_k {t_top:7.1f} s ({len(exact[1])} exact cells, k = {k}): "
          f"{1 - t_top / t_all:.0%} less time; max |top_k - all| on its cells {diff:.1e}")
    summaries = [pd.read_csv(out / name / "summary.tsv", sep="\t") for name in ("all", "top_k")]
    for direction in ("denoising", "noising"):
        tops = [top_cell(s[s["method"] == "exact"], direction) for s in summaries]
        print(f"{direction}: mean-map top exact cell, all {tops[0][0]}@{tops[0][1]}, top_k {tops[1][0]}@{tops[1][1]}"
              f" ({'same' if tops[0] == tops[1] else 'differs'})")
    print("exact grid's top k per pair and direction, found by attribution's top k:")
    for kk in sorted({k, *args.also_k}):
        for r in recall(full, kk).itertuples():
            print(f"  k = {kk:2d} {r.Index:9s}: {r.found}/{r.wanted} cells ({r.found / r.wanted:.0%}; chance "
                  f"{kk / r.cells:.0%} of {r.cells:.0f} cells), largest cell kept in {r.top_cell_kept}/{r.pairs} pairs")
    if diff > 1e-5:
        raise SystemExit(f"top_k's exact cells differ from the full grid's by {diff:.2e} > 1e-5")


if __name__ == "__main__":
    main()
