"""Was the voice kept? Speaker similarity of steered audio to its original.

Resemblyzer's GE2E speaker encoder (a 3-layer LSTM trained for speaker verification, weights
shipped in the wheel as pretrained.pt, which loads under torch.load(weights_only=True): a plain
dict of tensors) embeds each utterance into a unit vector; the cosine of two embeddings is ~0.8-1
for one speaker and lower for two. It is independent of the steered model, like the acoustic judge.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def _encoder():
    try:
        from resemblyzer import VoiceEncoder
    except ImportError as e:
        raise ImportError("speaker similarity needs resemblyzer: pip install resemblyzer webrtcvad-wheels "
                          f"(import failed: {e})") from e
    return VoiceEncoder("cpu", verbose=False)


def speaker_embedding(wave: np.ndarray, sr: int) -> np.ndarray:
    """[256] unit speaker embedding of a mono wave (resemblyzer resamples to 16 kHz and trims silence
    with WebRTC VAD; a clip that VAD leaves empty is embedded untrimmed)."""
    from resemblyzer import preprocess_wav

    w = np.asarray(wave, dtype=np.float32)
    pre = preprocess_wav(w, source_sr=sr)
    if len(pre) < 1600:  # VAD removed almost everything: use the whole clip
        import soxr

        pre = soxr.resample(w, sr, 16000) if sr != 16000 else w
    return _encoder().embed_utterance(pre)


def speaker_similarity(wave_a: np.ndarray, wave_b: np.ndarray, sr: int) -> float:
    """Cosine similarity of the two clips' speaker embeddings (1 = same voice)."""
    return speaker_similarities(wave_a, [wave_b], sr)[0]


def speaker_similarities(original: np.ndarray, waves: list[np.ndarray], sr: int) -> list[float]:
    """`speaker_similarity` of each wave to `original`, embedding the original once."""
    a = speaker_embedding(original, sr)
    out = []
    for w in waves:
        b = speaker_embedding(w, sr)
        out.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return out
