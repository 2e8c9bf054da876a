"""Label and watermark every steered audio file, so that edited voices can be told apart.

Two marks, for two situations:

- a *label* in the file's metadata (WAV LIST/INFO ICMT "comment" chunk, FLAC Vorbis comment),
  `LABEL`, which anyone can read but a re-encode or a copy-paste may drop;
- a *watermark* in the samples themselves, which survives re-encoding to MP3 and Opus.

The watermark is spread spectrum. A key seeds a block of `BLOCK` samples (at `WM_SR` = 16 kHz) of
Gaussian noise band-limited to 1-4 kHz; the block is tiled over the clip, shaped by the clip's own
smoothed loudness envelope (so it hides under speech and stays out of pauses) and added at
`snr_db` below the clip (`DEFAULT_SNR_DB` = 22 dB; ~16 dB within 1-4 kHz). Detection resamples to 16 kHz, folds the clip into one
block length (sum of consecutive blocks), and takes the phase-whitened (GCC-PHAT) circular
cross-correlation with the key's block in 1-4 kHz, over every lag: the score is the highest peak in
units of the correlation's robust spread over lags. Folding and the search over all lags make it
blind to cropping and codec delay; whitening makes the null the same for any host spectrum.

Under the null (no watermark, or another key) the `BLOCK` lag values are close to independent
standard normals, so P(score > t) ~= BLOCK * Q(t): `THRESHOLD` = 6.0 gives ~8e-6 per file
(`false_alarm_probability`). `null_scores` gives the empirical null of a file under random keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import ndtr

from affectlens.io_audio import resample

LABEL = "Edited for research — emotion changed"
WM_SR = 16000
BLOCK = 8192  # samples at WM_SR (0.51 s): the period of the tiled pattern and the lags searched
BAND_HZ = (1000.0, 4000.0)
THRESHOLD = 6.0
DEFAULT_KEY = "affectlens"
DEFAULT_SNR_DB = 22.0  # 25 dB left heavily edited 1.5 s clips at ~7 sigma, too close to THRESHOLD
_ENV_WIN = 320  # 20 ms frames for the loudness envelope at WM_SR


def false_alarm_probability(threshold: float = THRESHOLD, block: int = BLOCK) -> float:
    """P(score > threshold) for an unmarked file: the max of `block` independent N(0, 1) lags."""
    return float(1 - ndtr(threshold) ** block)


def _band_mask(n: int, sr: int = WM_SR) -> np.ndarray:
    f = np.fft.rfftfreq(n, 1 / sr)
    return (f >= BAND_HZ[0]) & (f <= BAND_HZ[1])


def key_block(key: str = DEFAULT_KEY) -> np.ndarray:
    """[BLOCK] unit-RMS noise in 1-4 kHz, seeded by the key (sha256, so any string works)."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    spec = np.fft.rfft(np.random.default_rng(seed).standard_normal(BLOCK))
    spec[~_band_mask(BLOCK)] = 0
    b = np.fft.irfft(spec, BLOCK)
    return (b / np.sqrt(np.mean(b ** 2))).astype(np.float64)


def _envelope(wave: np.ndarray) -> np.ndarray:
    """Smoothed RMS of the wave per 20 ms, interpolated to samples, floored 40 dB below its peak."""
    n = len(wave)
    frames = int(np.ceil(n / _ENV_WIN))
    padded = np.pad(wave, (0, frames * _ENV_WIN - n))
    rms = np.sqrt(np.mean(padded.reshape(frames, _ENV_WIN) ** 2, axis=1))
    rms = np.convolve(rms, np.hanning(7) / np.hanning(7).sum(), mode="same")  # ~120 ms smoothing
    rms = np.maximum(rms, rms.max() * 1e-2)
    centres = (np.arange(frames) + 0.5) * _ENV_WIN
    return np.interp(np.arange(n), centres, rms)


def embed(wave: np.ndarray, sr: int, key: str = DEFAULT_KEY, snr_db: float = DEFAULT_SNR_DB) -> np.ndarray:
    """The wave [sample] plus the key's watermark at `snr_db` below it (signal power / watermark
    power over the clip). Any sample rate: the mark is made at 16 kHz and resampled to `sr`."""
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim != 1 or len(wave) == 0:
        raise ValueError(f"watermark embed needs a non-empty mono wave, got shape {wave.shape}")
    if sr < 2 * BAND_HZ[1]:
        raise ValueError(f"sample rate {sr} Hz cannot carry the 1-4 kHz watermark; use >= 8 kHz")
    w16 = resample(wave, sr, WM_SR)
    block = key_block(key)
    mark = np.tile(block, int(np.ceil(len(w16) / BLOCK)))[:len(w16)] * _envelope(w16)
    mark = resample(mark, WM_SR, sr)[:len(wave)]
    mark = np.pad(mark, (0, len(wave) - len(mark)))
    p_sig, p_mark = np.mean(wave ** 2), np.mean(mark ** 2)
    if p_sig == 0 or p_mark == 0:
        return wave.astype(np.float32)  # silence: nothing to hide a mark under (the label remains)
    mark *= np.sqrt(p_sig / p_mark * 10 ** (-snr_db / 10))
    out = wave + mark
    peak = np.abs(out).max()
    if peak > 0.999:  # keep the sum inside full scale; a gain does not change the score
        out *= 0.999 / peak
    return out.astype(np.float32)


