"""Training and evaluation of SAEs, from an activation store or from an in-memory array.

One loop serves every architecture. It asks the module for: `init_from_data(x)`,
`forward(x, dead_mask, return_latents) -> ForwardOutput`, `sparsity_scale(progress)`,
`remove_parallel_grads()` and `normalize_decoder()`; and the config for `n_latents`,
`learning_rate`, `decoder_lr_scale`, `lr_decay`, `batch_size`, `n_samples`, `dead_tokens` and `seed`.

The data stream is a pure function of (seed, samples seen): epochs of shuffled chunks, each epoch
with its own order, regrouped into full batches. A run stopped after a checkpoint therefore
resumes on exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from sklearn.base import TransformerMixin
from tqdm.auto import tqdm

from affectlens.sae.metrics import (advance_tokens_since_fired, dead_fraction, explained_variance_from_sums,
                                    normalised_mse_from_sums)
from affectlens.sae.registry import architecture_of, build, save_sae

INIT_ROWS = 16384  # frames used to set the input mean, scale and b_dec
LOG_EVERY = 50     # steps between logged metrics (each one syncs the device)
MIX_BLOCK_ROWS = 512         # rows per block of a shuffled training chunk (~3 clips; a store HDF5 chunk at d = 512)
MIX_BLOCKS_PER_CHUNK = 64    # a shuffled chunk is made of at least this many blocks from across the data


# -- the loop ------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """Everything besides the weights that a resumed run needs."""
    optimizer: torch.optim.Optimizer
    tokens_since_fired: torch.Tensor  # [n_latents] frames since each latent last fired
    samples_seen: int = 0
    steps: int = 0
    seconds: float = 0.0              # time spent in optimisation steps (throughput)
    history: list[dict] = field(default_factory=list)  # logged training metrics


def new_state(sae: torch.nn.Module) -> TrainState:
    """A fresh optimiser: Adam over two parameter groups, the decoder rows at
    `cfg.decoder_lr_scale` times the learning rate (see that field) and the rest at 1x."""
    # eps as in Gao et al.: small enough not to damp the updates of rarely active latents
    rest = [p for name, p in sae.named_parameters() if name != "W_dec"]
    groups = [{"params": [sae.W_dec], "lr_scale": sae.cfg.decoder_lr_scale}, {"params": rest, "lr_scale": 1.0}]
    opt = torch.optim.Adam(groups, lr=sae.cfg.learning_rate, betas=(0.9, 0.999), eps=6.25e-10)
    return TrainState(opt, torch.zeros(sae.cfg.n_latents, dtype=torch.long, device=sae.W_dec.device))


def learning_rate_at(cfg, step: int) -> float:
    """Constant, then a linear decay to 0 over the last `lr_decay` share of the steps."""
    n_steps = math.ceil(cfg.n_samples / cfg.batch_size)
    decay_steps = cfg.lr_decay * n_steps
    if decay_steps <= 0:
        return cfg.learning_rate
    return cfg.learning_rate * min(1.0, max(0.0, (n_steps - step) / decay_steps))


def train_loop(sae: torch.nn.Module, batches: Iterable[torch.Tensor], state: TrainState | None = None,
               progress: bool = True, desc: str = "sae", on_step=None) -> TrainState:
    """Optimise `sae` on `batches` ([batch, d_in] tensors) until `cfg.n_samples` frames are seen.
    `on_step(state)` is called after every step (checkpointing)."""
    cfg = sae.cfg
    state = state or new_state(sae)
    device = sae.W_dec.device
    n_steps = math.ceil(cfg.n_samples / cfg.batch_size)
    sae.train()
    bar = tqdm(total=n_steps, initial=state.steps, desc=desc, disable=not progress, unit="step")
    for x in batches:
        if state.samples_seen >= cfg.n_samples:
            break
        t0 = time.perf_counter()
        x = x.to(device, non_blocking=True)
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate_at(cfg, state.steps) * group["lr_scale"]
        sae.sparsity_scale(state.samples_seen / cfg.n_samples)
        out = sae(x, dead_mask=state.tokens_since_fired >= cfg.dead_tokens, return_latents=False)
        state.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grads()
        state.optimizer.step()
        sae.normalize_decoder()
        state.tokens_since_fired = advance_tokens_since_fired(state.tokens_since_fired, out.fired, len(x))
        state.samples_seen += len(x)
        state.steps += 1
        state.seconds += time.perf_counter() - t0
        bar.update(1)
        if state.steps % LOG_EVERY == 0 or state.samples_seen >= cfg.n_samples:
            row = {"step": state.steps, "samples_seen": state.samples_seen,
                   "fvu": out.fvu.item(), "aux_loss": out.aux_loss.item(),
                   "sparsity_loss": out.sparsity_loss.item(), "l0": out.l0.item(),
                   "dead_fraction": float(dead_fraction(state.tokens_since_fired, cfg.dead_tokens))}
            state.history.append(row)
            bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.3f}")
        if on_step is not None:
            on_step(state)
    bar.close()
    sae.eval()
    return state


@torch.no_grad()
def evaluate(sae: torch.nn.Module, batches: Iterable[torch.Tensor]) -> dict:
    """Explained variance, normalised MSE, L0 and the share of latents that never fired, on
    [frame, d_in] batches (held-out data), streamed; `dead_window` is the number of frames looked
    at. The sums are kept in float64, so the result does not depend on the batching."""
    sae.eval()
    device = sae.W_dec.device
    n, l0_sum = 0, 0.0
    sq_err = torch.zeros((), dtype=torch.float64, device=device)
    sq_x = torch.zeros((), dtype=torch.float64, device=device)
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=device)
    tsf = torch.zeros(sae.cfg.n_latents, dtype=torch.long, device=device)
    for x in batches:
        x = x.to(device, torch.float32)
        out = sae(x, return_latents=False)
        sq_err += (x - out.recon).double().pow(2).sum()
        sq_x += x.double().pow(2).sum()
        sum_x += x.double().sum(0)
        l0_sum += float(out.l0) * len(x)
        tsf = advance_tokens_since_fired(tsf, out.fired, len(x))
        n += len(x)
    if n == 0:
        raise ValueError("evaluate() got no frames")
    return {"explained_variance": float(explained_variance_from_sums(sq_err, sq_x, sum_x, n)),
            "normalised_mse": float(normalised_mse_from_sums(sq_err, sq_x)),
            "l0": l0_sum / n,
            "dead_fraction": float(dead_fraction(tsf, n)),
            "dead_window": n}


# -- data streams --------------------------------------------------------------------------------

def batches_from_chunks(chunks: Iterable[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    """Regroup [rows, d] chunks into [batch_size, d] tensors (a remainder carries to the next chunk)."""
    buf: list[np.ndarray] = []
    n_buf = 0
    for chunk in chunks:
        buf.append(chunk)
        n_buf += len(chunk)
        if n_buf < batch_size:
            continue
        data = np.concatenate(buf) if len(buf) > 1 else buf[0]
        n_full = len(data) // batch_size * batch_size
        for i in range(0, n_full, batch_size):
            yield torch.from_numpy(data[i:i + batch_size])
        buf, n_buf = [data[n_full:]], len(data) - n_full


def batches_from_chunks_all(chunks: Iterable[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    """Like `batches_from_chunks` but also yields the final partial batch (for evaluation)."""
    for chunk in chunks:
        for i in range(0, len(chunk), batch_size):
            yield torch.from_numpy(chunk[i:i + batch_size])


def row_chunks(ds, start: int, stop: int, chunk_rows: int, shuffle: bool, seed: int,
               skip: int = 0) -> Iterator[np.ndarray]:
    """Rows [start, stop) of an [rows, d] dataset (HDF5 or array) as float32 chunks of about
    `chunk_rows` rows. With `shuffle`, each chunk gathers `chunk_rows // block` blocks of `block`
    contiguous rows (at most MIX_BLOCK_ROWS, and at least MIX_BLOCKS_PER_CHUNK blocks a chunk) drawn
    at random from the whole range, and its rows are shuffled. Why blocks and not contiguous
    chunks: stores are ordered by clip (RAVDESS: by actor), so a contiguous 65k-row chunk holds a
    few speakers only, every batch cut from it is drawn from them, and the end of training (where
    the learning rate decays) fits the last chunk's speakers; measured on Whisper-base block 3 of
    RAVDESS (200k samples), typical-frame EV 0.836 with contiguous chunks vs 0.845 fully shuffled.
    Blocks of a few clips spread over the store give batches as mixed as a full shuffle while
    reading whole HDF5 chunks. The first `skip` rows of the stream are left out without reading
    them (resuming mid-epoch)."""
    rng = np.random.default_rng(seed)
    if shuffle:
        block = max(1, min(MIX_BLOCK_ROWS, chunk_rows // MIX_BLOCKS_PER_CHUNK))
        starts = np.arange(start, stop, block)
        rng.shuffle(starts)
        per_chunk = max(1, chunk_rows // block)
        pieces = [np.sort(starts[i:i + per_chunk]) for i in range(0, len(starts), per_chunk)]
    else:
        block = chunk_rows
        pieces = [np.array([s]) for s in range(start, stop, chunk_rows)]
    for piece in pieces:
        spans = [(int(s), min(int(s) + block, stop)) for s in piece]
        size = sum(b - a for a, b in spans)
        perm = rng.permutation(size) if shuffle else None
        if skip >= size:
            skip -= size
            continue
        x = np.empty((size, *ds.shape[1:]), dtype=np.float32)
        pos = 0
        for a, b in spans:  # converted to float32 while copied in
            x[pos:pos + b - a] = ds[a:b]
            pos += b - a
        x = x[perm] if shuffle else x
        yield x[skip:]
        skip = 0


def training_stream(ds, start: int, stop: int, chunk_rows: int, seed: int, skip: int = 0) -> Iterator[np.ndarray]:
    """Endless shuffled epochs over rows [start, stop) (epoch e shuffled with seed + e), from row
    `skip` of the stream on."""
    n_rows = stop - start
    if n_rows <= 0:
        raise ValueError("no training rows")
    epoch, skip = divmod(skip, n_rows)
    while True:
        yield from row_chunks(ds, start, stop, chunk_rows, True, seed + epoch, skip)
        epoch, skip = epoch + 1, 0


def sample_rows(ds, stop: int, n_rows: int, seed: int, n_blocks: int = 64) -> np.ndarray:
    """About `n_rows` rows of [0, stop) read as `n_blocks` contiguous blocks spread over the range."""
    if stop <= n_rows:
        return np.asarray(ds[:stop], dtype=np.float32)
    block = max(1, n_rows // n_blocks)
    starts = np.sort(np.random.default_rng(seed).choice(stop - block + 1, size=n_blocks, replace=False))
    return np.concatenate([np.asarray(ds[s:s + block], dtype=np.float32) for s in starts])


def held_out_split(offsets: np.ndarray, eval_fraction: float) -> int:
    """Index of the first held-out clip: the last `eval_fraction` of clips (at least one) are held out."""
    n_clips = len(offsets) - 1
    if n_clips < 2:
        raise ValueError(f"the store has {n_clips} clip(s); training with a held-out slice needs at least 2")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction = {eval_fraction}: must be in (0, 1)")
    return n_clips - min(n_clips - 1, max(1, round(eval_fraction * n_clips)))


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- checkpoints ---------------------------------------------------------------------------------

class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be resumed from; the message names the file."""


