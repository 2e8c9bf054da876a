"""What PMEmo and DEAM share: songs with static valence/arousal and 2 Hz dynamic annotations.

Labels. Probes need classes, so continuous ratings become one of:
    quadrant: HVHA, HVLA, LVHA, LVLA (high/low valence x high/low arousal)
    valence:  high_valence, low_valence
    arousal:  high_arousal, low_arousal
split at the midpoint of the dataset's rating scale (a rating on the midpoint counts as high).
The ratings themselves stay in the manifest as `valence` and `arousal`.

Segments. With `segment_s`, each song becomes consecutive windows of that length over the span
its dynamic annotation covers, each labelled by the mean of the dynamic ratings inside it; the
song's static ratings stay as `song_valence`, `song_arousal`.

Dynamic ratings. `clip_ratings` keeps the 2 Hz curves themselves for the clips of a manifest, as
one tidy table (RATING_COLUMNS): a time-resolved probe regresses frame bins on them. Times are
seconds from the clip's own start (a segment's ratings are those inside it, re-based), values on
the dataset's own scale, which the `scale` column states.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LABELS = ("quadrant", "valence", "arousal")
RATING_COLUMNS = ("clip_id", "song", "time_s", "valence", "arousal", "scale")


def va_label(valence: float, arousal: float, midpoint: float, kind: str) -> str:
    hv, ha = valence >= midpoint, arousal >= midpoint
    if kind == "quadrant":
        return f"{'H' if hv else 'L'}V{'H' if ha else 'L'}A"
    if kind == "valence":
        return "high_valence" if hv else "low_valence"
    if kind == "arousal":
        return "high_arousal" if ha else "low_arousal"
    raise ValueError(f"label {kind!r} is not one of {LABELS}")


def label_names(kind: str) -> tuple[str, ...]:
    """Every label `va_label` gives for this kind of label."""
    return tuple(sorted({va_label(v, a, 0.5, kind) for v in (0.0, 1.0) for a in (0.0, 1.0)}))


def segments(song_rows: pd.DataFrame, dynamic: dict[str, pd.DataFrame], segment_s: float,
             dynamic_midpoint: float, kind: str) -> tuple[list[dict], list[str]]:
    """Cut song-level rows into windows labelled by their dynamic annotation.

    `dynamic[song_key]`: rows time (s), valence, arousal. Returns (window rows, song keys that have
    no dynamic annotation). A trailing window shorter than segment_s is dropped.
    """
    out, missing = [], []
    for row in song_rows.to_dict("records"):
        dyn = dynamic.get(row["song_key"])
        if dyn is None or dyn.empty:
            missing.append(row["song_key"])
            continue
        t = dyn["time"].to_numpy(float)
        step = float(np.median(np.diff(t))) if len(t) > 1 else 0.5
        lo, hi = float(t.min()), float(t.max()) + step
        n = int(np.floor((hi - lo) / segment_s + 1e-9))
        for k in range(n):
            a, b = lo + k * segment_s, lo + (k + 1) * segment_s
            inside = (t >= a - 1e-9) & (t < b - 1e-9)
            v = float(dyn["valence"].to_numpy(float)[inside].mean())
            ar = float(dyn["arousal"].to_numpy(float)[inside].mean())
            seg = dict(row)
            seg.update({
                "clip_id": f"{row['clip_id']}_{int(round(a * 1000)):06d}ms",
                "start": a, "end": b, "duration": segment_s, "annotated_duration": np.nan,
                "label": va_label(v, ar, dynamic_midpoint, kind), "valence": v, "arousal": ar,
                "song_valence": row["valence"], "song_arousal": row["arousal"],
            })
            out.append(seg)
    return out, missing


def song_key(value) -> str:
    """A song id as the annotation tables spell it: "12", whether the manifest TSV read it as 12 or 12.0."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def clip_ratings(manifest: pd.DataFrame, dynamic: dict, song_column: str, scale: str,
                 key=song_key) -> tuple[pd.DataFrame, list[str]]:
    """The dynamic ratings of every manifest clip: (table RATING_COLUMNS, clip ids without any).

    `dynamic[key(song)]`: rows time (s from the song's audio start), valence, arousal; the song of a
    clip is its `song_column`. A clip with `start`/`end` (a segment) gets the ratings in
    [start, end), with time_s counted from `start`; a whole clip (empty start) keeps every rating."""
    for col in ("clip_id", song_column):
        if col not in manifest.columns:
            raise KeyError(f"manifest has no column {col!r} to find each clip's dynamic ratings by; "
                           f"its columns are {list(manifest.columns)}")
    start = manifest["start"] if "start" in manifest.columns else pd.Series(np.nan, index=manifest.index)
    end = manifest["end"] if "end" in manifest.columns else pd.Series(np.nan, index=manifest.index)
    frames, missing = [], []
    for clip_id, song, a, b in zip(manifest["clip_id"].astype(str), manifest[song_column], start, end):
        dyn = dynamic.get(key(song))
        t = np.empty(0) if dyn is None else dyn["time"].to_numpy(float)
        a = 0.0 if pd.isna(a) else float(a)
        keep = t >= a - 1e-9
        if not pd.isna(b):
            keep &= t < float(b) - 1e-9
        if not keep.any():
            missing.append(clip_id)
            continue
        frames.append(pd.DataFrame({"clip_id": clip_id, "song": str(key(song)), "time_s": np.round(t[keep] - a, 6),
                                    "valence": dyn["valence"].to_numpy(float)[keep],
                                    "arousal": dyn["arousal"].to_numpy(float)[keep], "scale": scale}))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(RATING_COLUMNS))
    return table[list(RATING_COLUMNS)], missing
