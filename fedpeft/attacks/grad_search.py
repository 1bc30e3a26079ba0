"""Discrete phase of ``grad_match`` (LAMP-style): improve hard token sequences by local search.

The continuous phase leaves a soft distribution per position; its argmax is a good but not optimal
sequence. Here hard sequences are scored by the same gradient distance (1 − cosine + λ·relative L2², one
forward + backward, no double backward) plus ``prior_weight`` × their mean next-token NLL under a
pretrained causal LM sharing the victim's tokenizer (the language prior: a fluent sentence with the same
gradient is more likely than a scrambled one). Moves: replace one token by one of the tokens proposed for
its position (the top soft candidates, the candidates whose one-hot direction decreases the linearised
distance most, HotFlip-style, and the prior's likely next tokens), swap two positions, move one token
elsewhere; a move is kept when it lowers the score. Sweeps stop early when nothing improves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

Scorer = Callable[[torch.Tensor], float]
Proposer = Callable[[torch.Tensor], torch.Tensor]


def gradient_distance(flat: torch.Tensor, target: torch.Tensor, l2_weight: float) -> torch.Tensor:
    """1 − cosine + ``l2_weight`` × (‖g − g*‖ / ‖g*‖)²: scale-free (cosine) yet magnitude-aware (L2)."""
    rel = (flat - target).norm() / target.norm().clamp_min(1e-30)
    return 1 - F.cosine_similarity(flat, target, dim=0) + l2_weight * rel ** 2


@lru_cache(maxsize=2)
def load_prior(name: str) -> nn.Module:
    """A pretrained causal LM by fedpeft model alias (e.g. ``smollm2-135m``), path or hub name (cached)."""
    from transformers import AutoModelForCausalLM

    from fedpeft.models import PACKAGED_MODELS, model_path

    gguf = PACKAGED_MODELS[name][2] if name in PACKAGED_MODELS else ""
    kwargs = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(model_path(name), dtype=torch.float32, **kwargs)
    return model.eval()


@torch.no_grad()
def prior_nll(prior: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each row of ``ids`` (n × L) under ``prior``: one value per row."""
    logits = prior(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).mean(1)


@torch.no_grad()
def prior_proposals(prior: nn.Module, ids: torch.Tensor, width: int, vocab: int) -> torch.Tensor:
    """The prior's ``width`` most likely tokens at each position given the current prefix (B × L × width;
    position 0 keeps its token): plausible words the span ranking may have missed."""
    logits = prior(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1, :vocab]
    top = torch.topk(logits, width, dim=-1).indices
    return torch.cat([ids[:, :1, None].expand(-1, 1, width), top], 1)


def batch_prior(prior: nn.Module | None, variants: list[torch.Tensor]) -> list[float]:
    """Prior term of each candidate batch (mean over its rows), one batched forward; zeros without a prior."""
    if prior is None:
        return [0.0] * len(variants)
    rows = torch.cat(variants)
    per_row = prior_nll(prior, rows).view(len(variants), -1)
    return per_row.mean(1).tolist()


def local_search(seqs: torch.Tensor, propose: Proposer, grad_score: Scorer, prior: nn.Module | None,
                 prior_weight: float, sweeps: int, reorders: int, seed: int) -> tuple[torch.Tensor, float, int]:
    """Greedy search over hard batches ``seqs`` (B × L token ids).

    ``propose(best)`` (B × L × w): the tokens tried at each position in the next sweep. Returns the
    best batch, its score and the number of batches scored.
    """
    g = torch.Generator().manual_seed(seed)
    weight = prior_weight if prior is not None else 0.0

    def score_all(variants: list[torch.Tensor]) -> list[float]:
        priors = batch_prior(prior, variants) if weight else [0.0] * len(variants)
        return [grad_score(v) + weight * p for v, p in zip(variants, priors)]

    best = seqs.clone()
    best_score = score_all([best])[0]
    evaluated = 1
    b, length = best.shape
    for _ in range(sweeps):
        improved = False
        options = propose(best)
        for row in range(b):
            for pos in range(length):
                variants = []
                for tok in dict.fromkeys(options[row, pos].tolist()):
                    if tok != int(best[row, pos]):
                        v = best.clone()
                        v[row, pos] = tok
                        variants.append(v)
                if not variants:
                    continue
                scores = score_all(variants)
                evaluated += len(variants)
                i = min(range(len(scores)), key=scores.__getitem__)
                if scores[i] < best_score:
                    best, best_score, improved = variants[i], scores[i], True
        variants = []
        for _ in range(reorders):  # swap two positions or move one token (LAMP's reorderings)
            row = int(torch.randint(b, (1,), generator=g))
            i, j = torch.randint(length, (2,), generator=g).tolist()
            if i == j:
                continue
            v = best.clone()
            if torch.rand(1, generator=g).item() < 0.5:
                v[row, i], v[row, j] = best[row, j], best[row, i]
            else:
                tok = best[row, i]
                rest = torch.cat([best[row, :i], best[row, i + 1:]])
                v[row] = torch.cat([rest[:j], tok.view(1), rest[j:]])
            variants.append(v)
        if variants:
            scores = score_all(variants)
            evaluated += len(variants)
            i = min(range(len(scores)), key=scores.__getitem__)
            if scores[i] < best_score:
                best, best_score, improved = variants[i], scores[i], True
        if not improved:
            break
    return best, best_score, evaluated
