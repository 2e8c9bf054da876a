"""Turn a site's (steered) activations back into sound: activations -> log-mel -> vocoder.

The mapper is trained by the workflow on the corpus: per clip, the site's frames [frame, d] at the
model's frame rate and the log-mel of the clip's own wave on a grid of `upsample` times that rate
(Whisper: 50 -> 100 frames/s). The mel is in the vocoder's format (`MelMapper.for_vocoder`): by
default 16 kHz, hop 160, which is the grid itself; HiFi-GAN's 22.05 kHz, hop 256 (86.1 frames/s) is
read at the grid's times by interpolation, and predictions go back to the vocoder's frames the
same way. Each activation frame, stacked with `context` neighbours on each side, predicts its
`upsample` grid frames. Ridge regression in closed form is the default (deterministic, one pass,
regularisation chosen on held-out clips); `kind="mlp"` trains a small torch MLP on the same inputs.

Three ways to hear a steered clip (`invert`): "residual" filters the clip's own wave by the
predicted change of its log-mel, mapper(steered) - mapper(original), keeping its phase, so
unsteered it is the clip itself (a change of envelope and level: filtering cannot move harmonics,
so it cannot shift pitch); "vocoded" vocodes the clip's own mel plus that change (unsteered: the
vocoder's resynthesis of the clip); "direct" vocodes the mapper's prediction. From deep sites a
linear mapper recovers only the spectral envelope (no harmonics, so no pitch), which makes direct
resynthesis breathy and unvoiced, with Griffin-Lim more than with a neural vocoder
(steering/vocoder.py).

Always report `round_trip_quality` of unsteered activations beside steering results: the vocoder
and the mapper lose detail on their own, and that loss is not a steering effect.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import librosa
import numpy as np
import scipy.fft
import torch
from safetensors.numpy import load_file, save_file
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from affectlens.io_audio import resample

@dataclass(frozen=True)
class MelConfig:
    """How target log-mels are computed and inverted (librosa conventions, slaney mel)."""

    sr: int = 16000
    """Sample rate of the waves (Hz)."""
    n_fft: int = 1024
    """FFT size; 1024 (64 ms) resolves speech harmonics, which Griffin-Lim needs for a clean pitch."""
    hop_length: int = 160
    """Samples between mel frames (160 = 100 frames/s at 16 kHz)."""
    n_mels: int = 80
    """Mel bands."""
    fmin: float = 0.0
    fmax: float = 8000.0
    power: float = 1.0
    """1: magnitude mel; 2: power mel."""
    floor: float = 1e-5
    """Magnitude floor before the log (1e-5 ~ -100 dB re full scale; power mels floor at its square)."""

    @property
    def frame_rate(self) -> float:
        """Mel frames per second."""
        return self.sr / self.hop_length

    def __post_init__(self):
        if self.fmax > self.sr / 2:
            raise ValueError(f"fmax {self.fmax} is above the Nyquist frequency of sr={self.sr}")
        if self.power not in (1.0, 2.0):
            raise ValueError(f"power must be 1 or 2, got {self.power}")


def log_mel(wave: np.ndarray, cfg: MelConfig = MelConfig()) -> np.ndarray:
    """[mel_frame, n_mels] natural-log mel of a mono wave (centred frames: frame k at k*hop)."""
    m = librosa.feature.melspectrogram(
        y=np.asarray(wave, dtype=np.float32), sr=cfg.sr, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
        n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax, power=cfg.power)
    return np.log(np.maximum(m, cfg.floor ** cfg.power)).T.astype(np.float32)


def griffin_lim(magnitude: np.ndarray, cfg: MelConfig = MelConfig(), n_iter: int = 64,
                init_phase: np.ndarray | None = None, length: int | None = None, seed: int = 0) -> np.ndarray:
    """Fast Griffin-Lim (momentum 0.99, as librosa) from an STFT magnitude [1 + n_fft/2, frame],
    starting from `init_phase` (complex unit array of the same shape) or a seeded random phase."""
    if init_phase is None:
        angles = np.exp(2j * np.pi * np.random.default_rng(seed).random(magnitude.shape))
    else:
        angles = init_phase.astype(np.complex64)
    kw = dict(n_fft=cfg.n_fft, hop_length=cfg.hop_length)
    n = magnitude.shape[1] if length is None else None
    length = (n - 1) * cfg.hop_length if length is None else length
    momentum, rebuilt = 0.99, 0.0
    for _ in range(n_iter):
        previous = rebuilt
        rebuilt = librosa.stft(librosa.istft(magnitude * angles, length=length, **kw), **kw)
        angles = rebuilt - (momentum / (1 + momentum)) * previous
        angles /= np.abs(angles) + 1e-16
    return librosa.istft(magnitude * angles, length=length, **kw).astype(np.float32)


def mel_to_wave(log_mel_: np.ndarray, cfg: MelConfig = MelConfig(), n_iter: int = 64,
                seed: int = 0) -> np.ndarray:
    """Griffin-Lim vocoder: [mel_frame, n_mels] log-mel -> float32 wave of mel_frame * hop samples
    (mel -> linear magnitude by non-negative least squares, then `griffin_lim`; seeded phase)."""
    m = np.exp(np.asarray(log_mel_, dtype=np.float32)).T
    magnitude = librosa.feature.inverse.mel_to_stft(
        m, sr=cfg.sr, n_fft=cfg.n_fft, power=cfg.power, fmin=cfg.fmin, fmax=cfg.fmax)
    # n centred frames span (n - 1) hops; pad so the wave lasts n hops like the clip it came from
    w = griffin_lim(magnitude, cfg, n_iter=n_iter, seed=seed)
    return np.pad(w, (0, max(0, m.shape[1] * cfg.hop_length - len(w))))


def apply_mel_change(wave: np.ndarray, delta: np.ndarray, cfg: MelConfig = MelConfig(),
                     n_iter: int = 0) -> np.ndarray:
    """Filter a wave by a change of its log-mel, delta [mel_frame, n_mels]: each STFT bin is scaled
    by the (filter-weighted) mean gain of the mel bands covering it, the clip's own phase is kept,
    and `n_iter` Griffin-Lim steps from that phase make the result consistent. A zero change
    returns the wave itself (up to STFT round-off)."""
    wave = np.asarray(wave, dtype=np.float32)
    kw = dict(n_fft=cfg.n_fft, hop_length=cfg.hop_length)
    spec = librosa.stft(wave, **kw)
    d = np.zeros((spec.shape[1], cfg.n_mels), dtype=np.float64)
    k = min(len(delta), len(d))
    d[:k] = delta[:k]
    basis = librosa.filters.mel(sr=cfg.sr, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
    weight = basis.sum(0)
    covered = np.flatnonzero(weight > 0)
    log_gain = (d @ basis).T / np.where(weight > 0, weight, 1.0)[:, None]  # [bin, frame]
    # bins no band covers (DC, beyond fmin/fmax) follow the nearest covered bin
    nearest = covered[np.abs(np.arange(len(weight))[:, None] - covered[None, :]).argmin(1)]
    log_gain = log_gain[nearest]
    gain = np.exp(log_gain / cfg.power)  # power mel: half the log change is the magnitude's
    if n_iter == 0:
        return librosa.istft(spec * gain, length=len(wave), **kw).astype(np.float32)
    return griffin_lim(np.abs(spec) * gain, cfg, n_iter=n_iter, init_phase=np.exp(1j * np.angle(spec)),
                       length=len(wave))


def resample_frames(mel: np.ndarray, rate_in: float, rate_out: float, n_out: int) -> np.ndarray:
    """[n_out, n_mels]: a frame sequence at `rate_in` frames/s (frame k at k / rate_in s) read at
    k / rate_out s by linear interpolation (the edge frames beyond its ends)."""
    pos = np.clip(np.arange(n_out) * (rate_in / rate_out), 0, len(mel) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(mel) - 1)
    frac = (pos - lo)[:, None].astype(np.float32)
    return (mel[lo] * (1 - frac) + mel[hi] * frac).astype(np.float32)


def target_mel(wave: np.ndarray, n_frames: int, upsample: int, cfg: MelConfig, sr: int | None = None,
               grid_rate: float | None = None) -> np.ndarray:
    """The clip's log-mel on the mapper's grid of upsample * n_frames frames.

    sr: the wave's sample rate (default cfg.sr; otherwise it is resampled to cfg.sr first).
    grid_rate: grid frames per second (default cfg's own frame rate: the mel is cropped or edge-
    padded); a vocoder's mel at another rate (HiFi-GAN: 22050 / 256 = 86.1 /s against Whisper's
    2 x 50 /s) is read at the grid's times by `resample_frames`."""
    if sr is not None and sr != cfg.sr:
        wave = resample(wave, sr, cfg.sr)
    m = log_mel(wave, cfg)
    want = upsample * n_frames
    if grid_rate is not None and not np.isclose(grid_rate, cfg.frame_rate):
        return resample_frames(m, cfg.frame_rate, grid_rate, want)
    if len(m) < want:
        m = np.concatenate([m, np.repeat(m[-1:], want - len(m), axis=0)])
    return m[:want]


