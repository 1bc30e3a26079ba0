"""``label_and_canary``: label recovery from a trained classification head (iDLG) and canary exposure.

* Labels. For softmax cross-entropy the head's bias gradient is mean_i (p_i − y_i): the true labels'
  entries are the negative ones (iDLG's sign rule; exact at batch 1). Without a bias the weight rows'
  sums carry the same sign for non-negative features. Counts at batch b assume an untrained head
  (p ≈ 1/C). At batch 1 the pooled feature is G_W[y] / g_b[y] (returned in ``extra``).
* Canaries. An auditor plants canary token sequences; given a ranking (from another attack), each
  canary's rank among all same-length sequences over its alphabet is estimated by sampling, and its
  exposure is log2(#candidates) − log2(rank) (Carlini et al., "The Secret Sharer").
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from fedpeft.attacks.metrics import exposure
from fedpeft.attacks.observation import AttackResult, Observation, register_attack, run_attack

log = logging.getLogger(__name__)
HEAD_KEYS = ("classifier", "score")


def head_gradients(obs: Observation) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias) gradients of the trained head (gradient units), or None where absent."""
    grad = obs.as_gradient()
    weight = bias = None
    for name, t in grad.items():
        if any(f".{k}." in name for k in HEAD_KEYS):
            if name.endswith("bias") and t.dim() == 1:
                bias = t.to(torch.float64)
            elif name.endswith("weight") and t.dim() == 2:
                weight = t.to(torch.float64)
    return weight, bias


def recover_labels(weight: torch.Tensor | None, bias: torch.Tensor | None, batch_size: int) -> list[int]:
    """Labels as a multiset of size ``batch_size`` (sign rule + counts assuming p ≈ 1/C)."""
    g = bias if bias is not None else (weight.sum(1) if weight is not None else None)
    if g is None:
        return []
    if batch_size == 1 or bias is None:
        neg = (g < 0).nonzero().flatten()
        order = neg[torch.argsort(g[neg])].tolist()
        return order[:batch_size] if batch_size > 0 else order
    classes = g.numel()
    frac = torch.clamp(1.0 / classes - g, min=0.0)
    frac = frac / frac.sum().clamp_min(1e-300) * batch_size
    counts = torch.floor(frac).long()
    for c in torch.argsort(frac - counts, descending=True)[: batch_size - int(counts.sum())].tolist():
        counts[c] += 1
    return [c for c in range(classes) for _ in range(int(counts[c]))]


def canary_rank(canary: list[int], token_scores: torch.Tensor, alphabet: list[int], samples: int,
                seed: int, rel_tol: float = 1e-9) -> tuple[int, int]:
    """Estimated rank of ``canary`` (by summed token scores) among all sequences over ``alphabet``.

    The fraction of sampled sequences scoring above the canary, plus half of those tied with it
    (within ``rel_tol``), places the canary at its average rank over ties: a flat ranking puts it in
    the middle ((#candidates + 1) / 2, exposure ≈ 1 bit), not first.
    """
    space = len(alphabet) ** len(canary)
    s = token_scores.to(torch.float64)
    own = float(s[canary].sum())
    g = torch.Generator().manual_seed(seed)
    alpha = torch.tensor(alphabet)
    draws = s[alpha[torch.randint(len(alphabet), (samples, len(canary)), generator=g)]].sum(1)
    tol = rel_tol * max(1.0, abs(own))
    above = float(((draws > own + tol).double() + 0.5 * ((draws - own).abs() <= tol).double()).mean())
    return max(1, int(round(1 + above * (space - 1)))), space


@register_attack("label_and_canary")
def run(obs: Observation, canaries: list[list[int]] | None = None, alphabet: list[int] | None = None,
        ranking: str = "span", samples: int = 20000, seed: int = 0, **_: Any) -> AttackResult:
    """Labels from the head (if trained) and, for planted ``canaries``, their rank and exposure under
    the ``ranking`` attack's token scores (``alphabet``: the canary format's tokens; default: the
    canaries' own tokens)."""
    weight, bias = head_gradients(obs)
    labels = recover_labels(weight, bias, obs.batch_size)
    extra: dict[str, Any] = {"head": weight is not None or bias is not None}
    if obs.batch_size == 1 and labels and weight is not None and bias is not None and float(bias[labels[0]]):
        extra["feature"] = (weight[labels[0]] / bias[labels[0]]).float()
    token_scores = None
    if canaries:
        token_scores = run_attack(ranking, obs).token_scores
        if token_scores is None:
            raise ValueError(f"label_and_canary: the ranking attack {ranking!r} gives no token scores")
        alpha = sorted(set(alphabet or [t for c in canaries for t in c]))
        reports = []
        for i, c in enumerate(canaries):
            rank, space = canary_rank(c, token_scores, alpha, samples, seed + i)
            reports.append({"rank": rank, "candidates": space, "exposure": exposure(rank, space),
                            "max_exposure": math.log2(space)})
        extra["canaries"] = reports
    log.info("label_and_canary: labels %s, %d canaries", labels, len(canaries or []))
    return AttackResult("label_and_canary", token_scores=token_scores, labels=labels, extra=extra)
