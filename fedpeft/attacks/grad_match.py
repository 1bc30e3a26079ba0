"""``grad_match``: TAG/LAMP-style optimisation attack for any adapter (LoRA, prompt, prefix).

Optimise soft token distributions Z (batch × L × C, softmax over C candidate tokens) so that the
adapter gradient they induce — the causal-LM loss of the soft input against its own soft next
tokens, differentiated w.r.t. the trainable parameters with ``create_graph`` — matches the observed
update: (1 − cosine) + λ·relative L2. A delta is compared in gradient units (−delta / (lr·steps)).
Candidates are the whole vocabulary or the top of the span / subspace ranking. The result is the
argmax sequence per position and a per-token score (max probability over positions).

LM prior (LAMP): with ``lm_weight`` > 0 the objective adds lm_weight × the mean next-token NLL of
the soft sequence under a causal LM: ``lm_model="global"`` the model with the global adapter (the
matched loss itself, no extra forward), ``"base"`` the frozen base model (adapter disabled). On the
random-weight tiny models the prior encodes no language; measured numbers: ``docs/audit.md``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedpeft.attacks.observation import AttackResult, Observation, register_attack, run_attack

if TYPE_CHECKING:
    from peft import PeftModel

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


def candidate_tokens(obs: Observation, candidates: str, top_k: int, vocab: int) -> torch.Tensor:
    """All token ids, or the ``top_k`` of the span / subspace_opt ranking."""
    if candidates == "all":
        return torch.arange(vocab)
    ranking = run_attack("span" if candidates == "span" else "subspace_opt", obs).token_scores
    assert ranking is not None  # both rank every token
    return torch.topk(ranking, min(top_k, vocab)).indices.sort().values


def lm_prior(model: PeftModel, probs: torch.Tensor, emb: torch.Tensor, cand: torch.Tensor,
             matched_loss: torch.Tensor, lm_model: str) -> torch.Tensor:
    """NLL of the soft sequence under the prior LM ("global": the matched loss; "base": adapter off)."""
    if lm_model == "global":
        return matched_loss
    if lm_model != "base":
        raise ValueError(f"grad_match lm_model must be 'global' or 'base', got {lm_model!r}")
    with model.disable_adapter():
        return _soft_loss(model, probs, emb, cand)


@register_attack("grad_match")
def run(obs: Observation, iterations: int = 60, lr: float = 0.1, candidates: str = "all", top_k: int = 64,
        l2_weight: float = 0.1, temperature: float = 1.0, seed: int = 0, lm_weight: float = 0.0,
        lm_model: str = "global", **_unused: Any) -> AttackResult:
    """Gradient matching over soft tokens; ``candidates`` = "all", "span" or "subspace"; ``lm_weight``
    > 0 adds the LM prior (causal LMs only)."""
    if lm_weight and obs.task != "causal_lm":
        raise ValueError(f"grad_match lm_weight needs a causal LM, the task is {obs.task!r}")
    model = obs.working_model(torch.float32)
    emb_all = model.get_input_embeddings().weight.detach()
    vocab = emb_all.shape[0]
    cand = candidate_tokens(obs, candidates, top_k, vocab)
    emb = emb_all[cand]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    target_state = obs.as_gradient()
    target = torch.cat([target_state[n].to(torch.float32).flatten() for n in names])
    tnorm = target.norm().clamp_min(1e-30)
    labels = None
    if obs.task == "classification":
        from fedpeft.attacks.label_and_canary import head_gradients, recover_labels

        found = recover_labels(*head_gradients(obs), obs.batch_size)
        labels = torch.tensor(found if len(found) == obs.batch_size else [0] * obs.batch_size)
    g = torch.Generator().manual_seed(seed)
    z = (0.01 * torch.randn((obs.batch_size, obs.seq_len, cand.numel()), generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    best, best_z = float("inf"), z.detach().clone()
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # the math kernel has a double backward
        for _ in range(iterations):
            probs = torch.softmax(z / temperature, -1)
            loss = _soft_loss(model, probs, emb, cand, labels)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            flat = torch.cat([gr.flatten() for gr in grads])
            obj = 1 - F.cosine_similarity(flat, target, dim=0) + l2_weight * ((flat - target).norm() / tnorm) ** 2
            if lm_weight:
                obj = obj + lm_weight * lm_prior(model, probs, emb, cand, loss, lm_model)
            if float(obj.detach()) < best:  # the objective of the current z (before this step)
                best, best_z = float(obj.detach()), z.detach().clone()
            opt.zero_grad()
            obj.backward()
            opt.step()
    probs = torch.softmax(best_z / temperature, -1)
    seqs = cand[probs.argmax(-1)].tolist()
    token_scores = torch.zeros(vocab)
    token_scores[cand] = probs.amax(dim=(0, 1)) + 1e-6  # candidates above every non-candidate
    bag = sorted({t for s in seqs for t in s})
    log.info("grad_match: %d iterations over %d candidates, objective %.4f", iterations, cand.numel(), best)
    return AttackResult("grad_match", token_scores=token_scores, bag=bag, sequences=seqs,
                        extra={"objective": best, "candidates": candidates, "num_candidates": cand.numel(),
                               "lm_weight": lm_weight, "positions": [(p, v) for s in seqs for p, v in enumerate(s)]})