def save_checkpoint(path: str | Path, sae: torch.nn.Module, state: TrainState) -> None:
    """Weights, optimiser and loop state in one file (written to a temporary name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save({"architecture": architecture_of(sae), "cfg": sae.cfg.to_dict(), "sae": sae.state_dict(),
                    "optimizer": state.optimizer.state_dict(), "tokens_since_fired": state.tokens_since_fired,
                    "samples_seen": state.samples_seen, "steps": state.steps, "seconds": state.seconds,
                    "history": state.history}, tmp)
        os.replace(tmp, path)
    finally:  # a failed write (disk full) leaves the previous checkpoint and no temp file
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, sae: torch.nn.Module) -> TrainState | None:
    """Restore `sae` and its TrainState from `path`; None (and nothing changed) when there is no
    checkpoint or it was written for another architecture or config."""
    path = Path(path)
    if not path.is_file():
        return None
    try:  # weights_only: a checkpoint holds tensors and plain values; a pickle with code is refused
        ck = torch.load(path, map_location=sae.W_dec.device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, or a pickle that would run code
        raise CheckpointError(f"SAE checkpoint {path} cannot be loaded safely ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); it is truncated, corrupt or not an "
                              "affectlens checkpoint: delete it to train from the start") from e
    if not isinstance(ck, dict) or not {"architecture", "cfg", "sae", "optimizer"} <= set(ck):
        raise CheckpointError(f"SAE checkpoint {path} is not an affectlens checkpoint (keys "
                              f"{sorted(ck) if isinstance(ck, dict) else type(ck).__name__}); delete it")
    if ck["architecture"] != architecture_of(sae) or ck["cfg"] != sae.cfg.to_dict():
        return None
    try:
        sae.load_state_dict(ck["sae"])
    except RuntimeError as e:
        raise CheckpointError(f"SAE checkpoint {path}: weights do not match its config ({e}); delete it") from e
    state = new_state(sae)
    state.optimizer.load_state_dict(ck["optimizer"])
    state.tokens_since_fired = ck["tokens_since_fired"].to(sae.W_dec.device)
    state.samples_seen, state.steps = ck["samples_seen"], ck["steps"]
    state.seconds, state.history = ck["seconds"], ck["history"]
    return state


def _checkpointer(path: str | Path | None, sae: torch.nn.Module, every_s: float):
    if path is None:
        return None
    last = [time.monotonic()]

    def on_step(state: TrainState) -> None:
        if time.monotonic() - last[0] >= every_s:
            save_checkpoint(path, sae, state)
            last[0] = time.monotonic()

    return on_step


# -- from a store --------------------------------------------------------------------------------

class SiteFrames:
    """The [total_frame, d] frame matrix of one site, read lazily as float32 whatever the storage
    dtype (float16, float32 or bfloat16 bits), with the clip offsets of the site's tower."""

    def __init__(self, store, site: str):
        from affectlens.store import from_storage

        store.dim(site)  # raises a KeyError naming the store's sites if `site` is absent
        self._ds = store.h5[f"sites/{site}/frames"]
        self._dtype = getattr(store, "storage_dtype", "float32")
        self._convert = from_storage
        self.shape = self._ds.shape
        self.offsets = store.offsets_of(site) if hasattr(store, "offsets_of") else store.offsets

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        return np.asarray(self._convert(self._ds[key], self._dtype), dtype=np.float32)


