"""Per-head span check on prefix-tuning updates (the ``span`` attack dispatches here for prefix adapters).

Derivation. Prefix tuning prepends m trainable keys/values to every attention layer. At layer 0,
head h, token t reads the prefix through the score s_tj = q_tᵀ k_j / √d_h with the query
q_t = W_Q^h x_t + b_Q^h, where x_t is the block's (normed) token-local input: it depends on the token
at t and its position only (learned absolute positions: GPT-2, BERT; RoPE rotates q_t by its
position). Hence

    ∂L/∂k_j^h = Σ_t (∂L/∂s_tj) q_t^h / √d_h     ⇒  rowspace(G_K^h) ⊆ span{q_t^h}   (G_K^h: m × d_h)

so every row of a head's key-gradient block is a combination of that head's queries of the client's
tokens, which the server computes for every (token, position) candidate from the frozen weights.
A candidate is in the batch iff its query lies in the row space of every head's block. The value
block ∂L/∂v_j^h = Σ_t a_tj δo_t^h mixes back-propagated signals from all later layers: no
token-local structure, unused.

What is exact. rank(G_K^h) ≤ min(m, n, d_h) for n distinct visible inputs (a causal LM's last
token has δ = 0). The check is **exact when n ≤ m·R and n < d_h** (R stacked rounds of the same
client: layer-0 queries do not depend on the prefix, so each round adds an m-row slice of the same
span; a multi-step delta sums its steps' gradients and keeps rank ≤ m). For m < n < d_h each head
sees a random m-dim slice of the n-dim query span: a *ranking*
(member cosine ≈ √(m/n) against √(m/d_h) for a non-member), averaged over heads. For n ≥ d_h the
queries span all of R^{d_h}: the exact check carries nothing, only the skew of the singular spectrum
still ranks. So prefix tuning is exactly span-attackable only for short inputs (d_h is 64-128 on
real models, 32 on the tiny ones). Adam breaks the linearity. Measured figures: ``docs/audit.md``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from fedpeft.attacks.lora_io import gap_cut, residuals, row_basis
from fedpeft.attacks.observation import AttackResult, NotApplicable, Observation

log = logging.getLogger(__name__)
_FIRST = re.compile(r"\.0\.")


class _Stop(Exception):
    """Raised by the query hook: nothing after layer 0's query projection is needed."""


@dataclass(frozen=True)
class PrefixLayout:
    """Where layer 0's prefix keys live in the adapter state: ``param`` (m × 2·layers·d), key
    columns ``[0, d)`` = heads × d_h (peft's past_key_values layout), and the query module."""

    param: str
    virtual_tokens: int
    heads: int
    head_dim: int
    query_path: str
    query_kind: str  # "fused" (GPT-2 c_attn: q = first d outputs), "linear", "rope" (linear + rotary)


