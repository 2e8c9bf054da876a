"""Decoding: any clip in a manifest -> 16 kHz mono FLAC, with unusable clips rejected, not fatal.

One bad file in ten thousand must not stop a run: `decode_manifest` writes every clip it can and
lists the others, each with its reason, for `rejected.tsv`.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import soxr
from tqdm import tqdm

from affectlens.io import write_audio

SAMPLE_RATE = 16000
SILENCE_RMS = 1e-3  # -60 dBFS: below this a clip holds no usable signal


class DecodeError(RuntimeError):
    """A clip that cannot be turned into audio; the message names the file and why."""


def _seconds(value) -> float | None:
    # Manifests leave start/end empty (NaN) for "whole file".
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def _read_soundfile(path: Path, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    info = sf.info(str(path))
    first = int(round(start * info.samplerate)) if start is not None else 0
    last = int(round(end * info.samplerate)) if end is not None else None
    x, native_sr = sf.read(str(path), start=first, stop=last, dtype="float32", always_2d=True)
    return x.mean(axis=1), native_sr


def _read_audioread(path: Path, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    # audioread (ffmpeg, gstreamer, ...) is what librosa.load falls back to; called directly it
    # skips librosa's multi-second numba import.
    import audioread

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its raw backend imports aifc/audioop/sunau
        f = audioread.audio_open(str(path))
    with f:
        native_sr, channels = int(f.samplerate), int(f.channels)
        first = int(round((start or 0.0) * native_sr)) * channels
        last = None if end is None else int(round(end * native_sr)) * channels
        blocks, seen = [], 0
        for buf in f:
            block = np.frombuffer(buf, dtype="<i2")
            lo, hi = max(0, first - seen), len(block) if last is None else min(len(block), last - seen)
            if hi > lo:
                blocks.append(block[lo:hi])
            seen += len(block)
            if last is not None and seen >= last:
                break
    x = np.concatenate(blocks) if blocks else np.zeros(0, np.int16)
    x = x[: len(x) - len(x) % channels].reshape(-1, channels)
    return x.mean(axis=1).astype(np.float32) / 32768.0, native_sr


def _has_av() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def _read_av(path: Path, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of any container ffmpeg knows (PyAV wheels bundle ffmpeg)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise DecodeError(f"{path}: the file has no audio stream")
        stream = container.streams.audio[0]
        if start:
            # Lands on the last seek point at or before `start`; the exact cut is made below.
            container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
        resampler = av.AudioResampler(format="fltp")  # any sample format -> float planar, same layout/rate
        blocks, native_sr, t_first, seen = [], None, None, 0
        for packet in container.demux(stream):
            for frame in packet.decode():
                for out in resampler.resample(frame):
                    native_sr = native_sr or out.sample_rate
                    if t_first is None:
                        t_first = float(out.pts * out.time_base) if out.pts is not None else 0.0
                    block = out.to_ndarray().reshape(len(out.layout.channels), -1)
                    blocks.append(block.mean(axis=0))
                    seen += block.shape[1]
            if end is not None and t_first is not None and t_first + seen / native_sr >= end:
                break
        else:
            for out in resampler.resample(None):
                blocks.append(out.to_ndarray().reshape(len(out.layout.channels), -1).mean(axis=0))
    if native_sr is None:  # not one frame: a file named as audio that is not (ffmpeg guesses hard)
        window = f" from {start} s" if start else ""
        raise DecodeError(f"{path}: not decodable as audio (ffmpeg took it for {container.format.name}, "
                          f"but no audio frame decodes{window})")
    x = np.concatenate(blocks).astype(np.float32)
    lo = int(round(((start or 0.0) - t_first) * native_sr))
    hi = None if end is None else int(round((end - t_first) * native_sr))
    return x[max(0, lo): hi], native_sr


def probe_duration(path: str | Path) -> float | None:
    """Seconds of audio in `path` from its header (no decoding); None when the header does not say."""
    path = Path(path)
    try:
        return float(sf.info(str(path)).duration)
    except Exception:  # noqa: BLE001 - not a libsndfile format: ask ffmpeg
        pass
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise DecodeError(f"{path}: the file has no audio stream")
        stream = container.streams.audio[0]
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if container.duration is not None:
            return container.duration / av.time_base
    return None


def too_long_by_header(path: str | Path, start, end, max_duration: float, slack: float = 1.0) -> str | None:
    """The rejection reason of a clip whose container header already says it spans more than
    `max_duration` (+ `slack`, for headers that estimate), so a 2-hour file is turned away without
    decoding it; None when it does not, or when the header does not say (decoding decides)."""
    start, end = _seconds(start), _seconds(end)
    try:
        total = probe_duration(path)
    except Exception:  # noqa: BLE001 - unreadable header: let decoding give the reason
        return None
    if total is None:
        return None
    span = (min(end, total) if end is not None else total) - (start or 0.0)
    if span > max_duration + slack:
        return f"too long: {span:.1f} s > max_duration {max_duration} s (from the file header; not decoded)"
    return None


def decode_clip(path: str | Path, start: float | None = None, end: float | None = None,
                sr: int = SAMPLE_RATE) -> np.ndarray:
    """[sample] float32 mono at `sr` for `path` between `start` and `end` seconds (None = file edge).

    soundfile (libsndfile: wav, flac, ogg, mp3, ...) first; PyAV (the ffmpeg libraries bundled in
    its wheels: mp4/m4a/mkv/webm video and audio, aac, opus, ...) for the rest; audioread only
    where PyAV is not installed.
    """
    path = Path(path)
    start, end = _seconds(start), _seconds(end)
    if start is not None and end is not None and end <= start:
        raise DecodeError(f"{path}: clip end {end} s is not after start {start} s; fix the manifest row")
    if not path.is_file():
        raise DecodeError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DecodeError(f"{path}: empty file (0 bytes)")
    try:
        x, native_sr = _read_soundfile(path, start, end)
    except Exception as sf_error:  # noqa: BLE001 - any libsndfile failure means "try the fallback"
        fallback, reader = ("PyAV", _read_av) if _has_av() else ("audioread", _read_audioread)
        try:
            x, native_sr = reader(path, start, end)
        except Exception as fallback_error:  # noqa: BLE001
            raise DecodeError(f"{path}: not decodable as audio (soundfile: {sf_error}; "
                              f"{fallback}: {type(fallback_error).__name__}: {fallback_error})"
                              + ("" if fallback == "PyAV" else "; for mp4/m4a/opus sources `pip install av`")
                              ) from fallback_error
    if native_sr != sr and len(x):
        x = soxr.resample(x, native_sr, sr, quality="HQ")
    return np.ascontiguousarray(x, dtype=np.float32)


def check_clip(x: np.ndarray, sr: int, min_duration: float, max_duration: float,
               silence_rms: float = SILENCE_RMS) -> str | None:
    """Why a decoded clip is unusable, or None if it is fine."""
    if len(x) == 0:
        return "empty: no audio samples in the clip"
    if not np.isfinite(x).all():
        return f"contains NaN or Inf samples ({int((~np.isfinite(x)).sum())} of {len(x)})"
    duration = len(x) / sr
    if duration < min_duration:
        return f"too short: {duration:.3f} s < min_duration {min_duration} s"
    if duration > max_duration:
        return f"too long: {duration:.1f} s > max_duration {max_duration} s"
    # the loudest 50 ms, not the clip's mean: quiet speech between long pauses (a whispered sad
    # take) has a low mean RMS and is still speech; only a clip with no loud moment is silent
    hop = max(1, int(0.05 * sr))
    frames = np.square(x[: len(x) // hop * hop] if len(x) >= hop else x, dtype=np.float64)
    loudest = float(np.sqrt(frames.reshape(-1, min(hop, len(x))).mean(1).max()))
    if loudest < silence_rms:
        return f"silent: loudest 50 ms has RMS {loudest:.1e}, below {silence_rms:.0e}"
    return None


def output_name(clip_id: str) -> str:
    """A file stem for the clip: the clip id itself when it is a safe name, else a readable + hashed one."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", clip_id)
    if safe == clip_id and not clip_id.startswith("."):
        return clip_id
    return f"{safe.lstrip('.')}-{hashlib.sha1(clip_id.encode()).hexdigest()[:8]}"