def _frames(store, site: str) -> SiteFrames:
    return SiteFrames(store, site)


def train_sae(store, site: str, cfg, out_dir: str | Path, progress: bool = True, *,
              eval_fraction: float = 0.1, max_eval_frames: int = 65536, chunk_rows: int = 65536,
              device: str | None = None, checkpoint: str | Path | None = None,
              checkpoint_every_s: float = 300.0) -> dict:
    """Train an SAE (`cfg`: a registered architecture's config) on the frames of `site` in `store`
    (an affectlens.store.Store), streamed in shuffled chunks; evaluate it on the last
    `eval_fraction` of clips (held out by clip; at most `max_eval_frames` of their frames), and
    write `out_dir/cfg.json`, `sae.safetensors` and `metrics.json` (last, so its presence means the
    folder is complete). With `checkpoint` (a file path), the run saves its state there every
    `checkpoint_every_s` seconds and resumes from it if present and written for the same config;
    it is deleted once the SAE is saved. Returns the metrics."""
    t0 = time.time()
    out_dir = Path(out_dir)
    (out_dir / "metrics.json").unlink(missing_ok=True)  # a stale one would mark a failed rerun complete
    arch = architecture_of(cfg)
    ds = _frames(store, site)
    if cfg.d_in != ds.shape[1]:
        raise ValueError(f"cfg.d_in = {cfg.d_in} but site {site!r} in {store.path} has d = {ds.shape[1]}")
    first_eval_clip = held_out_split(ds.offsets, eval_fraction)
    n_train = int(ds.offsets[first_eval_clip])
    ends = ds.offsets[first_eval_clip + 1:]  # whole held-out clips, up to max_eval_frames (at least one)
    n_eval_clips = max(1, int((ends - n_train <= max_eval_frames).sum()))
    eval_stop = int(ends[n_eval_clips - 1])

    sae = build(arch, **cfg.to_dict()).to(device or _default_device())
    state = load_checkpoint(checkpoint, sae) if checkpoint is not None else None
    resumed_from = state.samples_seen if state is not None else 0
    if state is None:
        sae.init_from_data(torch.from_numpy(sample_rows(ds, n_train, INIT_ROWS, cfg.seed)))
    chunks = training_stream(ds, 0, n_train, chunk_rows, cfg.seed, skip=resumed_from)
    state = train_loop(sae, batches_from_chunks(chunks, cfg.batch_size), state, progress=progress,
                       desc=f"sae {site}", on_step=_checkpointer(checkpoint, sae, checkpoint_every_s))

    eval_chunks = row_chunks(ds, n_train, eval_stop, chunk_rows, False, 0)
    metrics = {"site": site, "architecture": arch,
               **evaluate(sae, batches_from_chunks_all(eval_chunks, cfg.batch_size)),
               "train_dead_fraction": float(dead_fraction(state.tokens_since_fired, cfg.dead_tokens)),
               "train_dead_window": cfg.dead_tokens,
               "train_fvu_last": state.history[-1]["fvu"] if state.history else None,
               "samples_seen": state.samples_seen, "steps": state.steps,
               "samples_per_second": round(state.samples_seen / max(state.seconds, 1e-9), 1),
               "resumed_from_samples": resumed_from,
               "train_frames": n_train, "eval_clips": n_eval_clips,
               "eval_frames": eval_stop - n_train, "seconds": round(time.time() - t0, 2)}
    save_sae(sae, out_dir)
    tmp = out_dir / "metrics.json.tmp"
    try:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        os.replace(tmp, out_dir / "metrics.json")
    finally:
        tmp.unlink(missing_ok=True)
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return metrics


