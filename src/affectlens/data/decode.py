"""Decoding: any clip in a manifest -> 16 kHz mono FLAC, with unusable clips rejected, not fatal.

One bad file in ten thousand must not stop a run: `decode_manifest` writes every clip it can and
lists the others, each with its reason, for `rejected.tsv`.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import soxr
from tqdm import tqdm

from affectlens.data.manifest import safe_clip_id
from affectlens.io import write_audio

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
SILENCE_RMS = 1e-3  # -60 dBFS: below this a clip holds no usable signal
END_SLACK = 0.05  # seconds an annotated end may pass the file's end (rounding) before the row is refused
OVER_RANGE = ("normalise", "reject")  # what becomes of float audio peaking above full scale
# libsndfile's header log of a WAV/AIFF whose data chunk claims more bytes than the file holds
_SHORT_CHUNK = re.compile(r"^\s*(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)


class DecodeError(RuntimeError):
    """A clip that cannot be turned into audio; the message names the file and why."""


def _seconds(value) -> float | None:
    # Manifests leave start/end empty (NaN) for "whole file".
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def truncation(info) -> str | None:
    """Why a file is truncated by its libsndfile header log (a data chunk shorter than the header
    says: a copy or download cut off), or None. Streaming writers' placeholder sizes do not count."""
    m = _SHORT_CHUNK.search(getattr(info, "extra_info", "") or "")
    if m is None:
        return None
    declared, actual = int(m[2]), int(m[3])
    if actual >= declared or declared >= 0xFFFFFFF0:
        return None
    return (f"truncated: the header says the {m[1]} chunk holds {declared} bytes but the file holds "
            f"{actual} ({100 * actual / declared:.0f}%); re-copy the file")


def check_range(path, start: float | None, end: float | None, total: float | None) -> str | None:
    """Why `start`/`end` (seconds) do not lie within a file of `total` seconds (None = unknown), or None."""
    if start is not None and start < 0:
        return f"clip start {start} s is negative; fix the row's start"
    if end is not None and end <= 0:
        return f"clip end {end} s is not after the start of the file; fix the row's end"
    if start is not None and end is not None and end <= start:
        return f"clip end {end} s is not after start {start} s; fix the row"
    if total is not None and start is not None and start >= total:
        return f"clip starts at {start:.2f} s but {Path(path).name} is {total:.2f} s long; fix the row's start"
    if total is not None and end is not None and end > total + END_SLACK:
        return f"clip ends at {end:.2f} s but {Path(path).name} is {total:.2f} s long; fix the row's end"
    return None


