"""Was the content kept? The words of steered audio against the words said."""

from __future__ import annotations

import re

import numpy as np


def transcribe(asr, wave: np.ndarray) -> str:
    """The transcript of one 16 kHz wave by a Whisper adapter (`models.whisper`)."""
    from affectlens.models.whisper import transcribe as whisper_transcribe

    return whisper_transcribe(asr.model, asr.feature_extractor, asr.tokenizer, [wave])[0]


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
