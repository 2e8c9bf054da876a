"""Clip checks of the manifest stage: every clip a manifest lists can be read, has the length its
annotation says, and is not empty or silent. A clip that fails is left out with its reason
(`{dataset}.rejected.tsv`); one bad clip in ten thousand never stops the run.

Modes: `decode` reads every clip (catches corrupt, empty, NaN and silent audio, and measures the
true length), `header` only reads container headers (fast: missing, unreadable, wrong length),
`none` only checks that the file exists.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import soundfile as sf

from affectlens.data.annotations import rejection
from affectlens.data.decode import (SAMPLE_RATE, SILENCE_RMS, DecodeError, check_clip, check_range, decode_clip,
                                    probe_duration, too_long_by_header, truncation)

MODES = ("decode", "header", "none")


def _num(value) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _video_duration(path: Path, decode: bool) -> float | None:
    """Length of the first video stream; with `decode`, one frame must also decode."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            if decode and next(container.decode(stream), None) is None:
                raise DecodeError(f"{path}: no decodable video frame")
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            return container.duration / av.time_base if container.duration is not None else None
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - any ffmpeg failure is a reason to leave the clip out
        raise DecodeError(f"{path}: not decodable as video ({type(e).__name__}: {e})") from e


def check_row(row: dict, mode: str = "decode", media: str = "audio", min_duration: float = 0.2,
              max_duration: float = 30.0, max_mismatch: float | None = None,
              silence_rms: float = SILENCE_RMS) -> tuple[float | None, str | None]:
    """(measured clip duration, reason it is unusable or None) for one manifest row."""
    path = Path(row["path"])
    if not path.is_file():
        return None, "audio file missing" if media == "audio" else "video file missing"
    if mode == "none":
        return _num(row.get("duration")), None
    if path.stat().st_size == 0:
        return None, f"empty file (0 bytes): {path}"
    start, end = _num(row.get("start")), _num(row.get("end"))
    try:
        if media == "video":
            total = _video_duration(path, decode=mode == "decode")
            duration = None if total is None else (min(end, total) if end is not None else total) - (start or 0.0)
            if start is not None and total is not None and start >= total:
                return None, f"clip starts at {start:.2f} s but the video is {total:.2f} s long"
        elif mode == "decode":
            too_long = too_long_by_header(path, start, end, max_duration)  # never decode hours to reject them
            if too_long is not None:
                return None, too_long
            x = decode_clip(path, start, end, sr=SAMPLE_RATE)
            reason = check_clip(x, SAMPLE_RATE, min_duration, max_duration, silence_rms)
            if reason is not None:
                return None, reason
            duration = len(x) / SAMPLE_RATE
        else:
            try:
                reason = truncation(sf.info(str(path)))
            except Exception:  # noqa: BLE001 - not a libsndfile format: no chunk sizes to compare
                reason = None
            total = probe_duration(path)
            reason = reason or check_range(path, start, end, total)
            if reason is not None:
                return None, reason
            if total is None:
                return _num(row.get("duration")), None
            duration = (min(end, total) if end is not None else total) - (start or 0.0)
    except DecodeError as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001
        return None, f"{path}: not readable ({type(e).__name__}: {e})"
    if duration is not None and media == "audio" and mode == "header":
        if duration <= 0:
            return None, "empty: no audio samples in the clip"
        if duration < min_duration:
            return None, f"too short: {duration:.3f} s < min_duration {min_duration} s"
        if duration > max_duration:
            return None, f"too long: {duration:.1f} s > max_duration {max_duration} s"
    annotated = _num(row.get("annotated_duration"))
    if max_mismatch is not None and annotated is not None and duration is not None \
            and abs(duration - annotated) > max_mismatch:
        return None, (f"mis-cut: the clip is {duration:.2f} s but its annotation spans {annotated:.2f} s "
                      f"(more than {max_mismatch} s apart)")
    return duration, None


def check_clips(manifest: pd.DataFrame, mode: str = "decode", media: str = "audio", min_duration: float = 0.2,
                max_duration: float = 30.0, max_mismatch: float | None = None,
                silence_rms: float = SILENCE_RMS, jobs: int = 1) -> tuple[pd.DataFrame, list[dict]]:
    """(manifest of the usable clips with `duration` measured, rejections with reasons)."""
    if mode not in MODES:
        raise ValueError(f"clip check mode {mode!r} is not one of {MODES}")
    rows = manifest.to_dict("records")
    kwargs = dict(mode=mode, media=media, min_duration=min_duration, max_duration=max_duration,
                  max_mismatch=max_mismatch, silence_rms=silence_rms)
    if jobs > 1 and len(rows) > 1:
        from concurrent.futures import ThreadPoolExecutor

        # Threads: libsndfile, ffmpeg and soxr work outside the GIL.
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda r: check_row(r, **kwargs), rows))
    else:
        results = [check_row(r, **kwargs) for r in rows]
    keep, rejected = [], []
    for i, (row, (duration, reason)) in enumerate(zip(rows, results)):
        if reason is None:
            keep.append(i)
            if duration is not None:
                rows[i]["duration"] = duration
        else:
            origin = row.get("source_clip_id")
            rejected.append(rejection(row["clip_id"], row["path"], reason,
                                      **({} if pd.isna(origin) else {"source_clip_id": origin})))
    out = pd.DataFrame([rows[i] for i in keep], columns=manifest.columns)
    if "duration" in out:
        out["duration"] = pd.to_numeric(out["duration"], errors="coerce").astype(float)
    return out.reset_index(drop=True), rejected