LEVELS_DB = (34.0, 31.0, 28.0, 25.0, 22.0, 19.0, 16.0, 13.0, 10.0)
MARGIN = 2.0
SNR_DB_RANGE = (min(LEVELS_DB), max(LEVELS_DB))
"""The fixed levels a user may ask for (dB below the audio), the span `embed_quietest` searches.
Quieter than 34 dB the mark is not detectable: on espeak speech a 34 dB mark scores ~5 (1 s) to ~8
(3-4 s) against THRESHOLD 6 before any re-encode and under 6 after Opus 16 kbit/s; 40 dB scores ~4,
the null's level. Louder than 10 dB it stops hiding under the voice: a tenth of the clip's power as
band-limited noise is plainly audible and nothing is gained (10 dB already scores ~50 after Opus)."""


def check_level(snr_db) -> float:
    """A fixed watermark level as a float, or ValueError naming the range and why."""
    lo, hi = SNR_DB_RANGE
    try:
        level = float(snr_db)
    except (TypeError, ValueError):
        level = float("nan")
    if isinstance(snr_db, bool) or not np.isfinite(level) or not lo <= level <= hi:
        raise ValueError(f"watermark level {snr_db!r} dB: give 'auto' or a number from {lo:g} to {hi:g} dB below "
                         f"the audio (quieter than {hi:g} dB the mark is not detectable; louder than {lo:g} dB it "
                         f"is audible)")
    return level


@dataclass(frozen=True)
class Marked:
    wave: np.ndarray
    snr_db: float
    """The level chosen for this clip (dB below the clip)."""
    score: float
    """Detection score of the chosen level after the codec round trip."""
    margin_met: bool
    """False when even the loudest level stayed under margin x threshold (it is used anyway)."""


def embed_quietest(wave: np.ndarray, sr: int, key: str = DEFAULT_KEY, levels=LEVELS_DB, margin: float = MARGIN,
                   threshold: float = THRESHOLD, codec: str = "opus", bitrate: int = 16000) -> Marked:
    """The quietest watermark that this clip still carries through a lossy re-encode.

    Levels are tried from quiet to loud; each marked copy is encoded with `codec` at `bitrate`
    (Opus 16 kbit/s, the harshest re-encode the mark is claimed to survive) and decoded again, and
    the first level whose detection score there is at least `margin` x `threshold` is taken. How
    loud a mark has to be depends on the clip (length, how much of it is loud speech), so a fixed
    level is either audible and costly to ASR on long clips or too weak on short ones."""
    import tempfile

    levels = sorted(levels, reverse=True)
    best = None
    with tempfile.TemporaryDirectory() as tmp:
        for level in levels:
            marked = embed(wave, sr, key=key, snr_db=level)
            path = encode(marked, sr, Path(tmp) / f"{level:g}.ogg", codec, bitrate)
            score = detect(*load_any(path), key=key, threshold=threshold).score
            best = Marked(marked, float(level), score, score >= margin * threshold)
            if best.margin_met:
                break
    return best


def _lag_correlation(wave16: np.ndarray, block: np.ndarray) -> np.ndarray:
    """GCC-PHAT circular cross-correlation [BLOCK] of the folded wave with the key's block."""
    n = int(np.ceil(len(wave16) / BLOCK)) * BLOCK
    folded = np.pad(wave16, (0, n - len(wave16))).reshape(-1, BLOCK).sum(0)
    X, R = np.fft.rfft(folded), np.fft.rfft(block)
    band = _band_mask(BLOCK)
    cross = np.zeros_like(X)
    cross[band] = X[band] * np.conj(R[band]) / (np.abs(X[band]) * np.abs(R[band]) + 1e-12)
    return np.fft.irfft(cross, BLOCK)


def _score(xc: np.ndarray) -> float:
    spread = 1.4826 * np.median(np.abs(xc - np.median(xc)))  # robust std: the peak does not inflate it
    return float((xc.max() - np.median(xc)) / max(spread, 1e-12))


@dataclass(frozen=True)
class Detection:
    score: float
    """Highest correlation peak over lags, in standard deviations of the null."""
    threshold: float
    detected: bool
    lag: int
    """Lag (samples at 16 kHz, modulo BLOCK) of the peak: the offset of the mark in the file."""
    false_alarm_probability: float
    """P(score >= threshold) for an unmarked file."""


def detect(wave: np.ndarray, sr: int, key: str = DEFAULT_KEY, threshold: float = THRESHOLD) -> Detection:
    """Is the key's watermark in this wave? (any sample rate; multichannel is averaged)"""
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    if len(wave) == 0:
        raise ValueError("cannot check an empty wave for a watermark")
    xc = _lag_correlation(resample(wave, sr, WM_SR), key_block(key))
    s = _score(xc)
    return Detection(score=s, threshold=threshold, detected=s >= threshold, lag=int(np.argmax(xc)),
                     false_alarm_probability=false_alarm_probability(threshold))


