"""What every SAE architecture shares: the config fields and their validation, the named forward
result, input normalisation, the decoder constraints, the AuxK dead-latent loss and the sparse
gradient helpers that make TopK-style training cheap on a CPU.

Every architecture computes, in normalised units,

    x_n     = (x - input_mean) * input_scale        (mean-centred, E||x_n||^2 = d_in)
    pre     = W_enc (x_n - b_dec) + b_enc            [batch, n_latents]
    latents = act(pre)                               the architecture's sparsifying activation
    recon   = (latents @ W_dec + b_dec) / input_scale + input_mean

Decoder rows (the dictionary atoms) are kept at unit norm, the encoder starts as the decoder's
transpose, and latents that have not fired for `dead_tokens` frames are revived by AuxK: the
`aux_k` most active dead latents learn to reconstruct what the live ones miss.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from affectlens.sae.metrics import explained_variance


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """Fields shared by every architecture; each architecture's config adds its own."""

    d_in: int
    """Width of the activations the SAE reads (the site's `d`)."""
    expansion: int = 8
    """Latents per input dimension; ignored when `d_sae` is given."""
    d_sae: int | None = None
    """Number of latents; None means `expansion * d_in`."""
    lr: float | None = None
    """Adam learning rate; None means 2e-4 / sqrt(n_latents / 2**14) (Gao et al.'s scaling)."""
    lr_decay: float = 0.2
    """Share of training at the end over which the learning rate decays linearly to zero."""
    decoder_lr_scale: float = 10.0
    """Multiplier of the learning rate for the decoder rows W_dec. Adam moves every coordinate by
    about lr a step whatever the parameter's size, and our atoms are held at unit norm, so at a
    given lr they turn 10x slower than the free decoder initialised at norm 0.1 (Anthropic's
    April 2024 init, SAELens' default); 10 gives them that speed back. Measured on Whisper-base
    block 3 of RAVDESS (bench/bench_sae.py, lr 1e-3, 200k samples, shuffled stream): EV on the
    typical frames 0.845 (1x), 0.870 (3x), 0.873 (5x), 0.875 (10x), none dead; at 1M samples
    0.911 (10x) vs 0.902 before (1x, unmixed chunks). Scaling the encoder's rate as well leaves
    latents dead (10x: 19 % dead at 200k), as does a higher lr for every parameter (3e-3: 2.3 %)."""
    batch_size: int = 4096
    """Frames per optimiser step."""
    n_samples: int = 4_000_000
    """Frames seen in training in total (the stream loops over the data as often as needed)."""
    seed: int = 0
    """Seed for initialisation and data order."""
    center_input: bool = True
    """Subtract the data mean (estimated from data and saved) before encoding."""
    normalize_input: bool = True
    """Scale the (centred) inputs so that E||x||^2 = d_in (the scale is estimated and saved)."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Initial decoder bias in normalised units (also subtracted before encoding)."""
    dead_tokens: int = 10_000_000
    """A latent is dead once it has not fired for this many training frames (Gao et al.: 10M)."""
    aux_k: int = 256
    """Dead latents used by the AuxK loss per frame (Gao et al. use d_in / 2); capped at n_latents."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss against the main reconstruction loss (0 switches it off)."""

    def __post_init__(self):
        for key in ("d_in", "expansion", "aux_k", "dead_tokens", "batch_size", "n_samples"):
            v = getattr(self, key)
            self._need(isinstance(v, int) and not isinstance(v, bool) and v > 0, key, "must be a positive integer")
        self._need(self.d_sae is None or (isinstance(self.d_sae, int) and self.d_sae > 0), "d_sae",
                   "must be a positive integer or None")
        self._need(self.aux_coef >= 0, "aux_coef", "must be >= 0")
        self._need(self.lr is None or self.lr > 0, "lr", "must be > 0 or None")
        self._need(0 <= self.lr_decay <= 1, "lr_decay", "must be in [0, 1]")
        self._need(self.decoder_lr_scale > 0, "decoder_lr_scale", "must be > 0")
        self._need(isinstance(self.seed, int), "seed", "must be an integer")
        self._need(self.b_dec_init in ("geometric_median", "mean", "zeros"), "b_dec_init",
                   "choose one of geometric_median, mean, zeros")

    def _need(self, ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{type(self).__name__}.{key} = {getattr(self, key)!r}: {what}")

    @property
    def n_latents(self) -> int:
        return self.d_sae if self.d_sae is not None else self.expansion * self.d_in

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-4 / math.sqrt(self.n_latents / 2**14)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ForwardOutput(NamedTuple):
    recon: Tensor
    """[batch, d_in] reconstruction, in the units of the input."""
    latents: Tensor | None
    """[batch, n_latents] dense latent activations (None when forward got return_latents=False)."""
    fvu: Tensor
    """Fraction of variance unexplained (1 - explained variance) of the batch: the main loss."""
    aux_loss: Tensor
    """AuxK loss on dead latents (0 when no dead mask is given or none is dead)."""
    sparsity_loss: Tensor
    """The architecture's sparsity penalty, already weighted (0 for TopK and BatchTopK)."""
    loss: Tensor
    """The scalar that training minimises: fvu + sparsity_loss + aux_coef * aux_loss."""
    l0: Tensor
    """Mean number of active latents per frame (0-d)."""
    fired: Tensor
    """[n_latents] bool: latents active on at least one frame of the batch."""


# -- sparse gradients -------------------------------------------------------------------------------

class _GatherPreActs(torch.autograd.Function):
    """vals[b, j] = pre[b, idx[b, j]] for pre = h @ W_enc.T + b_enc, given `vals` computed without
    grad. The backward pass touches only the selected latents: batch * k * d work instead of the
    batch * n_latents * d of a dense backward (the bulk of a TopK step's cost). With `rectified`,
    gradients are zero where vals <= 0 (a ReLU on the values)."""

    @staticmethod
    def forward(ctx, h, W_enc, b_enc, idx, vals, rectified: bool):
        ctx.save_for_backward(h, W_enc, idx, vals)
        ctx.rectified = rectified
        return vals.clone()

    @staticmethod
    def backward(ctx, grad):
        h, W_enc, idx, vals = ctx.saved_tensors
        if ctx.rectified:
            grad = grad * (vals > 0)
        B, k = idx.shape
        n = W_enc.shape[0]
        rows = torch.arange(B, device=idx.device).repeat_interleave(k)
        cols, g = idx.reshape(-1), grad.reshape(-1)
        d_h = d_W = d_b = None
        if ctx.needs_input_grad[1]:
            gt = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (n, B), check_invariants=False)
            d_W = torch.sparse.mm(gt, h)
        if ctx.needs_input_grad[2]:
            d_b = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        if ctx.needs_input_grad[0]:
            gm = torch.sparse_coo_tensor(torch.stack([rows, cols]), g, (B, n), check_invariants=False)
            d_h = torch.sparse.mm(gm, W_enc)
        return d_h, d_W, d_b, None, None, None


