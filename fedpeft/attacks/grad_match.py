"""``grad_match``: TAG/LAMP-style optimisation attack for any adapter (LoRA, prompt, prefix).

Two phases, both scored by the gradient distance (1 − cosine) + λ·relative L2² between the adapter
gradient of a guessed batch and the observed update (a delta is compared in gradient units,
−delta / (lr·steps)):

1. Continuous (TAG, LAMP): optimise soft token distributions Z (batch × L × C, softmax over C
   candidate tokens); the soft input is probs @ E, its causal-LM loss against its own soft next
   tokens (or the classification loss against the iDLG labels) is differentiated w.r.t. the
   trainable parameters with ``create_graph``. Candidates are the top of the span / subspace ranking
   (the edge over plain TAG on LoRA: the first-block LoRA gradient nearly names the tokens) or the
   whole vocabulary; Z starts from the ranking's (position) scores. Early stop on a plateau.
2. Discrete (LAMP): local search over hard sequences — per-position replacements among the top soft
   candidates (and, with a prior, the prior's likely next tokens), swaps and moves — scored by the same
   distance plus ``prior_weight`` × the mean NLL under a pretrained causal LM (``prior``: a model alias
   such as ``smollm2-135m`` or a loaded model sharing the victim's tokenizer). See
   :mod:`fedpeft.attacks.grad_search`.

``lm_weight`` > 0 adds a soft LM term to phase 1 (``lm_model="global"``: the matched loss itself,
``"base"``: the frozen base model). Measured numbers: ``docs/audit.md``, ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedpeft.attacks.grad_search import gradient_distance, load_prior, local_search, prior_proposals
from fedpeft.attacks.observation import AttackResult, NotApplicable, Observation, register_attack, run_attack

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def _soft_loss(model: torch.nn.Module, probs: torch.Tensor, emb: torch.Tensor, cand: torch.Tensor,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of the soft sequence against its own (soft) next tokens, or the
    classification loss against ``labels`` (recovered from the head by iDLG)."""
    x = probs @ emb  # b × L × d
    logits = model(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long)).logits
    if labels is not None:
        return F.cross_entropy(logits, labels)
    logits = logits[:, -probs.shape[1]:]  # prompt tuning prepends virtual-token positions
    logp = torch.log_softmax(logits[:, :-1], -1)[..., cand]
    return -(probs[:, 1:] * logp).sum(-1).mean()


def candidate_tokens(obs: Observation, candidates: str, top_k: int, vocab: int,
                     layers: str = "first") -> tuple[torch.Tensor, torch.Tensor | None]:
    """All token ids, or ``top_k`` of the span / subspace_opt ranking (span over ``layers``, see
    :func:`fedpeft.attacks.span.run`), with the ranking's scores of the candidates (positions × C; one
    position for position-free models), None for "all". A learned-position ranking contributes the best
    tokens of every position in turn (each position's 1st, then 2nd, ...) rather than the best over all
    positions: a position that holds B tokens is not crowded out by a token that fits some other position."""
    if candidates == "all":
        return torch.arange(vocab), None
    if candidates not in ("span", "subspace"):
        raise ValueError(f"grad_match candidates must be 'all', 'span' or 'subspace', got {candidates!r}")
    ranking = run_attack("span", obs, layers=layers) if candidates == "span" else run_attack("subspace_opt", obs)
    assert ranking.token_scores is not None  # both rank every token
    k = min(top_k, vocab)
    if ranking.position_scores is None:
        cand = torch.topk(ranking.token_scores, k).indices
    else:
        order = torch.argsort(ranking.position_scores, dim=-1, descending=True)[:, :k].T.flatten()
        cand = torch.tensor(list(dict.fromkeys(order.tolist()))[:k])
    cand = cand.sort().values
    scores = ranking.position_scores if ranking.position_scores is not None else ranking.token_scores[None]
    return cand, scores[:, cand].float()


