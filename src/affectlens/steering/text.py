"""Was the content kept? The words of steered audio against the words said."""

from __future__ import annotations

import re

import numpy as np


def transcribe(asr, wave: np.ndarray) -> str:
    """The transcript of one 16 kHz wave by a Whisper adapter (`models.whisper`)."""
    return transcribe_many(asr, [wave])[0]


def transcribe_many(asr, waves: list[np.ndarray], batch_size: int = 8) -> list[str]:
    """Transcripts of 16 kHz waves, decoded up to `batch_size` at a time among waves of one length
    (the decoder's token limit follows a batch's longest clip, so each wave gets what it gets alone:
    a clip's steered outputs all have its length)."""
    from affectlens.models.whisper import transcribe as whisper_transcribe

    out = [""] * len(waves)
    by_length: dict[int, list[int]] = {}
    for i, w in enumerate(waves):
        by_length.setdefault(len(w), []).append(i)
    for rows in by_length.values():
        for k in range(0, len(rows), batch_size):
            chunk = rows[k:k + batch_size]
            texts = whisper_transcribe(asr.model, asr.feature_extractor, asr.tokenizer, [waves[i] for i in chunk])
            for i, t in zip(chunk, texts):
                out[i] = t
    return out


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]+", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER of `hypothesis` against `reference` on lower-cased words without punctuation (NaN for an
    empty reference)."""
    import jiwer

    ref, hyp = _words(reference), _words(hypothesis)
    if not ref:
        return float("nan")
    return float(jiwer.wer(" ".join(ref), " ".join(hyp) if hyp else ""))