def gather_pre_acts(h: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor, vals: Tensor,
                    rectified: bool = True) -> Tensor:
    """[batch, k] pre-activations at `idx` (already computed as `vals` without grad), differentiable
    in h, W_enc and b_enc with a sparse backward (zero where vals <= 0 when `rectified`)."""
    return _GatherPreActs.apply(h, W_enc, b_enc, idx, vals, rectified)


def decode_sparse(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j vals[b, j] * W_dec[idx[b, j]]: [batch, d] without materialising dense latents."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")


def fired_latents(idx: Tensor, vals: Tensor, n_latents: int) -> Tensor:
    """[n_latents] bool: latents with a positive value somewhere in (vals, idx)."""
    fired = torch.zeros(n_latents, dtype=torch.bool, device=idx.device)
    fired[idx[vals > 0]] = True
    return fired


# -- the module -------------------------------------------------------------------------------------

class SAE(nn.Module):
    """Parameters, normalisation and constraints shared by every architecture. Subclasses define
    `encode_normalised(h) -> dense latents` (inference) and `forward`."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_latents, cfg.d_in
        g = torch.Generator().manual_seed(cfg.seed)
        w_dec = torch.randn(n, d, generator=g)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)            # [latent, d]: row i is atom i
        self.W_enc = nn.Parameter(w_dec.clone())    # [latent, d]: encoder = decoder transpose at init
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("input_mean", torch.zeros(d))
        self.register_buffer("input_scale", torch.ones(()))

    # -- data-dependent initialisation -------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Set the input mean, scale and `b_dec` from a sample [frame, d_in] of training activations."""
        x = x.to(self.W_dec)
        if self.cfg.center_input:
            self.input_mean.copy_(x.mean(0))
        x = x - self.input_mean
        if self.cfg.normalize_input:
            self.input_scale.fill_(math.sqrt(self.cfg.d_in / x.pow(2).sum(1).mean().clamp_min(1e-12).item()))
        x = x * self.input_scale
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(x))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(x.mean(0))
        else:
            self.b_dec.zero_()

    def normalise(self, x: Tensor) -> Tensor:
        return (x.to(self.W_enc) - self.input_mean) * self.input_scale

    def denormalise(self, x_n: Tensor) -> Tensor:
        return x_n / self.input_scale + self.input_mean

    # -- the model ----------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """[batch, n_latents] encoder pre-activations (before the architecture's activation)."""
        return F.linear(self.normalise(x) - self.b_dec, self.W_enc, self.b_enc)

    def encode_normalised(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """[batch, d_in] -> [batch, n_latents] dense latents (normalised units)."""
        return self.encode_normalised(self.normalise(x) - self.b_dec)

    def decode(self, latents: Tensor) -> Tensor:
        """[batch, n_latents] -> [batch, d_in] in the units of the input."""
        return self.denormalise(latents.to(self.W_dec) @ self.W_dec + self.b_dec)

    def _output(self, x_n: Tensor, recon_n: Tensor, latents: Tensor | None, aux_loss: Tensor,
                sparsity_loss: Tensor, l0: Tensor, fired: Tensor) -> ForwardOutput:
        fvu = 1 - explained_variance(x_n, recon_n)
        return ForwardOutput(recon=self.denormalise(recon_n), latents=latents, fvu=fvu, aux_loss=aux_loss,
                             sparsity_loss=sparsity_loss, loss=fvu + sparsity_loss + self.cfg.aux_coef * aux_loss,
                             l0=l0, fired=fired)

    def aux_loss(self, h: Tensor, pre: Tensor, residual: Tensor, dead_mask: Tensor | None,
                 rectified: bool = True) -> Tensor:
        """AuxK: the `aux_k` largest pre-activations among dead latents reconstruct the residual
        (detached) of the main reconstruction; scaled down while fewer than aux_k latents are dead.
        `pre` holds the pre-activations, computed without grad. Without `rectified` the raw
        (possibly negative) pre-activations are used: a dead ReLU latent has no positive one, and
        would otherwise get no gradient at all."""
        zero = residual.new_zeros(())
        if dead_mask is None or self.cfg.aux_coef == 0:
            return zero
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return zero
        aux_k = min(self.cfg.aux_k, n_dead)
        with torch.no_grad():
            a_vals, a_idx = pre.masked_fill(~dead_mask, -math.inf).topk(aux_k, dim=-1, sorted=False)
            if rectified:  # -inf slots cannot appear: aux_k <= n_dead
                a_vals = a_vals.clamp_min(0)
        a_vals = gather_pre_acts(h, self.W_enc, self.b_enc, a_idx, a_vals, rectified)
        residual = residual.detach()
        loss = 1 - explained_variance(residual, decode_sparse(a_vals, a_idx, self.W_dec))
        return loss * min(n_dead / self.cfg.aux_k, 1.0)

    def sparsity_scale(self, progress: float) -> None:
        """Called by the training loop with the share of training done (penalty warm-ups)."""

    # -- constraints applied by the training loop --------------------------------------------
    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the gradient component along each decoder row, so a step cannot change its norm
        (to first order); call between backward() and the optimiser step."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Renormalise decoder rows to unit norm; call after each optimiser step."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


@torch.no_grad()
def geometric_median(x: Tensor, n_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to rows of x."""
    m = x.mean(0)
    for _ in range(n_iter):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-8)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if (m_new - m).norm() <= tol * m.norm().clamp_min(1e-8):
            return m_new
        m = m_new
    return m
