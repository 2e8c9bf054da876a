"""Side-by-side SAE benchmark: affectlens vs SAELens (and dictionary_learning, when it imports),
same activations, same settings, one run, printed as a table and as ratios.

Activations: Whisper base (real weights) encoder block 3 residual stream (`resid_post`) over 320
RAVDESS clips (~59k frames of d = 512; built and cached by bench/sae_data.py). Clips are ordered by
actor; the last 10% (unseen actors) are held out for evaluation.

Settings shared by every trainer: TopK, 8x expansion (4096 latents), k = 32, 1M training samples,
batch 1024, Adam at lr 1e-3, dead window 100k frames (for the AuxK loss of both), 2 CPU threads.
Each trainer runs its own recipe around that lr: ours holds decoder rows at unit norm and steps
them at `decoder_lr_scale` (10) x lr, which matches the turning speed SAELens' free decoder gets
from its 0.1-norm init (see SAEConfig.decoder_lr_scale), and decays the lr to 0 over the last 20%;
SAELens runs at a constant lr with its defaults (grad-norm clipping at 1, aux coefficient 1).
SAELens' `SAETrainer` is fed through its data-provider entry point (an iterator of batches), once
on the raw activations and once on mean-centred activations rescaled to E||x||^2 = d.

Reported per trainer: training throughput (samples/s, wall time of the training call), explained
variance and L0 on the held-out frames (all of them, and apart on the typical and the ~1% outlier
frames, see `outlier_frames`), and the dead fraction: latents that never fire on any frame of the
store (training and held-out). A compute-matched row trains ours again for as long as SAELens
(centred) took, at our measured rate (`--skip-equal-time` leaves it out).

    python bench/bench_sae.py                 # full run (~10-20 min on 2 loaded cores)
    python bench/bench_sae.py --samples 200000 # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sae_data import CACHE, SITE, ravdess_store  # noqa: E402

from affectlens.sae.registry import build  # noqa: E402
from affectlens.sae.train import (batches_from_chunks, evaluate, held_out_split, sample_rows,  # noqa: E402
                                  train_loop, training_stream)
from affectlens.store import Store  # noqa: E402


def load_frames(path: Path):
    with Store(path) as st:
        first_eval = held_out_split(st.offsets, 0.1)
        n_train = int(st.offsets[first_eval])
        frames = st.h5[f"sites/{SITE}/frames"][:].astype(np.float32)
    return frames, n_train


OUTLIER_FACTOR = 5.0  # a frame whose centred norm exceeds 5x the median is an outlier frame


def outlier_frames(frames: np.ndarray, n_train: int) -> np.ndarray:
    """[frame] bool: centred norm above OUTLIER_FACTOR x the median (mean and median of the
    training frames). On Whisper-base block 3 of RAVDESS, about 1% of frames (near the end of the
    real audio) have norms 10-40x the median in one dimension, which then holds ~3/4 of the
    variance: plain explained variance mostly measures how well those few frames are rebuilt."""
    mean = frames[:n_train].mean(0)
    norms = np.linalg.norm(frames - mean, axis=1)
    return norms > OUTLIER_FACTOR * np.median(norms[:n_train])


def _ev(x: np.ndarray, r: np.ndarray) -> float:
    x, r = x.astype(np.float64), r.astype(np.float64)
    return float(1 - ((x - r) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


@torch.no_grad()
def score(encode, decode, frames: np.ndarray, n_train: int, batch: int = 4096) -> dict:
    """EV, L0 on held-out frames (all of them, and apart: the typical frames and the outlier frames,
    see `outlier_frames`); dead = never active on any frame (train + held out)."""
    outlier = outlier_frames(frames, n_train)
    recon_eval = []
    n_latents = None
    fired = None
    sq_err = sq_x = l0 = 0.0
    sum_x = np.zeros(frames.shape[1])
    n_eval = 0
    for i in range(0, len(frames), batch):
        x = torch.from_numpy(frames[i:i + batch])
        z = encode(x)
        if fired is None:
            n_latents = z.shape[1]
            fired = torch.zeros(n_latents, dtype=torch.bool)
        fired |= (z > 0).any(0)
        held = torch.arange(i, i + len(x)) >= n_train
        if held.any():
            xe, ze = x[held].double(), z[held]
            r = decode(ze).double()
            recon_eval.append(r.numpy())
            sq_err += float((xe - r).pow(2).sum())
            sq_x += float(xe.pow(2).sum())
            sum_x += xe.sum(0).numpy()
            l0 += float((ze > 0).sum())
            n_eval += len(xe)
    total = sq_x - float((sum_x ** 2).sum()) / n_eval
    held, recon = frames[n_train:], np.concatenate(recon_eval)
    typical = ~outlier[n_train:]
    return {"explained_variance": 1 - sq_err / total,
            "ev_typical_frames": _ev(held[typical], recon[typical]),
            "ev_outlier_frames": _ev(held[~typical], recon[~typical]) if (~typical).sum() > 1 else float("nan"),
            "outlier_share": float((~typical).mean()), "l0": l0 / n_eval,
            "dead_fraction": float((~fired).float().mean()), "eval_frames": n_eval, "dead_window": len(frames)}


def run_ours(path: Path, frames: np.ndarray, n_train: int, args, architecture: str = "topk",
             samples: int | None = None) -> dict:
    cfg = dict(d_in=frames.shape[1], expansion=args.expansion, k=args.k, n_samples=samples or args.samples,
               batch_size=args.batch, lr=args.lr, dead_tokens=args.dead_window, seed=0)
    sae = build(architecture, **cfg)
    with Store(path) as st:  # streamed from the HDF5 store in shuffled chunks, as the workflow does
        ds = st.h5[f"sites/{SITE}/frames"]
        t0 = time.perf_counter()
        sae.init_from_data(torch.from_numpy(sample_rows(ds, n_train, 16384, 0)))
        stream = training_stream(ds, 0, n_train, 65536, seed=0)
        state = train_loop(sae, batches_from_chunks(stream, args.batch), progress=False)
        seconds = time.perf_counter() - t0
    sae.eval()
    out = score(sae.encode, lambda z: sae.decode(z), frames, n_train)
    check = evaluate(sae, [torch.from_numpy(frames[n_train:])])
    assert abs(check["explained_variance"] - out["explained_variance"]) < 1e-3
    return {"trainer": f"affectlens {architecture}", "samples_per_second": state.samples_seen / seconds,
            "seconds": seconds, "samples": state.samples_seen, **out}


def run_saelens(frames: np.ndarray, n_train: int, args, centred: bool) -> dict:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    train = torch.from_numpy(frames[:n_train])
    mean, scale = torch.zeros(frames.shape[1]), torch.ones(())
    if centred:
        mean = train.mean(0)
        scale = (frames.shape[1] / (train - mean).pow(2).sum(1).mean()).sqrt()
    data = (train - mean) * scale

    def provider():
        g = torch.Generator().manual_seed(0)
        while True:
            perm = torch.randperm(len(data), generator=g)
            for i in range(0, len(perm) - args.batch + 1, args.batch):
                yield data[perm[i:i + args.batch]]

    d = frames.shape[1]
    torch.manual_seed(0)  # SAELens draws its init from torch's global generator
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=args.expansion * d, k=args.k, device="cpu",
                                                dtype="float32"))
    cfg = SAETrainerConfig(total_training_samples=args.samples, train_batch_size_samples=args.batch, lr=args.lr,
                           lr_end=args.lr,
                           device="cpu", dead_feature_window=max(1, args.dead_window // args.batch),
                           feature_sampling_window=max(1, args.dead_window // args.batch))
    trainer = SAETrainer(cfg, sae, data_provider=provider())
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    sae.eval()
    out = score(lambda x: sae.encode((x - mean) * scale),
                lambda z: sae.decode(z) / scale + mean, frames, n_train)
    return {"trainer": f"SAELens topk ({'mean-centred, rescaled' if centred else 'raw'})",
            "samples_per_second": trainer.n_training_samples / seconds, "seconds": seconds,
            "samples": trainer.n_training_samples, **out}


def ratio_line(ours: dict, r: dict) -> str:
    return (f"ratio {ours['trainer']} / {r['trainer']}: "
            f"throughput x{ours['samples_per_second'] / r['samples_per_second']:.2f}, "
            f"EV {ours['explained_variance']:.3f} vs {r['explained_variance']:.3f} (unexplained x"
            f"{(1 - ours['explained_variance']) / (1 - r['explained_variance']):.2f}); typical frames "
            f"{ours['ev_typical_frames']:.3f} vs {r['ev_typical_frames']:.3f} (unexplained x"
            f"{(1 - ours['ev_typical_frames']) / (1 - r['ev_typical_frames']):.2f}); "
            f"dead {ours['dead_fraction']:.3f} vs {r['dead_fraction']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--dead-window", type=int, default=100_000, help="frames without firing = dead (AuxK)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clips", type=int, default=320)
    ap.add_argument("--store", type=Path, default=None,
                    help="an existing activation store holding the site (e.g. the RAVDESS study's "
                         "results/extract/ravdess/whisper-base.h5, all 1440 clips in actor order) "
                         "instead of building the 320-clip cache")
    ap.add_argument("--ours", default="topk", help="comma-separated affectlens architectures")
    ap.add_argument("--skip-saelens-raw", action="store_true")
    ap.add_argument("--skip-equal-time", action="store_true",
                    help="do not train ours again for as long as SAELens (centred) took")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.store or ravdess_store(args.clips)
    frames, n_train = load_frames(path)
    print(f"frames: {len(frames)} x {frames.shape[1]} ({n_train} train, {len(frames) - n_train} held out), "
          f"site {SITE}, store {path}", flush=True)
    print(f"settings: TopK, {args.expansion}x ({args.expansion * frames.shape[1]} latents), k = {args.k}, "
          f"{args.samples} samples, batch {args.batch}, lr {args.lr} (ours: decoder rows at "
          f"{build('topk', d_in=frames.shape[1]).cfg.decoder_lr_scale:g}x), dead window {args.dead_window} frames, "
          f"{args.threads} threads", flush=True)

    rows = []
    for arch in args.ours.split(","):
        rows.append(run_ours(path, frames, n_train, args, arch))
        print(json.dumps(rows[-1]), flush=True)
    try:
        import sae_lens

        version = sae_lens.__version__
        rows.append(run_saelens(frames, n_train, args, centred=True))
        print(json.dumps(rows[-1]), flush=True)
        if not args.skip_equal_time:  # compute-matched: ours for SAELens' wall time at our measured rate
            ours, theirs = rows[0], rows[-1]
            n = int(theirs["seconds"] * ours["samples_per_second"]) // args.batch * args.batch
            rows.insert(1, {**run_ours(path, frames, n_train, args, args.ours.split(",")[0], samples=n),
                            "trainer": f"{ours['trainer']}, SAELens' time ({n / 1e6:.2f}M samples)"})
            print(json.dumps(rows[1]), flush=True)
        if not args.skip_saelens_raw:
            rows.append(run_saelens(frames, n_train, args, centred=False))
            print(json.dumps(rows[-1]), flush=True)
    except ImportError as e:
        version = None
        print(f"SAELens not importable ({e}); pip install sae-lens", flush=True)
    try:
        import dictionary_learning  # noqa: F401
        print("dictionary_learning imports, but its trainers need an nnsight buffer; not run", flush=True)
    except Exception as e:  # noqa: BLE001 - any import failure means: not run
        print(f"dictionary_learning: not run ({type(e).__name__}: {e})", flush=True)

    print()
    print(f"outlier frames (centred norm > {OUTLIER_FACTOR:g}x median): {rows[0]['outlier_share']:.2%} of held-out frames")
    print(f"{'trainer':48s} {'samples/s':>10s} {'EV':>7s} {'EV typ':>7s} {'EV out':>7s} {'L0':>6s} {'dead':>7s}")
    for r in rows:
        print(f"{r['trainer']:48s} {r['samples_per_second']:10.0f} {r['explained_variance']:7.3f} "
              f"{r['ev_typical_frames']:7.3f} {r['ev_outlier_frames']:7.3f} {r['l0']:6.1f} {r['dead_fraction']:7.3f}")
    for ours in rows:
        if ours["trainer"].startswith("SAELens"):
            continue
        for r in rows:
            if r["trainer"].startswith("SAELens"):
                print(ratio_line(ours, r))

    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "bench_sae.json").write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "saelens": version, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
