"""``span``: DAGER-style span check on LoRA updates of the first block.

Rows of dL/dA (r × d_in) of a first-block LoRA layer are combinations of that layer's token inputs
x_t = Norm(E[v_t] (+P[t])). Stacking every module that reads the same input (q/k/v) and every round
of the same client, a vocabulary token v (at position p) is in the batch iff its input lies in the
stacked row space. Exact while distinct inputs ≤ modules × rank; beyond that the residual still ranks.

When A's gradient is zero (first round, B = 0) the leak moves to dL/dB, whose rows lie in
span{A x_t} ⊂ R^r: the same test on projected candidates A·x (discriminates only when tokens < r).

For a prefix-tuning adapter the same idea runs per attention head on the layer-0 prefix-key gradient,
whose rows lie in the span of the client's layer-0 queries: see :mod:`fedpeft.attacks.prefix_span`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fedpeft.attacks.lora_io import gap_cut, residuals, row_basis, shared_groups, token_inputs
from fedpeft.attacks.observation import AttackResult, NotApplicable, Observation, register_attack
from fedpeft.attacks.prefix_span import prefix_layout, run_prefix

log = logging.getLogger(__name__)


def first_layer(obs: Observation, layer: int = 0) -> tuple[list, torch.Tensor, bool]:
    """The q/k/v-like module group of ``layer`` and its candidate inputs (positions × vocab × d)."""
    model = obs.working_model()
    vocab = model.get_input_embeddings().num_embeddings

    def compute() -> tuple[list, torch.Tensor, bool]:
        groups = shared_groups(model, layer, token_local=True, vocab=vocab)
        if not groups:
            raise NotApplicable("span attack: no token-local LoRA modules in the first block "
                                "(is this a LoRA adapter with first-block targets?)")
        cands, positional = token_inputs(model, groups[0][0].path, vocab, obs.seq_len)
        return groups[0], cands, positional

    # the first block's token-local inputs do not depend on the adapter: shareable across clients
    return obs.memo(f"cands:{layer}", compute, shared=layer == 0)


def a_channel_residuals(obs: Observation, group: list, cands: torch.Tensor, bound: int,
                        rounds: str = "all") -> tuple[torch.Tensor, int]:
    """Residuals of every candidate against the stacked dL/dA row space (and the rank used)."""
    pairs = obs.updates() if rounds == "all" else obs.updates()[-1:]
    rows = torch.cat([upd[m.a_name].to(torch.float64).reshape(-1, cands.shape[-1])
                      for _, upd in pairs for m in group])
    basis, _ = row_basis(rows, bound)
    if basis.shape[0] == 0:
        return torch.ones(cands.shape[:-1], dtype=torch.float64), 0
    return residuals(cands, basis), basis.shape[0]


def b_channel_residuals(obs: Observation, group: list, cands: torch.Tensor, bound: int,
                        rounds: str = "all") -> tuple[torch.Tensor, int]:
    """Mean residual of the projected candidates A·x against each module's dL/dB row space."""
    pairs = obs.updates() if rounds == "all" else obs.updates()[-1:]
    total = torch.zeros(cands.shape[:-1], dtype=torch.float64)
    views, rank = 0, 0
    for g_state, upd in pairs:
        for m in group:
            a = g_state[m.a_name].to(torch.float64)
            gb = upd[m.b_name].to(torch.float64)
            basis, _ = row_basis(gb, bound)
            if basis.shape[0] == 0 or basis.shape[0] >= a.shape[0]:
                continue  # zero, or spans all of R^r: no information
            total += residuals(cands.to(torch.float64) @ a.T, basis)
            views += 1
            rank = max(rank, basis.shape[0])
    if views == 0:
        return torch.ones(cands.shape[:-1], dtype=torch.float64), 0
    return total / views, rank


def scores_from_residuals(res: torch.Tensor, positional: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token scores (1 − best residual over positions) and per-(position, token) scores."""
    token = 1.0 - res.min(dim=0).values
    return token.float(), (1.0 - res).float() if positional else None


@register_attack("span")
def run(obs: Observation, channel: str = "auto", rounds: str = "all", bound: int | None = None,
        threshold: float | None = None, layer: int = 0, **_: Any) -> AttackResult:
    """Span check; ``channel`` = "A" (dL/dA), "B" (dL/dB, projected) or "auto" (A unless it is zero).

    ``bound``: upper bound on distinct first-layer inputs (default: the public token count).
    ``threshold``: residual cut for the recovered bag (default: the largest gap, see ``gap_cut``).
    Prefix-tuning observations get the per-head prefix-key check (``channel`` is ignored there).
    """
    if prefix_layout(obs.working_model()) is not None:
        return run_prefix(obs, rounds, bound, threshold)
    group, cands, positional = first_layer(obs, layer)
    bound = bound or obs.token_bound
    a_zero = all(float(upd[m.a_name].abs().max()) == 0.0 for _, upd in obs.updates() for m in group)
    use = channel if channel != "auto" else ("B" if a_zero else "A")
    if use == "A":
        res, k = a_channel_residuals(obs, group, cands, bound, rounds)
    else:
        res, k = b_channel_residuals(obs, group, cands, bound, rounds)
    token_scores, pos_scores = scores_from_residuals(res, positional)
    tok_res = res.min(dim=0).values
    cut = threshold if threshold is not None else (gap_cut(tok_res, bound) if k else 0.0)
    bag = (tok_res < cut).nonzero().flatten().tolist()
    positions: list[tuple[int, int]] = []
    if positional and k:  # (token, position) pairs: only where the pairs themselves separate
        pcut = threshold if threshold is not None else gap_cut(res, bound)
        positions = [(p, v) for p, v in (res < pcut).nonzero().tolist()]
    consistent = [[v for v in bag if float(res[p, v]) < cut] for p in range(res.shape[0])] if positional else []
    log.info("span[%s]: %d modules, rank %d, cut %.2e -> %d tokens", use, len(group), k, cut, len(bag))
    return AttackResult("span", token_scores=token_scores, position_scores=pos_scores, bag=bag,
                        extra={"channel": use, "rank": k, "cut": cut, "positional": positional,
                               "positions": positions, "consistent": consistent,
                               "modules": [m.path for m in group]})