# -- in memory: the scikit-learn estimator --------------------------------------------------------

def fit_array(sae: torch.nn.Module, X: np.ndarray, progress: bool = False, state: TrainState | None = None,
              on_step=None) -> TrainState:
    """Train `sae` on an in-memory [sample, d_in] float32 array (fully reshuffled every epoch)."""
    cfg = sae.cfg
    if state is None:
        rng = np.random.default_rng(cfg.seed)
        sae.init_from_data(torch.from_numpy(X[rng.permutation(len(X))[:INIT_ROWS]]))
    skip = state.samples_seen if state is not None else 0
    chunks = training_stream(X, 0, len(X), len(X), cfg.seed, skip=skip)
    return train_loop(sae, batches_from_chunks(chunks, cfg.batch_size), state, progress=progress, on_step=on_step)


class SparseAutoencoder(TransformerMixin):
    """scikit-learn style SAE on an in-memory [sample, d] array.

    `SparseAutoencoder(architecture="topk", k=8, expansion=4, n_samples=200_000)`; `d_in` comes
    from the data. `fit(X)` returns self and sets `sae_` (the torch module), `n_features_in_`,
    `train_history_`, `tokens_since_fired_`; `transform(X)` gives latents [sample, n_latents],
    `inverse_transform` decodes, `score(X)` is the explained variance.
    """

    def __init__(self, architecture: str = "topk", **hparams):
        self.architecture = architecture
        self.hparams = hparams

    def get_params(self, deep: bool = True) -> dict:
        return {"architecture": self.architecture, **self.hparams}

    def set_params(self, **params) -> "SparseAutoencoder":
        self.architecture = params.pop("architecture", self.architecture)
        self.hparams = {**self.hparams, **params}
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def fit(self, X, y=None, progress: bool = False, device: str | None = None) -> "SparseAutoencoder":
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or len(X) == 0:
            raise ValueError(f"X must be a non-empty [sample, d] array, got shape {X.shape}")
        if "d_in" in self.hparams:
            raise ValueError("d_in is taken from X; do not pass it to SparseAutoencoder")
        sae = build(self.architecture, d_in=X.shape[1], **self.hparams).to(device or _default_device())
        state = fit_array(sae, X, progress=progress)
        self.sae_ = sae
        self.n_features_in_ = X.shape[1]
        self.train_history_ = state.history
        self.tokens_since_fired_ = state.tokens_since_fired.cpu().numpy()
        return self

    def _check_fitted(self):
        if not hasattr(self, "sae_"):
            raise AttributeError(f"this {type(self).__name__} is not fitted yet; call fit(X) first")

    @torch.no_grad()
    def transform(self, X) -> np.ndarray:
        self._check_fitted()
        x = torch.as_tensor(np.asarray(X, dtype=np.float32), device=self.sae_.W_dec.device)
        return self.sae_.encode(x).cpu().numpy()

    @torch.no_grad()
    def inverse_transform(self, Z) -> np.ndarray:
        self._check_fitted()
        z = torch.as_tensor(np.asarray(Z, dtype=np.float32), device=self.sae_.W_dec.device)
        return self.sae_.decode(z).cpu().numpy()

    def score(self, X, y=None) -> float:
        self._check_fitted()
        X = np.asarray(X, dtype=np.float32)
        return evaluate(self.sae_, batches_from_chunks_all([X], 8192))["explained_variance"]
