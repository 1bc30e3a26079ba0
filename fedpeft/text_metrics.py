"""Text overlap metrics shared by the leakage metrics (:mod:`fedpeft.attacks.metrics`) and generation-based
evaluation (:mod:`fedpeft.generation`): ROUGE-N and ROUGE-L F-measures over any token sequences. Pure Python."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def _ngrams(seq: Sequence[int], n: int) -> Counter:
    return Counter(tuple(seq[i:i + n]) for i in range(len(seq) - n + 1))


def rouge_n(candidate: Sequence, reference: Sequence, n: int) -> float:
    """ROUGE-N F-measure (clipped n-gram overlap)."""
    c, r = _ngrams(list(candidate), n), _ngrams(list(reference), n)
    overlap = sum((c & r).values())
    if not c or not r or not overlap:
        return 0.0
    p, rec = overlap / sum(c.values()), overlap / sum(r.values())
    return 2 * p * rec / (p + rec)


def _lcs(a: Sequence, b: Sequence) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Sequence, reference: Sequence) -> float:
    """ROUGE-L F-measure (longest common subsequence)."""
    if not candidate or not reference:
        return 0.0
    lcs = _lcs(list(candidate), list(reference))
    if not lcs:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)