def _read_soundfile(path: Path, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    info = sf.info(str(path))
    reason = truncation(info) or check_range(path, start, end, info.frames / info.samplerate)
    if reason is not None:
        raise DecodeError(f"{path}: {reason}")
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


def _check_decoded_length(path: Path, x: np.ndarray, native_sr: int, start: float | None, end: float | None) -> None:
    """After a fallback reader: the clip must be as long as the row (and the header, where libsndfile
    can read one: a FLAC cut off in the middle decodes only up to the cut) says."""
    try:
        info = sf.info(str(path))
        total = info.frames / info.samplerate if info.frames > 0 else None
    except Exception:  # noqa: BLE001 - no header libsndfile reads: only the row's end to compare with
        total = None
    stop = end if total is None else (total if end is None else min(end, total))
    got = (start or 0.0) + len(x) / native_sr
    if stop is not None and got < stop - END_SLACK:
        what = "the header says the file is" if end is None or (total is not None and total < end) else \
            "the clip ends at"
        raise DecodeError(f"{path}: truncated or mis-cut: {what} {stop:.2f} s but the audio ends at {got:.2f} s")


def decode_clip(path: str | Path, start: float | None = None, end: float | None = None,
                sr: int = SAMPLE_RATE) -> np.ndarray:
    """[sample] float32 mono at `sr` for `path` between `start` and `end` seconds (None = file edge).

    soundfile (libsndfile: wav, flac, ogg, mp3, ...) first; PyAV (the ffmpeg libraries bundled in
    its wheels: mp4/m4a/mkv/webm video and audio, aac, opus, ...) for the rest; audioread only
    where PyAV is not installed.
    """
    path = Path(path)
    start, end = _seconds(start), _seconds(end)
    reason = check_range(path, start, end, None)
    if reason is not None:
        raise DecodeError(f"{path}: {reason}")
    if not path.is_file():
        raise DecodeError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DecodeError(f"{path}: empty file (0 bytes)")
    try:
        x, native_sr = _read_soundfile(path, start, end)
    except DecodeError:
        raise
    except Exception as sf_error:  # noqa: BLE001 - any libsndfile failure means "try the fallback"
        fallback, reader = ("PyAV", _read_av) if _has_av() else ("audioread", _read_audioread)
        try:
            x, native_sr = reader(path, start, end)
        except Exception as fallback_error:  # noqa: BLE001
            raise DecodeError(f"{path}: not decodable as audio (soundfile: {sf_error}; "
                              f"{fallback}: {type(fallback_error).__name__}: {fallback_error})"
                              + ("" if fallback == "PyAV" else "; for mp4/m4a/opus sources `pip install av`")
                              ) from fallback_error
        _check_decoded_length(path, x, native_sr, start, end)
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
    """A file stem for the clip: the clip id itself (validated manifests hold only safe ids), else a
    readable + hashed one (affectlens.data.manifest.safe_clip_id)."""
    return safe_clip_id(clip_id)


def over_range(x: np.ndarray, mode: str = "normalise") -> tuple[np.ndarray, str | None]:
    """(audio within [-1, 1], note or None). Float audio peaking above full scale is scaled down
    to a peak of 1 (a note says by how much), never clipped to a square wave; with mode "reject"
    the note is returned as the reason to refuse the clip (and the audio unchanged)."""
    if mode not in OVER_RANGE:
        raise ValueError(f"over_range {mode!r} is not one of {OVER_RANGE}")
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    if peak <= 1.0:
        return x, None
    note = f"over range: peak {peak:.3g} ({20 * math.log10(peak):+.1f} dBFS)"
    if mode == "reject":
        return x, f"{note}; refused (over_range: reject)"
    return (x / peak).astype(np.float32), f"{note}, peak-normalised to 0 dBFS"


def _rejection(row: dict, source: Path, reason: str) -> dict:
    origin = row.get("source_clip_id")
    return {"clip_id": row["clip_id"], "path": str(source), "reason": reason,
            **({} if pd.isna(origin) else {"source_clip_id": origin})}


def _decode_row(row: dict, out_dir: Path, root: Path | None, sr: int, min_duration: float,
                max_duration: float, silence_rms: float,
                over_range_mode: str = "normalise") -> tuple[dict | None, dict | None]:
    source = Path(row["path"])
    if root is not None and not source.is_absolute():
        source = root / source
    if source.is_file() and source.stat().st_size > 0:
        reason = too_long_by_header(source, row.get("start"), row.get("end"), max_duration)
        if reason is not None:
            return None, _rejection(row, source, reason)
    try:
        x = decode_clip(source, row.get("start"), row.get("end"), sr=sr)
    except DecodeError as e:
        return None, _rejection(row, source, str(e))
    reason = check_clip(x, sr, min_duration, max_duration, silence_rms)
    if reason is not None:
        return None, _rejection(row, source, reason)
    x, note = over_range(x, over_range_mode)
    if note is not None and over_range_mode == "reject":
        return None, _rejection(row, source, note)
    if note is not None:
        log.warning("%s (%s): %s", row["clip_id"], source, note)
    target = out_dir / f"{output_name(str(row['clip_id']))}.flac"
    write_audio(target, np.clip(x, -1.0, 1.0), sr, subtype="PCM_16")  # PCM conversion must not wrap
    decoded = dict(row, path=str(target), start=np.nan, end=np.nan, duration=len(x) / sr,
                   source_path=str(row["path"]), source_start=row.get("start"), source_end=row.get("end"),
                   decode_note=note or "")
    return decoded, None


def decode_manifest(manifest_df: pd.DataFrame, out_dir: str | Path, min_duration: float = 0.2,
                    max_duration: float = 30.0, sr: int = SAMPLE_RATE, silence_rms: float = SILENCE_RMS,
                    root: str | Path | None = None, n_jobs: int = 1, progress: bool = True,
                    over_range_mode: str = "normalise") -> tuple[pd.DataFrame, list[dict]]:
    """Decode every clip to `out_dir/{clip_id}.flac` (16 kHz mono, 16-bit).

    Returns (manifest of the decoded clips, rejections). In the decoded manifest `path` is the new
    file, start/end are empty (the file is the clip), and source_path/source_start/source_end keep
    where it came from; decode_note says what was done to a clip (over-range audio peak-normalised,
    see `over_range`; `over_range_mode="reject"` refuses such clips instead). Rejections are dicts
    clip_id, path, reason for `write_rejections`.
    Relative paths are taken relative to `root` (default: the working directory).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(root) if root is not None else None
    rows = manifest_df.to_dict("records")
    if over_range_mode not in OVER_RANGE:
        raise ValueError(f"over_range {over_range_mode!r} is not one of {OVER_RANGE}")
    args = (out_dir, root, sr, min_duration, max_duration, silence_rms, over_range_mode)
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
    columns = list(manifest_df.columns) + [c for c in ("source_path", "source_start", "source_end", "decode_note")
                                           if c not in manifest_df.columns]
    return pd.DataFrame(decoded, columns=columns), rejections