def null_scores(wave: np.ndarray, sr: int, n_keys: int = 200, seed: int = 0) -> np.ndarray:
    """Scores of the wave under `n_keys` random keys: the empirical null distribution for this file."""
    w16 = resample(np.asarray(wave, dtype=np.float64), sr, WM_SR)
    rng = np.random.default_rng(seed)
    return np.array([_score(_lag_correlation(w16, key_block(f"null-{rng.integers(1 << 62)}")))
                     for _ in range(n_keys)])


def snr_db(original: np.ndarray, marked: np.ndarray) -> float:
    """10 log10(power of original / power of (marked - original)): how far below the clip the mark is."""
    o, m = np.asarray(original, dtype=np.float64), np.asarray(marked, dtype=np.float64)
    return float(10 * np.log10(np.mean(o ** 2) / max(np.mean((m - o) ** 2), 1e-30)))


# --- files ----------------------------------------------------------------------------------------
def write_steered_audio(path: str | Path, wave: np.ndarray, sr: int, key: str = DEFAULT_KEY,
                        snr_db: float | str = "auto", label: str = LABEL) -> float:
    """Write steered audio, watermarked and labelled, atomically; returns the watermark's level in
    dB. `snr_db` "auto" takes the quietest level that survives re-encoding with margin
    (`embed_quietest`), a number that fixed level. WAV gets the label in its LIST/INFO chunk (ICMT
    comment, INAM title), FLAC/OGG in Vorbis comments. PCM_16 for WAV."""
    import soundfile as sf

    from affectlens.io import atomic_path

    path = Path(path)
    fmt = path.suffix.lstrip(".").upper()
    if fmt not in ("WAV", "FLAC", "OGG"):
        raise ValueError(f"cannot write steered audio to {path}: use .wav or .flac (labels need a tag chunk)")
    if snr_db == "auto":
        chosen = embed_quietest(wave, sr, key=key)
        marked, snr_db = chosen.wave, chosen.snr_db
    else:
        snr_db = check_level(snr_db)
        marked = embed(wave, sr, key=key, snr_db=snr_db)
    subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS"}[fmt]
    with atomic_path(path) as tmp:
        with sf.SoundFile(tmp, "w", samplerate=sr, channels=1, subtype=subtype, format=fmt) as f:
            f.comment = label
            f.title = label
            f.software = "affectlens"
            f.write(marked)
    return float(snr_db)


def read_label(path: str | Path) -> str | None:
    """The file's comment/title tag if it carries `LABEL` (any container PyAV or soundfile reads)."""
    tags = []
    try:
        import soundfile as sf

        with sf.SoundFile(str(path)) as f:
            tags += list(f.copy_metadata().values())
    except Exception:
        pass
    try:  # ID3 (MP3) and Ogg/Opus tags that libsndfile does not expose
        import av

        with av.open(str(path)) as c:
            tags += list(c.metadata.values())
            for s in c.streams.audio:
                tags += list(s.metadata.values())
    except Exception:
        pass
    for v in tags:
        if "Edited for research" in str(v):
            return str(v)
    return None


def load_any(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float wave and its rate from WAV/FLAC (soundfile) or anything FFmpeg decodes (PyAV)."""
    import soundfile as sf

    try:
        w, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return w.mean(1), sr
    except Exception:
        pass
    import av

    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        sr = stream.codec_context.sample_rate
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
        chunks = [r.to_ndarray().reshape(-1) for frame in c.decode(stream) for r in resampler.resample(frame)]
        chunks += [r.to_ndarray().reshape(-1) for r in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32), sr


def encode(wave: np.ndarray, sr: int, path: str | Path, codec: str, bitrate: int | None = None,
           label: str | None = None) -> Path:
    """Encode a mono wave with PyAV: codec "mp3" (libmp3lame, .mp3) or "opus" (libopus, .ogg/.opus,
    at 48 kHz unless sr is one Opus takes). `label` goes into the container's comment tag."""
    import av

    path = Path(path)
    name = {"mp3": "libmp3lame", "opus": "libopus"}[codec]
    rate = sr
    if codec == "opus" and sr not in (48000, 24000, 16000, 12000, 8000):
        wave, rate = resample(wave, sr, 48000), 48000
    x = np.asarray(wave, dtype=np.float32)[None]
    with av.open(str(path), "w") as c:
        if label:
            c.metadata["comment"] = label
        s = c.add_stream(name, rate=rate, layout="mono")
        if bitrate:
            s.bit_rate = bitrate
        fmt = "fltp" if codec == "mp3" else "flt"
        frame_size = s.codec_context.frame_size or 1152
        for i in range(0, x.shape[1], frame_size):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, i:i + frame_size]), format=fmt, layout="mono")
            frame.sample_rate = rate
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def check_file(path: str | Path, key: str = DEFAULT_KEY, threshold: float = THRESHOLD) -> tuple[Detection, str | None]:
    """Watermark detection and label of one audio file."""
    wave, sr = load_any(path)
    return detect(wave, sr, key=key, threshold=threshold), read_label(path)