def _decode_row(row: dict, out_dir: Path, root: Path | None, sr: int, min_duration: float,
                max_duration: float, silence_rms: float) -> tuple[dict | None, dict | None]:
    source = Path(row["path"])
    if root is not None and not source.is_absolute():
        source = root / source
    if source.is_file() and source.stat().st_size > 0:
        reason = too_long_by_header(source, row.get("start"), row.get("end"), max_duration)
        if reason is not None:
            return None, {"clip_id": row["clip_id"], "path": str(source), "reason": reason}
    try:
        x = decode_clip(source, row.get("start"), row.get("end"), sr=sr)
    except DecodeError as e:
        return None, {"clip_id": row["clip_id"], "path": str(source), "reason": str(e)}
    reason = check_clip(x, sr, min_duration, max_duration, silence_rms)
    if reason is not None:
        return None, {"clip_id": row["clip_id"], "path": str(source), "reason": reason}
    target = out_dir / f"{output_name(str(row['clip_id']))}.flac"
    write_audio(target, np.clip(x, -1.0, 1.0), sr, subtype="PCM_16")  # PCM conversion must not wrap
    decoded = dict(row, path=str(target), start=np.nan, end=np.nan, duration=len(x) / sr,
                   source_path=str(row["path"]), source_start=row.get("start"), source_end=row.get("end"))
    return decoded, None


def decode_manifest(manifest_df: pd.DataFrame, out_dir: str | Path, min_duration: float = 0.2,
                    max_duration: float = 30.0, sr: int = SAMPLE_RATE, silence_rms: float = SILENCE_RMS,
                    root: str | Path | None = None, n_jobs: int = 1,
                    progress: bool = True) -> tuple[pd.DataFrame, list[dict]]:
    """Decode every clip to `out_dir/{clip_id}.flac` (16 kHz mono, 16-bit).

    Returns (manifest of the decoded clips, rejections). In the decoded manifest `path` is the new
    file, start/end are empty (the file is the clip), and source_path/source_start/source_end keep
    where it came from. Rejections are dicts clip_id, path, reason for `write_rejections`.
    Relative paths are taken relative to `root` (default: the working directory).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(root) if root is not None else None
    rows = manifest_df.to_dict("records")
    args = (out_dir, root, sr, min_duration, max_duration, silence_rms)
    bar = dict(desc=f"decode -> {out_dir}", unit="clip", disable=not progress, total=len(rows))
    if n_jobs == 1:
        results = [_decode_row(r, *args) for r in tqdm(rows, **bar)]
    else:
        from joblib import Parallel, delayed

        # Threads: libsndfile and soxr do the work in C, and nothing needs to be pickled.
        results = list(tqdm(Parallel(n_jobs=n_jobs, prefer="threads", return_as="generator")(
            delayed(_decode_row)(r, *args) for r in rows), **bar))
    decoded = [d for d, _ in results if d is not None]
    rejections = [r for _, r in results if r is not None]
    columns = list(manifest_df.columns) + [c for c in ("source_path", "source_start", "source_end")
                                           if c not in manifest_df.columns]
    return pd.DataFrame(decoded, columns=columns), rejections
