"""Audio in and out: resampling, and writing audio the workflow can trust (16-bit PCM WAV, written to a
temporary name and renamed)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf


def resample(wave: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """float64 `wave` at `sr_out` (soxr, high quality; the wave itself when the rates agree)."""
    if sr_in == sr_out:
        return np.asarray(wave, dtype=np.float64)
    import soxr

    return soxr.resample(np.asarray(wave, dtype=np.float64), sr_in, sr_out, quality="HQ")


def write_wav(path: str | Path, wave: np.ndarray, sr: int, peak_normalize: float | None = None) -> Path:
    """Write a mono float wave in [-1, 1] as 16-bit PCM; samples beyond full scale are clipped.

    `peak_normalize` (e.g. 0.95) scales the wave so its peak sits at that level first (for
    listening to vocoder output, whose level is arbitrary). A killed write leaves no file at `path`.
    """
    path = Path(path)
    w = np.asarray(wave, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"{path}: write_wav takes a mono 1-D wave, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{path}: the wave has NaN or infinite samples")
    if peak_normalize is not None:
        peak = np.abs(w).max() if len(w) else 0.0
        if peak > 0:
            w = w * (peak_normalize / peak)
    w = np.clip(w, -1.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    os.close(fd)
    try:
        sf.write(tmp, w, int(sr), subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
