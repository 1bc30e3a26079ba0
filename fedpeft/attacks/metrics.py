"""Leakage metrics: bag-of-token precision/recall/F1, positional accuracy, ROUGE-1/2/L, exact
sequence match, a threshold-free ranking score with its chance baseline, canary exposure.

Ground truth enters here and nowhere else in :mod:`fedpeft.attacks`. A padded batch comes with its
attention mask: padding is not private text, so every metric scores the unpadded tokens only (an
exact sequence is the sentence itself, its own length, without padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fedpeft.text_metrics import rouge_l, rouge_n

if TYPE_CHECKING:
    from fedpeft.attacks.observation import AttackResult, Observation


def token_prf(recovered: Sequence[int], truth: Sequence[int]) -> dict[str, float]:
    """Precision / recall / F1 of the recovered *set* of tokens against the true set.

    Both empty counts as perfect (1.0); exactly one empty gives 0.0.
    """
    rec, tru = set(int(t) for t in recovered), set(int(t) for t in truth)
    if not rec and not tru:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    hit = len(rec & tru)
    p = hit / len(rec) if rec else 0.0
    r = hit / len(tru) if tru else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1}


def unpadded(truth: torch.Tensor, mask: torch.Tensor | None = None) -> list[list[int]]:
    """The true sequences as lists of token ids, without the positions where ``mask`` is 0 (padding)."""
    rows = truth.tolist()
    if mask is None:
        return rows
    return [[v for v, m in zip(row, keep) if m] for row, keep in zip(rows, mask.tolist())]


def positional_accuracy(position_hits: Sequence[tuple[int, int]], truth: torch.Tensor,
                        mask: torch.Tensor | None = None) -> float:
    """Fraction of true (position, token) pairs (over the batch, padding left out) that were recovered."""
    keep = torch.ones_like(truth) if mask is None else mask
    true_pairs = {(p, int(v)) for row, m in zip(truth.tolist(), keep.tolist()) for p, (v, k) in
                  enumerate(zip(row, m)) if k}
    return len(true_pairs & {(int(p), int(v)) for p, v in position_hits}) / max(1, len(true_pairs))


def _best_match(sequences: Sequence[Sequence[int]], true_rows: list[list[int]]) -> list[Sequence[int]]:
    """For each true sequence, the recovered sequence with the highest ROUGE-L (empty if none)."""
    return [max(sequences, key=lambda s: rouge_l(s, t), default=[]) for t in true_rows]


def sequence_metrics(sequences: Sequence[Sequence[int]], truth: torch.Tensor,
                     mask: torch.Tensor | None = None) -> dict[str, float]:
    """ROUGE-1/2/L and exact-match rate, each true (unpadded) sequence against its best recovered one."""
    true_rows = unpadded(truth, mask)
    best = _best_match(sequences, true_rows)
    n = max(1, len(true_rows))
    return {"rouge1": sum(rouge_n(b, t, 1) for b, t in zip(best, true_rows)) / n,
            "rouge2": sum(rouge_n(b, t, 2) for b, t in zip(best, true_rows)) / n,
            "rougeL": sum(rouge_l(b, t) for b, t in zip(best, true_rows)) / n,
            "exact": sum(list(b) == t for b, t in zip(best, true_rows)) / n}


def ranking_score(scores: torch.Tensor, truth: Sequence[int]) -> dict[str, float]:
    """Threshold-free: fraction of true tokens among the top-|true| scored tokens, and MRR.

    Chance: |true| / vocab for the top-|true| fraction; the mean reciprocal rank of a random order
    is the mean of 1/rank over uniformly random ranks (≈ ln(V)/V) for comparison.
    """
    tru = sorted(set(int(t) for t in truth))
    vocab = scores.numel()
    if not tru:
        return {"top_true": 0.0, "mrr": 0.0, "chance_top_true": 0.0, "chance_mrr": 0.0}
    order = torch.argsort(scores.flatten().float(), descending=True, stable=True)
    rank = torch.empty(vocab, dtype=torch.long)
    rank[order] = torch.arange(1, vocab + 1)
    top = set(order[: len(tru)].tolist())
    true_ranks = rank[tru].double()
    chance_mrr = sum(1.0 / k for k in range(1, vocab + 1)) / vocab
    return {"top_true": len(top & set(tru)) / len(tru), "mrr": float((1.0 / true_ranks).mean()),
            "chance_top_true": len(tru) / vocab, "chance_mrr": chance_mrr}


def exposure(rank: int, candidates: int) -> float:
    """Canary exposure (Carlini et al.): log2(#candidates) − log2(rank), rank 1 = best."""
    return math.log2(max(1, candidates)) - math.log2(max(1, rank))


def summarize(result: AttackResult, truth: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """All applicable metrics of an :class:`AttackResult` against the true token ids (batch × L);
    ``mask``: the batch's attention mask (0 = padding, left out of every metric)."""
    flat = [v for row in unpadded(truth, mask) for v in row]
    out: dict[str, float] = {"seconds": float(getattr(result, "seconds", 0.0))}
    out.update({f"token_{k}": v for k, v in token_prf(result.bag, flat).items()})
    if result.token_scores is not None:
        out.update(ranking_score(result.token_scores, flat))
    positions = result.extra.get("positions") if hasattr(result, "extra") else None
    if positions:
        out["positional_accuracy"] = positional_accuracy(positions, truth, mask)
    if result.sequences:
        out.update(sequence_metrics(result.sequences, truth, mask))
    return out


def evaluate(obs: Observation, truth: torch.Tensor, names: Sequence[str] | None = None,
             params: dict[str, dict] | None = None, mask: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """Run attacks (default: all registered) on one observation and score each against ``truth``.

    Attacks that do not apply to the observation (:class:`NotApplicable`) are reported as
    ``{"applicable": 0.0}``; every other row has ``applicable = 1.0`` and :func:`summarize`'s metrics.
    """
    from fedpeft.attacks.observation import ATTACKS, NotApplicable, run_attack

    rows: dict[str, dict[str, float]] = {}
    for name in names or ATTACKS.names():
        try:
            result = run_attack(name, obs, **(params or {}).get(name, {}))
        except NotApplicable:
            rows[name] = {"applicable": 0.0}
            continue
        rows[name] = {"applicable": 1.0, **summarize(result, truth, mask)}
    return rows
