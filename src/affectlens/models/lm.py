"""Pieces shared by the adapters of multimodal language models (Qwen2-Audio, Qwen-Omni, Qwen-VL):
the sites of a decoder-only block stack, and the provenance of every position of a prompt in
which audio and video placeholders were expanded into many tokens."""

from __future__ import annotations

import numpy as np

from affectlens.models.positions import Positions


def prompt_positions(input_ids: np.ndarray, attention_mask: np.ndarray, tokens: list[str],
                     placeholders: dict[int, str], times: dict[str, np.ndarray] | None = None,
                     frames: dict[str, np.ndarray] | None = None) -> Positions:
    """The real tokens of one padded prompt. Tokens whose id is in `placeholders` take that kind
    ("audio", "video", "image"); the k-th token of a kind gets `times[kind][k]` and `frames[kind][k]`
    (seconds from the clip's start, video frame), which must have one entry per such token. All
    other tokens are text, with their string."""
    times, frames = times or {}, frames or {}
    index = np.flatnonzero(np.asarray(attention_mask) == 1)
    ids = np.asarray(input_ids)[index]
    kind = np.full(len(index), "text", dtype=object)
    time = np.full(len(index), np.nan)
    frame = np.full(len(index), -1, dtype=np.int64)
    token = np.asarray(tokens, dtype=object)[index] if len(tokens) == len(input_ids) else np.asarray(tokens, dtype=object)
    for token_id, k in placeholders.items():
        rows = np.flatnonzero(ids == token_id)
        if not len(rows):
            continue
        kind[rows] = k
        token[rows] = ""
        for name, source, out in (("times", times, time), ("frames", frames, frame)):
            if k in source:
                values = np.asarray(source[k])
                if len(values) != len(rows):
                    raise ValueError(f"{len(rows)} {k} tokens in the prompt but {len(values)} {name} for them")
                out[rows] = values
    return Positions(index, kind, time, frame, token)