def prefix_layout(model: nn.Module) -> PrefixLayout | None:
    """The prefix layout of a peft prefix-tuning model without prefix projection, else None."""
    pcfg = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    if pcfg is None or getattr(pcfg, "peft_type", None) is None or pcfg.peft_type.value != "PREFIX_TUNING":
        return None
    if getattr(pcfg, "prefix_projection", False):
        return None  # keys come out of an MLP: the gradient w.r.t. its weights has no per-head rows
    name = f"prompt_encoder.{model.active_adapter}.embedding.weight"
    params = dict(model.named_parameters())
    d, heads = pcfg.token_dim, pcfg.num_attention_heads
    if name not in params or params[name].shape[-1] != 2 * pcfg.num_layers * d or d % heads:
        return None
    found = [(n, kind) for n, _ in model.named_modules() if _FIRST.search(n + ".") and "prompt_encoder" not in n
             for suffix, kind in (("c_attn", "fused"), ("query", "linear"), ("q_proj", "linear"))
             if n.endswith("." + suffix)]
    if not found:
        return None
    path, kind = found[0]
    if kind == "linear" and any(n.endswith("rotary_emb") for n, _ in model.named_modules()):
        kind = "rope"
    return PrefixLayout(name, pcfg.num_virtual_tokens, heads, d // heads, path, kind)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


@torch.no_grad()
def layer0_queries(model: nn.Module, lay: PrefixLayout, ids: torch.Tensor) -> torch.Tensor:
    """Layer-0 per-head queries (batch × seq × heads × d_h) of token ids ``ids`` as the attention
    uses them (the model's own forward with the prefix attached, so positions are shifted alike)."""
    modules = dict(model.named_modules())
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        got.append(out.detach().clone())
        raise _Stop

    handle = modules[lay.query_path].register_forward_hook(hook)
    try:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"no query captured at {lay.query_path}")
    d = lay.heads * lay.head_dim
    q = got[0][..., :d].reshape(*ids.shape, lay.heads, lay.head_dim)
    if lay.query_kind == "rope":  # rotate by the absolute position (after the m prefix positions)
        rot = next(m for n, m in modules.items() if n.endswith("rotary_emb"))
        pos = torch.arange(lay.virtual_tokens, lay.virtual_tokens + ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
        cos, sin = rot(q, pos)
        cos, sin = cos.unsqueeze(2).to(q.dtype), sin.unsqueeze(2).to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
    return q


@torch.no_grad()
def candidate_queries(model: nn.Module, lay: PrefixLayout, vocab: int, seq_len: int,
                      chunk: int = 512) -> tuple[torch.Tensor, bool]:
    """Queries of every (position, token) candidate: positions × vocab × heads × d_h (one position
    when the queries do not depend on it)."""
    probe = layer0_queries(model, lay, torch.tensor([[7] * min(seq_len, 4)]))[0]
    positional = not torch.allclose(probe[0], probe[-1], rtol=1e-6, atol=1e-7)
    length = seq_len if positional else 1
    per = max(1, chunk // length)
    outs = [layer0_queries(model, lay, torch.arange(s, min(vocab, s + per)).unsqueeze(1).repeat(1, length))
            for s in range(0, vocab, per)]
    return torch.cat(outs).transpose(0, 1).contiguous(), positional


def key_blocks(obs: Observation, lay: PrefixLayout, rounds: str = "all") -> list[torch.Tensor]:
    """Per head, the stacked layer-0 prefix-key gradient rows of every (or the last) round (· × d_h)."""
    pairs = obs.updates() if rounds == "all" else obs.updates()[-1:]
    d_h = lay.head_dim
    return [torch.cat([upd[lay.param].to(torch.float64)[:, h * d_h:(h + 1) * d_h] for _, upd in pairs])
            for h in range(lay.heads)]


def head_residuals(blocks: list[torch.Tensor], cands: torch.Tensor, bound: int) -> tuple[torch.Tensor, int]:
    """Mean over heads of each candidate's residual against that head's row space (and the max rank)."""
    total = torch.zeros(cands.shape[:2], dtype=torch.float64)
    views, rank = 0, 0
    for h, rows in enumerate(blocks):
        basis, _ = row_basis(rows, bound)
        if basis.shape[0] == 0:
            continue
        total += residuals(cands[:, :, h], basis)
        views, rank = views + 1, max(rank, basis.shape[0])
    if views == 0:
        return torch.ones(cands.shape[:2], dtype=torch.float64), 0
    return total / views, rank


def run_prefix(obs: Observation, rounds: str = "all", bound: int | None = None,
               threshold: float | None = None) -> AttackResult:
    """The per-head prefix-key span check (see the module docstring); same result fields as ``span``."""
    model = obs.working_model()
    lay = prefix_layout(model)
    if lay is None:
        raise NotApplicable("prefix span check: not a prefix-tuning adapter with per-layer key/value prefixes")
    cands, positional = obs.memo("prefix_cands", lambda: candidate_queries(
        model, lay, model.get_input_embeddings().num_embeddings, obs.seq_len))
    bound = bound or obs.token_bound
    res, k = head_residuals(key_blocks(obs, lay, rounds), cands, bound)
    tok_res = res.min(dim=0).values
    cut = threshold if threshold is not None else (gap_cut(tok_res, bound) if k else 0.0)
    bag = (tok_res < cut).nonzero().flatten().tolist()
    positions: list[tuple[int, int]] = []
    if positional and k:
        pcut = threshold if threshold is not None else gap_cut(res, bound)
        positions = [(p, v) for p, v in (res < pcut).nonzero().tolist()]
    log.info("span[prefix]: %d heads, rank %d (m=%d, d_h=%d), cut %.2e -> %d tokens", lay.heads, k,
             lay.virtual_tokens, lay.head_dim, cut, len(bag))
    return AttackResult("span", token_scores=(1.0 - tok_res).float(),
                        position_scores=(1.0 - res).float() if positional else None, bag=bag,
                        extra={"channel": "prefix_keys", "rank": k, "cut": cut, "positional": positional,
                               "positions": positions, "heads": lay.heads, "head_dim": lay.head_dim,
                               "virtual_tokens": lay.virtual_tokens})