def initial_logits(scores: torch.Tensor | None, shape: tuple[int, int, int], init_scale: float,
                   seed: int) -> torch.Tensor:
    """Z at the start: the ranking's scores standardised per position × ``init_scale`` (positions past
    the ranking's reuse its last row), plus small noise. Batch row b starts from the b-th best token of
    each position (the best b are pushed to the bottom), so that the rows do not all start alike."""
    g = torch.Generator().manual_seed(seed)
    z = 0.01 * torch.randn(shape, generator=g)
    if scores is None or not init_scale:
        return z
    s = (scores - scores.mean(-1, keepdim=True)) / scores.std(-1, keepdim=True).clamp_min(1e-12)
    s = s[torch.arange(shape[1]).clamp(max=s.shape[0] - 1)]
    order = torch.argsort(s, dim=-1, descending=True)
    rows = []
    for b in range(shape[0]):
        row = s.clone()
        row.scatter_(-1, order[:, :b], float(s.min()))
        rows.append(row)
    return z + init_scale * torch.stack(rows)


def lm_prior(model: PeftModel, probs: torch.Tensor, emb: torch.Tensor, cand: torch.Tensor,
             matched_loss: torch.Tensor, lm_model: str) -> torch.Tensor:
    """NLL of the soft sequence under the prior LM ("global": the matched loss; "base": adapter off)."""
    if lm_model == "global":
        return matched_loss
    if lm_model != "base":
        raise ValueError(f"grad_match lm_model must be 'global' or 'base', got {lm_model!r}")
    with model.disable_adapter():
        return _soft_loss(model, probs, emb, cand)


def _prior_model(prior: str | nn.Module | None, vocab: int) -> nn.Module | None:
    """The prior LM (loaded by name where a name is given); refuses one with a smaller vocabulary."""
    if prior is None:
        return None
    model = prior if isinstance(prior, nn.Module) else load_prior(prior)
    embeddings = cast("nn.Embedding", cast("PreTrainedModel", model).get_input_embeddings())
    if embeddings.num_embeddings < vocab:
        raise ValueError("grad_match prior: its vocabulary is smaller than the victim's (it must share the tokenizer)")
    return model


