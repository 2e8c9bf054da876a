"""Hand-made acoustic measures of a clip, shared by the probes' acoustic baseline and the steering
judges: prosody (pitch, level, timing), frame-wise pitch agreement, active level and re-levelling,
and the MFCC/pitch/energy statistics the acoustic baseline and judge read. A leaf: it imports
nothing of the package."""

from __future__ import annotations

import numpy as np
import librosa

F0_MIN_HZ = 60.0
F0_MAX_HZ = 500.0
_HOP_S = 0.01  # 100 pitch/energy frames per second
_EPS = 1e-10


def _as_mono_float(wave: np.ndarray, what: str = "wave") -> np.ndarray:
    w = np.asarray(wave, dtype=np.float32)
    if w.ndim != 1:
        raise ValueError(f"{what} must be a mono 1-D array, got shape {w.shape}")
    if len(w) == 0:
        raise ValueError(f"{what} is empty")
    return w


def pitch_track(wave: np.ndarray, sr: int, resolution: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """pYIN f0 [frame] in Hz (NaN where unvoiced) and the voiced flag [frame], 100 frames/s.

    `resolution` is the pitch grid in semitones: pYIN returns grid values, so 0.1 (0.6 %) for
    measurement; 0.25 is 5x faster and fine for classifier features.
    """
    w = _as_mono_float(wave)
    hop = max(1, int(round(sr * _HOP_S)))
    frame_length = int(2 ** np.ceil(np.log2(0.064 * sr)))  # ~64 ms: four periods of 60 Hz
    if len(w) < frame_length:
        w = np.pad(w, (0, frame_length - len(w)))
    f0, voiced, _ = librosa.pyin(w, fmin=F0_MIN_HZ, fmax=F0_MAX_HZ, sr=sr, frame_length=frame_length,
                                 hop_length=hop, resolution=resolution)
    return f0, voiced.astype(bool)


def pitch_agreement(reference: np.ndarray, other: np.ndarray, sr: int) -> dict[str, float]:
    """How closely `other` follows `reference`'s pitch contour, frame by frame (same length and
    timing, e.g. a resynthesis): over frames voiced in both, the median absolute difference in
    semitones and the fraction within one semitone; and the voicing agreement (frames voiced in
    both or in neither). Medians of whole clips hide this: a vocoder that voices a breath moves the
    clip's median f0 while every shared frame stays in tune."""
    f0_a, v_a = pitch_track(reference, sr)
    f0_b, v_b = pitch_track(other, sr)
    n = min(len(f0_a), len(f0_b))
    f0_a, v_a, f0_b, v_b = f0_a[:n], v_a[:n], f0_b[:n], v_b[:n]
    both = v_a & v_b & np.isfinite(f0_a) & np.isfinite(f0_b)
    st = np.abs(12 * np.log2(f0_b[both] / f0_a[both]))
    return {"f0_frame_err_st": float(np.median(st)) if both.any() else float("nan"),
            "f0_within_1st": float((st < 1).mean()) if both.any() else float("nan"),
            "voicing_agreement": float((v_a == v_b).mean())}


def _frame_rms_db(w: np.ndarray, sr: int) -> np.ndarray:
    hop = max(1, int(round(sr * _HOP_S)))
    rms = librosa.feature.rms(y=w, frame_length=4 * hop, hop_length=hop)[0]
    return 20 * np.log10(rms + _EPS)


def active_level_db(wave: np.ndarray, sr: int) -> float:
    """Active speech level (dBFS): mean frame level over frames within 30 dB of the loudest, so that
    pauses do not count."""
    frame_db = _frame_rms_db(_as_mono_float(wave), sr)
    return float(frame_db[frame_db > frame_db.max() - 30].mean())


def relevel(wave: np.ndarray, sr: int, level_db: float) -> np.ndarray:
    """The wave scaled so that its `active_level_db` is `level_db` (float, may exceed full scale: it is
    read by judges, not written)."""
    w = _as_mono_float(wave)
    return (w * 10 ** ((level_db - active_level_db(w, sr)) / 20)).astype(np.float32)


def within_full_scale(wave: np.ndarray, peak: float = 0.999) -> np.ndarray:
    """The wave scaled down so that its peak is at most `peak`, as steered files are written
    (`steering.watermark.embed` keeps the marked sum inside full scale the same way)."""
    w = np.asarray(wave, dtype=np.float32)
    top = float(np.abs(w).max()) if len(w) else 0.0
    return w * np.float32(peak / top) if top > peak else w


def _f0_stats(f0: np.ndarray, voiced: np.ndarray) -> dict[str, float]:
    v = f0[voiced & np.isfinite(f0)]
    if len(v) == 0:
        return {"f0_mean_hz": float("nan"), "f0_median_hz": float("nan"), "f0_range_st": float("nan"),
                "f0_std_st": float("nan")}
    lo, hi = np.percentile(v, [5, 95])
    st = 12 * np.log2(v / np.median(v))
    return {
        "f0_mean_hz": float(v.mean()),
        "f0_median_hz": float(np.median(v)),
        "f0_range_st": float(12 * np.log2(hi / lo)),
        "f0_std_st": float(st.std()),
    }


def prosody(wave: np.ndarray, sr: int) -> dict[str, float]:
    """Pitch, loudness and duration of one clip.

    f0_mean_hz / f0_median_hz: over voiced frames (pYIN, 60-500 Hz); f0_range_st: 5th-95th
    percentile span in semitones; f0_std_st: spread in semitones; voiced_fraction: voiced frames /
    all frames; rms_db: level of the whole clip (dBFS of the RMS); active_rms_db: mean frame level
    over frames within 30 dB of the loudest (speech, not pauses); duration_s. Pitch values are NaN
    when no frame is voiced.
    """
    w = _as_mono_float(wave)
    f0, voiced = pitch_track(w, sr)
    return {
        **_f0_stats(f0, voiced),
        "voiced_fraction": float(voiced.mean()),
        "rms_db": float(10 * np.log10(np.mean(w.astype(np.float64) ** 2) + _EPS)),
        "active_rms_db": active_level_db(w, sr),
        "duration_s": len(w) / sr,
    }


N_MFCC = 20
ACOUSTIC_FEATURE_NAMES = (
    [f"mfcc{i}_mean" for i in range(N_MFCC)] + [f"mfcc{i}_std" for i in range(N_MFCC)]
    + [f"dmfcc{i}_std" for i in range(N_MFCC)]
    + ["log2_f0_mean", "f0_std_st", "f0_range_st", "voiced_fraction",
       "rms_db_mean", "rms_db_std", "rms_db_range"]
)


LEVEL_FEATURES = ("mfcc0_mean", "rms_db_mean")
"""Features that move with the absolute level (c0 of the MFCC is the log energy): a judge of
emotion in steered audio leaves them out, so that turning the volume up cannot read as anger."""


def acoustic_features(wave: np.ndarray, sr: int) -> np.ndarray:
    """One clip -> [feature] (names in ACOUSTIC_FEATURE_NAMES): MFCC mean/std, delta-MFCC std,
    pitch statistics (log2 Hz, semitones; a clip with no voiced frame gets neutral values and
    voiced_fraction 0) and frame-energy statistics."""
    w = _as_mono_float(wave)
    hop = max(1, int(round(sr * _HOP_S)))
    n_fft = int(2 ** np.ceil(np.log2(0.025 * sr)))
    mfcc = librosa.feature.mfcc(y=w, sr=sr, n_mfcc=N_MFCC, n_fft=n_fft, hop_length=hop)
    dmfcc = np.diff(mfcc, axis=1) if mfcc.shape[1] > 1 else np.zeros_like(mfcc)
    f0, voiced = pitch_track(w, sr, resolution=0.25)
    s = _f0_stats(f0, voiced)
    if np.isnan(s["f0_mean_hz"]):
        pitch = [np.log2(150.0), 0.0, 0.0, 0.0]
    else:
        pitch = [np.log2(s["f0_median_hz"]), s["f0_std_st"], s["f0_range_st"], float(voiced.mean())]
    db = _frame_rms_db(w, sr)
    energy = [db.mean(), db.std(), np.percentile(db, 95) - np.percentile(db, 5)]
    return np.concatenate([mfcc.mean(1), mfcc.std(1), dmfcc.std(1), pitch, energy]).astype(np.float32)


def acoustic_feature_matrix(waves: list[np.ndarray], sr: int, n_jobs: int = 1) -> np.ndarray:
    """[clip, feature] for a list of waves; `n_jobs` > 1 spreads clips over processes."""
    if n_jobs == 1 or len(waves) < 2:
        return np.stack([acoustic_features(w, sr) for w in waves])
    from joblib import Parallel, delayed

    return np.stack(Parallel(n_jobs=n_jobs)(delayed(acoustic_features)(w, sr) for w in waves))
