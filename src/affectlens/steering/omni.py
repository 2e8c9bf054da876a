"""Compare a steered Qwen-Omni answer with the unsteered one (the generation itself is
`affectlens.models.omni_generate`: generate_answer, generate_speech)."""

from __future__ import annotations

from collections import Counter

import numpy as np


def _edit_distance(a: list, b: list) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def token_similarity(a: list[int], b: list[int]) -> float:
    """1 - (token edit distance) / (longer length): 1 for identical answers (two empty ones too),
    0 when no token can be kept in place."""
    if not a and not b:
        return 1.0
    return 1.0 - _edit_distance(list(a), list(b)) / max(len(a), len(b))


def chrf(hypothesis: str, reference: str, max_n: int = 6, beta: float = 2.0) -> float:
    """chrF (Popović 2015) in [0, 1]: the character n-gram F-beta score (recall weighted beta times
    as much as precision), precision and recall averaged over n = 1..max_n; whitespace is removed
    first. Orders that neither string is long enough for are left out; 1 for two equal strings."""
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    if hyp == ref:
        return 1.0
    precisions, recalls = [], []
    for n in range(1, max_n + 1):
        h = Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        if not h and not r:
            continue
        common = sum((h & r).values())
        precisions.append(common / sum(h.values()) if h else 0.0)
        recalls.append(common / sum(r.values()) if r else 0.0)
    p, r = float(np.mean(precisions)), float(np.mean(recalls))
    return 0.0 if p + r == 0 else (1 + beta**2) * p * r / (beta**2 * p + r)