@register_attack("grad_match")
def run(obs: Observation, iterations: int = 100, lr: float = 0.1, candidates: str = "span", top_k: int = 64,
        l2_weight: float = 0.1, temperature: float = 1.0, seed: int = 0, lm_weight: float = 0.0,
        lm_model: str = "global", init_scale: float = 3.0, patience: int = 25, sweeps: int = 3, width: int = 4,
        reorders: int = 16, prior: str | nn.Module | None = None, prior_weight: float = 0.05,
        lm_proposals: bool = True, span_layers: str = "first", **_unused: Any) -> AttackResult:
    """Gradient matching: continuous phase (``iterations``, early stop after ``patience`` iterations
    without improvement) over ``candidates`` ("span" default, falls back to "all" where no span attack
    applies, "subspace", "all"), then ``sweeps`` of discrete search (``width`` tokens per position,
    ``reorders`` swap/move tries per sweep; 0 sweeps = argmax only) with an optional LM ``prior``, which
    also proposes its most likely next tokens as replacements (``lm_proposals``). ``span_layers``: the span
    ranking's layers ("all": every LoRA layer's dL/dA rows, "first": the first block's).
    ``lm_weight`` > 0 adds the soft LM term (causal LMs only)."""
    if lm_weight and obs.task != "causal_lm":
        raise ValueError(f"grad_match lm_weight needs a causal LM, the task is {obs.task!r}")
    model = obs.working_model(torch.float32)
    emb_all = model.get_input_embeddings().weight.detach()
    vocab = emb_all.shape[0]
    try:
        cand, scores = candidate_tokens(obs, candidates, top_k, vocab, span_layers)
    except NotApplicable:
        cand, scores = candidate_tokens(obs, "all", top_k, vocab)
    emb = emb_all[cand]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    target_state = obs.as_gradient()
    target = torch.cat([target_state[n].to(torch.float32).flatten() for n in names])
    labels = None
    if obs.task == "classification":
        from fedpeft.attacks.label_and_canary import head_gradients, recover_labels

        found = recover_labels(*head_gradients(obs), obs.batch_size)
        labels = torch.tensor(found if len(found) == obs.batch_size else [0] * obs.batch_size)
    z = initial_logits(scores, (obs.batch_size, obs.seq_len, cand.numel()), init_scale, seed).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    best, best_z, since, done = float("inf"), z.detach().clone(), 0, 0
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # the math kernel has a double backward
        while done < iterations:
            done += 1
            probs = torch.softmax(z / temperature, -1)
            loss = _soft_loss(model, probs, emb, cand, labels)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            obj = gradient_distance(torch.cat([gr.flatten() for gr in grads]), target, l2_weight)
            if lm_weight:
                obj = obj + lm_weight * lm_prior(model, probs, emb, cand, loss, lm_model)
            since += 1
            if float(obj.detach()) < best * (1 - 1e-4):  # the objective of the current z (before this step)
                best, best_z, since = float(obj.detach()), z.detach().clone(), 0
            if since >= patience:
                break
            opt.zero_grad()
            obj.backward()
            opt.step()
    probs = torch.softmax(best_z / temperature, -1)

    every = torch.arange(vocab)

    def distance(onehot: torch.Tensor, create_graph: bool) -> torch.Tensor:
        grads = torch.autograd.grad(_soft_loss(model, onehot, emb_all, every, labels), params,
                                    create_graph=create_graph)
        return gradient_distance(torch.cat([gr.flatten() for gr in grads]), target, l2_weight)

    def grad_score(ids: torch.Tensor) -> float:
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            return float(distance(F.one_hot(ids, vocab).to(emb.dtype), False))

    soft_top = cand[torch.topk(probs, min(width, cand.numel()), dim=-1).indices]

    def propose(ids: torch.Tensor) -> torch.Tensor:
        """The top soft candidates and the ``width`` candidates that decrease the linearised distance
        most (gradient w.r.t. the one-hot input, HotFlip-style). Proposals from outside the candidate
        set lowered the distance but hurt the bag at batch 2 (benchmarks/bench_grad_match.py)."""
        onehot = F.one_hot(ids, vocab).to(emb.dtype).requires_grad_(True)
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            (g,) = torch.autograd.grad(distance(onehot, True), onehot)
        flips = cand[torch.topk(-g[..., cand], min(width, cand.numel()), dim=-1).indices]
        if prior_lm is None or not lm_proposals:
            return torch.cat([soft_top, flips], -1)
        return torch.cat([soft_top, flips, prior_proposals(prior_lm, ids, width, vocab)], -1)

    seqs = cand[probs.argmax(-1)]
    searched, score = seqs, float("nan")
    prior_lm = _prior_model(prior, vocab) if sweeps > 0 and prior_weight and obs.task == "causal_lm" else None
    if sweeps > 0:
        searched, score, evaluated = local_search(seqs, propose, grad_score, prior_lm, prior_weight, sweeps,
                                                  reorders, seed)
        log.info("grad_match: discrete search scored %d batches, score %.4f", evaluated, score)
    out = searched.tolist()
    bag = sorted({t for s in out for t in s})
    token_scores = torch.zeros(vocab)
    token_scores[cand] = probs.amax(dim=(0, 1)) + 1e-6  # candidates above every non-candidate
    token_scores[bag] += 1.0  # the recovered tokens first
    log.info("grad_match: %d/%d iterations over %d candidates, objective %.4f", done, iterations, cand.numel(), best)
    return AttackResult("grad_match", token_scores=token_scores, bag=bag, sequences=out,
                        extra={"objective": best, "search_score": score, "iterations": done,
                               "candidates": candidates, "num_candidates": cand.numel(), "lm_weight": lm_weight,
                               "positions": [(p, v) for s in out for p, v in enumerate(s)]})