def stack_context(frames: np.ndarray, context: int) -> np.ndarray:
    """[frame, d] -> [frame, (2*context+1)*d]: each frame beside its neighbours (edges repeated)."""
    if context == 0:
        return frames
    padded = np.pad(frames, ((context, context), (0, 0)), mode="edge")
    n = len(frames)
    return np.concatenate([padded[i:i + n] for i in range(2 * context + 1)], axis=1)


class MelMapper(BaseEstimator):
    """Site activations [frame, d] -> log-mel [upsample*frame, n_mels]; scikit-learn style.

    kind: "ridge" (closed form; each of `alphas`, relative to the mean eigenvalue of the feature
    Gram, is scored on a `val_fraction` of the clips held out, the best refit on all clips; with
    fewer than 5 clips the median alpha is used) or "mlp" (one hidden layer of `hidden` units,
    AdamW on L1 loss for `epochs`). Each frame is read with `context` frames on either side, so ridge
    is a linear temporal convolution and mlp a two-layer temporal conv net. On Whisper tiny.en's last
    block over held-out RAVDESS actors (bench/bench_mapper.py) the MLP was 15 % better in log-mel L1
    at width 5 for ~26x the fitting time, hence ridge by default.

    A scikit-learn estimator (get_params, set_params, clone): `__init__` stores the hyperparameters
    as given, `fit` returns the mapper, and what it learns ends in `_` (`x_mean_`, `x_scale_`,
    `coef_`/`intercept_` or `mlp_`, `alpha_`, `val_mse_`, `n_features_in_`).
    """

    def __init__(self, kind: Literal["ridge", "mlp"] = "ridge", context: int = 2, upsample: int = 2,
                 n_fft: int = 1024, hop_length: int = 160, n_mels: int = 80, sr: int = 16000,
                 fmin: float = 0.0, fmax: float = 8000.0, power: float = 1.0, floor: float = 1e-5,
                 frame_rate: float | None = None,
                 alphas: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 10.0),
                 val_fraction: float = 0.15, hidden: int = 1024, epochs: int = 10, lr: float = 1e-3,
                 batch_size: int = 256, seed: int = 0):
        self.kind = kind
        self.context = context
        self.upsample = upsample
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.sr = sr
        self.fmin = fmin
        self.fmax = fmax
        self.power = power
        self.floor = floor
        self.frame_rate = frame_rate
        self.alphas = alphas
        self.val_fraction = val_fraction
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed

    # --- configuration --------------------------------------------------------------------
    @property
    def mel_config(self) -> MelConfig:
        return MelConfig(sr=self.sr, n_fft=self.n_fft, hop_length=self.hop_length, n_mels=self.n_mels,
                         fmin=self.fmin, fmax=self.fmax, power=self.power, floor=self.floor)

    @property
    def grid_rate(self) -> float:
        """Frames per second of what `predict` returns: upsample x the activations' frame rate
        (`frame_rate`; None = the mel's own rate, sr / hop_length, split over `upsample`)."""
        return self.sr / self.hop_length if self.frame_rate is None else self.upsample * self.frame_rate

    @classmethod
    def for_vocoder(cls, vocoder, frame_rate: float, **params) -> MelMapper:
        """A mapper whose targets are in `vocoder`'s mel format, for activations at `frame_rate`."""
        cfg = vocoder.mel_config
        return cls(sr=cfg.sr, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels, fmin=cfg.fmin,
                   fmax=cfg.fmax, power=cfg.power, floor=cfg.floor, frame_rate=frame_rate, **params)

    def vocoder_mel(self, grid_mel: np.ndarray) -> np.ndarray:
        """A log-mel on the mapper's grid read at the mel format's own frames (for a vocoder)."""
        cfg = self.mel_config
        if np.isclose(self.grid_rate, cfg.frame_rate):
            return grid_mel
        n = max(1, round(len(grid_mel) / self.grid_rate * cfg.frame_rate))
        return resample_frames(grid_mel, self.grid_rate, cfg.frame_rate, n)

    # --- fitting ------------------------------------------------------------------------------
    def targets(self, frames_list: list[np.ndarray], waves_list: list[np.ndarray],
                sr: int | None = None) -> list[np.ndarray]:
        """Per clip, [frame, upsample*n_mels]: the mel frames each activation frame predicts, from
        waves at `sr` (default the mapper's)."""
        if len(frames_list) != len(waves_list):
            raise ValueError(f"{len(frames_list)} activation clips but {len(waves_list)} waves")
        cfg = self.mel_config
        out = []
        for i, (f, w) in enumerate(zip(frames_list, waves_list)):
            if f.ndim != 2 or len(f) == 0:
                raise ValueError(f"clip {i}: activations must be [frame, d] with frames, got {f.shape}")
            expected = len(w) / (sr or self.sr) * self.grid_rate / self.upsample
            if abs(len(f) - expected) > 2 + 0.02 * expected:
                raise ValueError(f"clip {i}: {len(f)} activation frames but the wave is {len(w)} samples "
                                 f"(~{expected:.0f} frames at {self.grid_rate / self.upsample:g} frames/s); "
                                 "are frames and waves in the same clip order and rate?")
            out.append(target_mel(w, len(f), self.upsample, cfg, sr, self.grid_rate).reshape(len(f), -1))
        return out

    def fit(self, frames_list: list[np.ndarray], waves_list: list[np.ndarray], sr: int | None = None) -> MelMapper:
        """Learn from clips: activations [frame, d] and the clip's wave at `sr` (default the mapper's)."""
        frames_list = [np.asarray(f, dtype=np.float32) for f in frames_list]
        return self.fit_targets(frames_list, self.targets(frames_list, waves_list, sr))

    def fit_targets(self, frames_list: list[np.ndarray], targets_list: list[np.ndarray]) -> "MelMapper":
        """Learn from activations and precomputed targets [frame, upsample*n_mels] (see `targets`)."""
        if self.kind not in ("ridge", "mlp"):
            raise ValueError(f"kind must be 'ridge' or 'mlp', got {self.kind!r}")
        if not frames_list:
            raise ValueError("no clips to fit the mel mapper on")
        d = frames_list[0].shape[1]
        if any(f.ndim != 2 or f.shape[1] != d for f in frames_list):
            raise ValueError(f"every clip's activations must be [frame, {d}]")
        if any(len(t) != len(f) for t, f in zip(targets_list, frames_list)):
            raise ValueError("targets must have one row per activation frame (see MelMapper.targets)")
        n = sum(len(f) for f in frames_list)
        s1 = sum(f.sum(0, dtype=np.float64) for f in frames_list)
        mean = s1 / n
        var = sum(((f - mean) ** 2).sum(0) for f in frames_list) / n
        self.x_mean_ = mean.astype(np.float32)
        self.x_scale_ = np.sqrt(np.maximum(var, 1e-12)).astype(np.float32)
        self.n_features_in_ = d
        rng = np.random.default_rng(self.seed)
        n_val = int(round(self.val_fraction * len(frames_list))) if len(frames_list) >= 5 else 0
        val = set(rng.permutation(len(frames_list))[:n_val].tolist())
        if self.kind == "ridge":
            self._fit_ridge(frames_list, targets_list, val)
        else:
            self._fit_mlp(frames_list, targets_list, val)
        return self

    def _gather_index(self, frames_list) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised, edge-padded frames Z [row, d] and, per frame, the rows of its context
        [frame, 2*context+1]: Z[idx].flatten(1) are the stacked features without storing them."""
        zs, idx, base = [], [], 0
        k = np.arange(-self.context, self.context + 1)
        for f in frames_list:
            z = (np.asarray(f, dtype=np.float32) - self.x_mean_) / self.x_scale_
            zs.append(np.pad(z, ((self.context, self.context), (0, 0)), mode="edge"))
            idx.append(base + self.context + np.arange(len(f))[:, None] + k)
            base += len(f) + 2 * self.context
        return torch.from_numpy(np.concatenate(zs)), torch.from_numpy(np.concatenate(idx))

    def _features(self, frames: np.ndarray) -> np.ndarray:
        z = (np.asarray(frames, dtype=np.float32) - self.x_mean_) / self.x_scale_
        return stack_context(z, self.context)

    def _fit_ridge(self, frames_list, targets, val) -> None:
        # one pass of sufficient statistics; stacked features are built per clip, never all at once
        p, m = frames_list[0].shape[1] * (2 * self.context + 1), targets[0].shape[1]

        def moments(idx):
            G = np.zeros((p, p)); C = np.zeros((p, m)); sx = np.zeros(p); sy = np.zeros(m); yy = 0.0; n = 0
            for i in idx:
                x, y = self._features(frames_list[i]), targets[i].astype(np.float32)
                G += (x.T @ x).astype(np.float64); C += (x.T @ y).astype(np.float64)
                sx += x.sum(0, dtype=np.float64); sy += y.sum(0, dtype=np.float64)
                yy += float((y.astype(np.float64) ** 2).sum()); n += len(x)
            return G, C, sx, sy, yy, n

        tr_idx = [i for i in range(len(frames_list)) if i not in val]
        tr, va = moments(tr_idx), moments(sorted(val))
        G, C, sx, sy, n = tr[0], tr[1], tr[2], tr[3], tr[5]
        mx, my = sx / n, sy / n
        Gc = G - n * np.outer(mx, mx)
        Cc = C - n * np.outer(mx, my)
        scale = np.trace(Gc) / p
        self.val_mse_ = {}
        if val:
            Gv, Cv, sxv, syv, yyv, nv = va
            # validation residuals with the training centring: y' = y - my, x' = x - mx
            Gv_c = Gv - np.outer(sxv, mx) - np.outer(mx, sxv) + nv * np.outer(mx, mx)
            Cv_c = Cv - np.outer(sxv, my) - np.outer(mx, syv) + nv * np.outer(mx, my)
            yy_c = yyv - 2 * syv @ my + nv * my @ my
            e, V = np.linalg.eigh(Gc)
            A, B, H = V.T @ Cc, V.T @ Cv_c, V.T @ Gv_c @ V
            AA, AB = A @ A.T, (A * B).sum(1)
            for a in self.alphas:
                dinv = 1.0 / (np.maximum(e, 0) + a * scale)
                sse = yy_c - 2 * dinv @ AB + np.einsum("i,ij,j->", dinv, H * AA, dinv)
                self.val_mse_[float(a)] = float(sse / (nv * m))
            self.alpha_ = min(self.val_mse_, key=self.val_mse_.get)
            # refit on all clips with the chosen alpha
            G, C, sx, sy, n = G + Gv, C + Cv, sx + sxv, sy + syv, n + nv
            mx, my = sx / n, sy / n
            Gc = G - n * np.outer(mx, mx)
            Cc = C - n * np.outer(mx, my)
            scale = np.trace(Gc) / p
        else:
            self.alpha_ = float(np.median(self.alphas))  # nothing held out to choose with
        W = np.linalg.solve(Gc + self.alpha_ * scale * np.eye(p), Cc)
        self.coef_ = W.astype(np.float32)  # [p, upsample*n_mels]
        self.intercept_ = (my - mx @ W).astype(np.float32)
        self.mlp_ = None

    def _fit_mlp(self, frames_list, targets, val) -> None:
        torch.manual_seed(self.seed)
        tr = [i for i in range(len(frames_list)) if i not in val]
        Z, X = self._gather_index([frames_list[i] for i in tr])  # rows of X index rows of Z
        Y = torch.from_numpy(np.concatenate([targets[i] for i in tr]).astype(np.float32))
        y_mean = Y.mean(0)
        p = Z.shape[1] * X.shape[1]
        net = _mlp(p, self.hidden, Y.shape[1])
        with torch.no_grad():
            net[-1].bias.copy_(y_mean)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=1e-4)
        steps = self.epochs * int(np.ceil(len(X) / self.batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=max(steps, 1))
        g = torch.Generator().manual_seed(self.seed)
        self.val_mse_ = {}
        for ep in range(self.epochs):
            net.train()
            for b in torch.randperm(len(X), generator=g).split(self.batch_size):
                loss = (net(Z[X[b]].flatten(1)) - Y[b]).abs().mean()
                opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        net.eval()
        if val:
            Xv = torch.from_numpy(np.concatenate([self._features(frames_list[i]) for i in sorted(val)]))
            Yv = torch.from_numpy(np.concatenate([targets[i] for i in sorted(val)]).astype(np.float32))
            with torch.no_grad():
                self.val_mse_["mlp"] = float(((net(Xv) - Yv) ** 2).mean())
        self.mlp_ = net
        self.coef_ = None
        self.intercept_ = None

    # --- use -------------------------------------------------------------------------------
    def _check(self) -> None:
        if not hasattr(self, "x_mean_"):
            raise NotFittedError("MelMapper is not fitted; call fit(frames_list, waves_list) or load(dir)")

    def predict(self, frames: np.ndarray) -> np.ndarray:
        """[frame, d] activations -> [upsample*frame, n_mels] log-mel."""
        self._check()
        frames = np.asarray(frames, dtype=np.float32)
        if frames.ndim != 2 or frames.shape[1] != len(self.x_mean_):
            raise ValueError(f"expected activations [frame, {len(self.x_mean_)}], got {frames.shape}")
        x = self._features(frames)
        if self.kind == "ridge":
            y = x @ self.coef_ + self.intercept_
        else:
            with torch.no_grad():
                y = self.mlp_(torch.from_numpy(x)).numpy()
        return y.reshape(len(frames) * self.upsample, self.n_mels)

    # --- persistence: cfg.json + weights.safetensors ----------------------------------------
    def save(self, directory: str | Path) -> None:
        self._check()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"x_mean": self.x_mean_, "x_scale": self.x_scale_}
        if self.kind == "ridge":
            tensors |= {"coef": self.coef_, "intercept": self.intercept_}
        else:
            tensors |= {f"mlp.{k}": v.detach().numpy() for k, v in self.mlp_.state_dict().items()}
        cfg = {"format": "affectlens.MelMapper/1", **self.get_params(), "alphas": list(self.alphas),
               "alpha_": getattr(self, "alpha_", None), "val_mse_": {str(k): v for k, v in self.val_mse_.items()}}
        _atomic_write(directory / "weights.safetensors", lambda p: save_file(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(p)))
        _atomic_write(directory / "cfg.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))

    @classmethod
    def load(cls, directory: str | Path) -> "MelMapper":
        directory = Path(directory)
        cfg_path, w_path = directory / "cfg.json", directory / "weights.safetensors"
        if not cfg_path.exists() or not w_path.exists():
            raise FileNotFoundError(f"{directory} lacks cfg.json or weights.safetensors; rerun the mapper training")
        cfg = json.loads(cfg_path.read_text())
        if cfg.pop("format", None) != "affectlens.MelMapper/1":
            raise ValueError(f"{cfg_path} is not a MelMapper config")
        alpha, val_mse = cfg.pop("alpha_"), cfg.pop("val_mse_")
        self = cls(**{**cfg, "alphas": tuple(cfg["alphas"])})
        t = load_file(str(w_path))
        self.x_mean_, self.x_scale_ = t["x_mean"], t["x_scale"]
        self.n_features_in_ = len(self.x_mean_)
        self.val_mse_ = val_mse
        if alpha is not None:
            self.alpha_ = alpha
        if self.kind == "ridge":
            self.coef_, self.intercept_, self.mlp_ = t["coef"], t["intercept"], None
        else:
            sd = {k[4:]: torch.from_numpy(v) for k, v in t.items() if k.startswith("mlp.")}
            p, out = len(self.x_mean_) * (2 * self.context + 1), self.upsample * self.n_mels
            self.mlp_ = _mlp(p, self.hidden, out)
            self.mlp_.load_state_dict(sd)
            self.mlp_.eval()
            self.coef_ = self.intercept_ = None
        return self


InversionMode = Literal["residual", "direct", "vocoded"]
INVERSION_MODES = ("residual", "direct", "vocoded")


def _check_inputs(mapper: MelMapper, frames: np.ndarray, steered: np.ndarray, mode: str, vocoder=None) -> None:
    if frames.shape != steered.shape:
        raise ValueError(f"steered activations {steered.shape} differ in shape from the clip's {frames.shape}")
    if mode not in INVERSION_MODES:
        raise ValueError(f"inversion mode must be one of {INVERSION_MODES}, got {mode!r}")
    if vocoder is not None and vocoder.mel_config != mapper.mel_config:
        raise ValueError(f"the vocoder {vocoder.name} reads {vocoder.mel_config} but the mapper predicts "
                         f"{mapper.mel_config}; train the mapper with MelMapper.for_vocoder(vocoder, frame_rate)")


def steered_log_mel(mapper: MelMapper, frames: np.ndarray, steered: np.ndarray, wave: np.ndarray,
                    mode: InversionMode = "residual", sr: int | None = None) -> np.ndarray:
    """Log-mel on the mapper's grid [upsample*frame, n_mels] of a clip (wave at `sr`, default the
    mapper's) whose activations `frames` became `steered`.

    direct: the mapper's prediction from the steered activations (what the mapper cannot
    represent, e.g. harmonics from deep sites, is lost). residual and vocoded: the clip's true
    log-mel plus the change the mapper predicts, mapper(steered) - mapper(frames); unsteered it is
    the clip's own. For a ridge mapper the change is linear in the edit: a constant vector added to
    every frame becomes one fixed spectral-envelope change.
    """
    _check_inputs(mapper, frames, steered, mode)
    if mode == "direct":
        return mapper.predict(steered)
    true = target_mel(wave, len(frames), mapper.upsample, mapper.mel_config, sr, mapper.grid_rate)
    return true + (mapper.predict(steered) - mapper.predict(frames))


def _fit_length(wave: np.ndarray, n: int) -> np.ndarray:
    return np.pad(wave[:n], (0, max(0, n - len(wave)))).astype(np.float32)


def predicted_change(mapper: MelMapper, frames: np.ndarray, steered: np.ndarray) -> np.ndarray:
    """The log-mel change [upsample*frame, n_mels] on the mapper's grid that the mapper predicts for
    activations `frames` becoming `steered`: mapper(steered) - mapper(frames)."""
    if frames.shape != steered.shape:
        raise ValueError(f"steered activations {steered.shape} differ in shape from the clip's {frames.shape}")
    return mapper.predict(steered) - mapper.predict(frames)


def change_dependence(change: np.ndarray, upsample: int = 1) -> float:
    """How much a clip's mel change [grid frame, n_mels] varies over its activation frames (each
    `upsample` grid frames): the norm of what is left after subtracting its mean over frames,
    relative to the norm of the change. 0: one fixed spectral curve on every frame, i.e. an
    equaliser plus gain; towards 1: the change differs from frame to frame. NaN for a zero change."""
    c = np.asarray(change, dtype=np.float64)
    c = c[: len(c) // upsample * upsample].reshape(len(c) // upsample, -1)
    total = np.linalg.norm(c)
    if total == 0:
        return float("nan")
    return float(np.linalg.norm(c - c.mean(0, keepdims=True)) / total)


def render_change(mapper: MelMapper, frames: np.ndarray, change: np.ndarray, wave: np.ndarray,
                  mode: InversionMode = "residual", n_iter: int | None = None, vocoder=None,
                  sr: int | None = None) -> np.ndarray:
    """A clip (wave at `sr`, default the mapper's; activations `frames` at the mapper's site) with a
    log-mel change [grid frame, n_mels] on the mapper's grid applied, as a wave at `sr`.

    residual: the clip filtered by the change, keeping its own phase (`apply_mel_change`, `n_iter`
    Griffin-Lim steps, default 0), as long as `wave`; a zero change returns the clip. vocoded:
    `vocoder` of the clip's own mel plus the change, as long as `wave`; a zero change is the
    vocoder's resynthesis of the clip, which a neural vocoder renders with natural phase and, unlike
    filtering, can re-voice. direct: `vocoder` of the mapper's prediction from `frames` plus the
    change, as long as the activations last (what the mapper cannot represent is lost). The vocoder
    (default Griffin-Lim, `n_iter` 64) must read the mapper's mel format (`MelMapper.for_vocoder`);
    waves at another rate are resampled to it and back. Model edits and model-free controls (a
    fixed mel shift) go through this same function, so they differ only in the change."""
    _check_inputs(mapper, frames, frames, mode, vocoder)
    cfg = mapper.mel_config
    sr = sr or mapper.sr
    if mode != "residual":
        vocoder = vocoder or _griffin_lim(cfg, 64 if n_iter is None else n_iter)
    if mode == "direct":
        out = vocoder(mapper.vocoder_mel(mapper.predict(frames) + change))
        n = round(len(frames) * mapper.upsample / mapper.grid_rate * sr)
        return _fit_length(resample(out, cfg.sr, sr), n)
    delta = mapper.vocoder_mel(change)
    own = resample(wave, sr, cfg.sr).astype(np.float32)
    if mode == "residual":
        out = apply_mel_change(own, delta, cfg, n_iter=0 if n_iter is None else n_iter)
        return out if sr == cfg.sr else _fit_length(resample(out, cfg.sr, sr), len(wave))
    true = log_mel(own, cfg)
    shifted = np.zeros_like(true)
    k = min(len(delta), len(true))
    shifted[:k] = delta[:k]
    return _fit_length(resample(vocoder(true + shifted), cfg.sr, sr), len(wave))


def invert(mapper: MelMapper, frames: np.ndarray, steered: np.ndarray, wave: np.ndarray,
           mode: InversionMode = "residual", n_iter: int | None = None, vocoder=None,
           sr: int | None = None) -> np.ndarray:
    """Steered activations -> wave at `sr` (the clip's rate; default the mapper's): the change the
    mapper predicts (`predicted_change`) rendered by `render_change` (see there for the modes)."""
    _check_inputs(mapper, frames, steered, mode, vocoder)
    return render_change(mapper, frames, predicted_change(mapper, frames, steered), wave, mode=mode, n_iter=n_iter,
                         vocoder=vocoder, sr=sr)


def _griffin_lim(cfg: MelConfig, n_iter: int):
    from affectlens.steering.vocoder import GriffinLim

    return GriffinLim(cfg, n_iter=n_iter)


def _mlp(n_in: int, hidden: int, n_out: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, n_out))


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- quality of the unsteered round trip -----------------------------------------------------
def mel_cepstral_distortion(log_mel_ref: np.ndarray, log_mel_est: np.ndarray, n_ceps: int = 13) -> float:
    """Mean MCD in dB between two [mel_frame, n_mels] natural-log mels (mel-cepstra by DCT-II of
    the log-mel, c0 excluded so loudness does not count)."""
    c_ref = scipy.fft.dct(log_mel_ref, type=2, norm="ortho", axis=1)[:, 1:n_ceps + 1]
    c_est = scipy.fft.dct(log_mel_est, type=2, norm="ortho", axis=1)[:, 1:n_ceps + 1]
    return float(np.mean(10 / np.log(10) * np.sqrt(2 * ((c_ref - c_est) ** 2).sum(1))))


def mel_distances(log_mel_ref: np.ndarray, log_mel_est: np.ndarray, top_db: float | None = 80.0,
                  power: float = 1.0) -> dict[str, float]:
    """log-mel L1 (nats), spectral convergence (on linear mel magnitude) and MCD (dB).

    Both mels are floored `top_db` below the reference's peak first (None: no floor), so that
    near-silent bands, where a log is all noise, do not dominate; `power` says whether the log-mel
    is of magnitude (1) or power (2), i.e. how many nats a dB is.
    """
    n = min(len(log_mel_ref), len(log_mel_est))
    a, b = log_mel_ref[:n].astype(np.float64), log_mel_est[:n].astype(np.float64)
    if top_db is not None:
        floor = a.max() - top_db * np.log(10) / (20 / power)
        a, b = np.maximum(a, floor), np.maximum(b, floor)
    ea, eb = np.exp(a / power), np.exp(b / power)
    return {
        "log_mel_l1": float(np.abs(a - b).mean()),
        "spectral_convergence": float(np.linalg.norm(ea - eb) / max(np.linalg.norm(ea), 1e-12)),
        "mcd_db": mel_cepstral_distortion(a, b),
    }


def round_trip_quality(mapper: MelMapper, frames: np.ndarray, wave: np.ndarray, vocoder=None,
                       sr: int | None = None) -> dict[str, float]:
    """How much the inversion itself loses for one clip (wave at `sr`, default the mapper's), with
    no steering.

    mapper_*: the clip's true log-mel vs the mapper's prediction from its activations.
    With a `vocoder`: vocoder_* compares the true log-mel with that of the vocoder's output from the
    true mel (the vocoder alone: the unsteered "vocoded" path), resynth_* with that of its output
    from the prediction (the unsteered "direct" path); f0 mean and median (pYIN, NaN if nothing is
    voiced) of the original and both, the relative error of the median (pYIN on Griffin-Lim output
    makes octave errors that move the mean more), and the frame-wise `pitch_agreement` with the
    original (semitone error on frames voiced in both, voicing agreement). The unsteered "residual" path returns the
    clip itself and needs no row. Compare steered clips with the unsteered clip taken through the
    same path, not with the original.
    """
    from affectlens.acoustics import pitch_agreement, prosody

    cfg = mapper.mel_config
    sr = sr or mapper.sr
    pred = mapper.predict(frames)
    true_grid = target_mel(wave, len(frames), mapper.upsample, cfg, sr, mapper.grid_rate)
    out = {f"mapper_{k}": v for k, v in mel_distances(true_grid, pred, power=cfg.power).items()}
    if vocoder is None:
        return out
    _check_inputs(mapper, frames, frames, "direct", vocoder)
    wave = np.asarray(wave, dtype=np.float32)
    true = log_mel(resample(wave, sr, cfg.sr).astype(np.float32), cfg)
    p0 = prosody(wave, sr)
    out |= {"f0_mean_hz": p0["f0_mean_hz"], "f0_median_hz": p0["f0_median_hz"]}
    for name, mel in (("vocoder", true), ("resynth", mapper.vocoder_mel(pred))):
        w = vocoder(mel)
        out |= {f"{name}_{k}": v for k, v in mel_distances(true, log_mel(w, cfg), power=cfg.power).items()}
        w = _fit_length(resample(w, cfg.sr, sr), len(wave))
        p = prosody(w, sr)
        out |= {f"{name}_{k}": v for k, v in pitch_agreement(wave, w, sr).items()}
        out[f"{name}_f0_mean_hz"] = p["f0_mean_hz"]
        out[f"{name}_f0_median_hz"] = p["f0_median_hz"]
        out[f"{name}_f0_rel_err"] = abs(p["f0_median_hz"] - p0["f0_median_hz"]) / p0["f0_median_hz"]
    return out
