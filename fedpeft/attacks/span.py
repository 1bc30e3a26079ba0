"""``span``: DAGER-style span check on LoRA updates of the first block.

Rows of dL/dA (r × d_in) of a first-block LoRA layer are combinations of that layer's token inputs
x_t = Norm(E[v_t] (+P[t])). Stacking every module that reads the same input (q/k/v) and every round
of the same client, a vocabulary token v (at position p) is in the batch iff its input lies in the
stacked row space. Exact while distinct inputs ≤ modules × rank; beyond that the residual still ranks.

When A's gradient is zero (first round, B = 0) the leak moves to dL/dB, whose rows lie in
span{A x_t} ⊂ R^r: the same test on projected candidates A·x (discriminates only when tokens < r).

Dropout (``Observation.dropout`` > 0: the client trained with dropout on, at a public rate p): the client's
inputs are dropped-out copies m ⊙ x / (1 − p) of the candidates, never exactly in their span. The exact test
becomes a statistical one (:func:`dropout_cut`: a member's residual² is about p), at most batch-size tokens
per position, and a single example's sentence is chosen jointly (:func:`joint_sequence`).

For a prefix-tuning adapter the same idea runs per attention head on the layer-0 prefix-key gradient,
whose rows lie in the span of the client's layer-0 queries: see :mod:`fedpeft.attacks.prefix_span`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fedpeft.attacks.lora_io import (
    by_rows,
    count_cut,
    gap_cut,
    lora_modules,
    outlier_cut,
    residuals,
    row_basis,
    shared_groups,
    signal_rank,
    token_inputs,
)
from fedpeft.attacks.observation import AttackResult, NotApplicable, Observation, register_attack
from fedpeft.attacks.prefix_span import prefix_layout, run_prefix

log = logging.getLogger(__name__)


def first_layer(obs: Observation, layer: int = 0, frozen_a: bool = False) -> tuple[list, torch.Tensor, bool]:
    """The q/k/v-like module group of ``layer`` and its candidate inputs (positions × vocab × d).
    ``frozen_a``: the modules whose ``A`` is frozen and only ``B`` travels (FFA-LoRA)."""
    model = obs.working_model()
    vocab = model.get_input_embeddings().num_embeddings

    def compute() -> tuple[list, torch.Tensor, bool]:
        groups = shared_groups(model, layer, token_local=True, vocab=vocab, frozen_a=frozen_a)
        if not groups:
            raise NotApplicable(f"span attack: no token-local LoRA modules{' with a frozen A' if frozen_a else ''} "
                                "in the first block (is this a LoRA adapter with first-block targets?)")
        cands, positional = token_inputs(model, groups[0][0].path, vocab, obs.seq_len)
        return groups[0], cands, positional

    # the first block's token-local inputs do not depend on the adapter: shareable across clients
    return obs.memo(f"cands:{layer}{':frozen_a' if frozen_a else ''}", compute, shared=layer == 0)


def span_group(obs: Observation, layer: int = 0) -> tuple[list, torch.Tensor, bool, bool]:
    """:func:`first_layer`'s group of modules with both factors trainable, else (FFA-LoRA, only ``B``
    trains and travels) the frozen-``A`` group; the last value says which (True: ``A`` frozen)."""
    try:
        return (*first_layer(obs, layer), False)
    except NotApplicable:
        return (*first_layer(obs, layer, frozen_a=True), True)


def a_factor(obs: Observation, g_state: dict, module: Any) -> torch.Tensor:
    """The ``A`` a module's client started from: the global adapter's, or (frozen ``A``, never sent) the
    public seeded init held by the model."""
    if module.a_name in g_state:
        return g_state[module.a_name].to(torch.float64)
    params = dict(obs.working_model().named_parameters())
    return params[module.a_name].detach().to(torch.float64)


def deeper_layers(obs: Observation) -> list[tuple[list, torch.Tensor]]:
    """Every LoRA layer after the first: its largest module group reading one input, and approximate
    candidate inputs (positions × vocab × d) — each token in a context of copies of itself, which keeps the
    token's own part of the residual stream and drops what its real neighbours would add. Exact for no layer,
    close where attention and MLP outputs are small against the residual stream (e.g. a random-weight model)."""
    model = obs.working_model()
    vocab = model.get_input_embeddings().num_embeddings

    def compute() -> list[tuple[list, torch.Tensor]]:
        out = []
        for layer in sorted({m.layer for m in lora_modules(model) if m.layer > 0}):
            groups = shared_groups(model, layer, token_local=False, vocab=vocab)
            if groups:
                out.append((groups[0], token_inputs(model, groups[0][0].path, vocab, obs.seq_len)[0]))
        return out

    return obs.memo("cands:deeper", compute)  # depends on the global adapter of the earlier layers


def all_layer_residuals(obs: Observation, res: torch.Tensor, bound: int, rounds: str) -> tuple[torch.Tensor, int]:
    """``res`` (the first block's dL/dA residuals) combined with every deeper layer's: the geometric mean of
    the residuals, each layer's against its own stacked dL/dA rows (a layer of position-free inputs
    broadcasts over the positions). Returns the combined residuals and the rows the deeper layers add to the
    budget (modules × rank × rounds)."""
    logs, rows = [res.clamp_min(1e-300).log()], 0
    for group, cands in deeper_layers(obs):
        basis = a_channel_basis(obs, group, cands.shape[-1], bound, rounds)
        if basis.shape[0]:
            logs.append(residuals(cands, basis).clamp_min(1e-300).log())
            rows += sum(upd[m.a_name].shape[0] for _, upd in update_pairs(obs, rounds) for m in group)
    shape = torch.broadcast_shapes(*(t.shape for t in logs))
    return torch.stack([t.expand(shape) for t in logs]).mean(0).exp(), rows


def update_pairs(obs: Observation, rounds: str) -> list[tuple[dict, dict]]:
    """The (global, update) pairs a test reads: every round, or the last."""
    return obs.updates() if rounds == "all" else obs.updates()[-1:]


def a_channel_rows(obs: Observation, group: list, d: int, rounds: str = "all") -> torch.Tensor:
    """The stacked dL/dA rows (float64, rows × d) of ``group`` (every round, or the last)."""
    pairs = update_pairs(obs, rounds)
    return torch.cat([upd[m.a_name].to(torch.float64).reshape(-1, d) for _, upd in pairs for m in group])


def a_channel_basis(obs: Observation, group: list, d: int, bound: int, rounds: str = "all") -> torch.Tensor:
    """Orthonormal basis (k × d) of the stacked dL/dA rows of ``group`` (every round, or the last)."""
    return row_basis(a_channel_rows(obs, group, d, rounds), bound)[0]


def joint_sequence(res: torch.Tensor, cands: torch.Tensor, basis: torch.Tensor, visible: list[int],
                   width: int = 20, sweeps: int = 3) -> list[int]:
    """One token per visible position (a single example), chosen jointly: start from each position's best
    token, then replace a token by one of its position's ``width`` best or swap two positions' tokens
    while that makes the chosen inputs explain more of the observed row space (‖Q_Cᵀ basis‖²) net of
    their own residuals (Σ res², which orders two positions that explain the span equally).
    Per-position choices alone confuse neighbouring positions of a smooth learned position embedding (a
    pretrained BERT's): a token is nearly as close to the span one position off as at its own, and
    dropout hides the difference."""
    top = torch.topk(-res, min(width, res.shape[1]), dim=-1).indices
    seq = {p: int(top[p, 0]) for p in visible}

    def explained(choice: dict[int, int]) -> float:
        x = torch.stack([cands[p, v].to(torch.float64) for p, v in choice.items()])
        q, _ = torch.linalg.qr(x.T)
        return float(((basis @ q) ** 2).sum()) - sum(float(res[p, v]) ** 2 for p, v in choice.items())

    best = explained(seq)
    for _ in range(sweeps):
        changed = False
        trials = [{**seq, p: v} for p in visible for v in top[p].tolist()]
        trials += [{**seq, p: seq[q], q: seq[p]} for i, p in enumerate(visible) for q in visible[i + 1:]]
        for trial in trials:
            score = explained(trial)
            if score > best + 1e-12:
                seq, best, changed = trial, score, True
        if not changed:
            break
    return [seq[p] for p in visible]


def a_channel_residuals(obs: Observation, group: list, cands: torch.Tensor, bound: int,
                        rounds: str = "all") -> tuple[torch.Tensor, int]:
    """Residuals of every candidate against the stacked dL/dA row space (and the rank used)."""
    basis = a_channel_basis(obs, group, cands.shape[-1], bound, rounds)
    if basis.shape[0] == 0:
        return torch.ones(cands.shape[:-1], dtype=torch.float64), 0
    return residuals(cands, basis), basis.shape[0]


def _through(cands: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``A·x`` of every candidate in float64, a chunk of rows at a time."""
    return by_rows(lambda c: c.to(torch.float64) @ a.T, cands)


def b_channel_residuals(obs: Observation, group: list, cands: torch.Tensor, bound: int,
                        rounds: str = "all") -> tuple[torch.Tensor, int]:
    """Geometric mean of the residuals of the projected candidates A·x against each module's (and round's)
    dL/dB row space: near 0 where any view holds the input exactly. (An input can be missing from one view:
    the first position's query gradient is zero, its softmax has one entry; the arithmetic mean lifted such a
    token's residual to about 1/3 over q/k/v and out of the accepted bag.)"""
    pairs = update_pairs(obs, rounds)
    total = torch.zeros(cands.shape[:-1], dtype=torch.float64)
    views, rank = 0, 0
    for g_state, upd in pairs:
        for m in group:
            a = a_factor(obs, g_state, m)
            gb = upd[m.b_name].to(torch.float64)
            basis, _ = row_basis(gb, bound)
            if basis.shape[0] == 0 or basis.shape[0] >= a.shape[0]:
                continue  # zero, or spans all of R^r: no information
            total += residuals(_through(cands, a), basis).clamp_min(1e-300).log()
            views += 1
            rank = max(rank, basis.shape[0])
    if views == 0:
        return torch.ones(cands.shape[:-1], dtype=torch.float64), 0
    return (total / views).exp(), rank


def scores_from_residuals(res: torch.Tensor, positional: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token scores (1 − best residual over positions) and per-(position, token) scores."""
    token = 1.0 - res.min(dim=0).values
    return token.float(), (1.0 - res).float() if positional else None


def dropout_cut(cands: torch.Tensor, p: float, z: float = 3.0) -> torch.Tensor:
    """Per candidate (positions × vocab): the largest residual a batch member has, at ``z`` standard
    deviations, when the client's dropout zeroed a fraction ``p`` of its input's coordinates.

    The client's input is x̃ = m ⊙ x / (1 − p), so x = (1 − p)·x̃ + (1 − m) ⊙ x: inside the span up to a
    sparse error whose squared norm, relative to ‖x‖², has mean p and variance p(1 − p)·Σ x_i⁴ / ‖x‖⁴.
    (A LayerNorm after the dropout, as in GPT-2's first block, rescales x̃; measured, the same bound holds.)
    """
    def rows(c: torch.Tensor) -> torch.Tensor:
        w = c.to(torch.float64) ** 2
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
        return (p + z * (p * (1 - p) * (w ** 2).sum(-1)).sqrt()).sqrt()
    return by_rows(rows, cands)


def _accepted(res: torch.Tensor, cands: torch.Tensor, obs: Observation, use: str, k: int, bound: int,
              positional: bool, threshold: float | None, cut_rule: str = "gap",
              count: int = 0) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """Accepted tokens (vocab) and (position, token) pairs, and the token cut (None: statistical test).

    Exact test: the largest gap (:func:`gap_cut`) or ``threshold``; with no gap (more inputs than rows, or a
    true tail that runs into the noise) ``cut_rule="outlier"`` takes the robust outliers of the residuals
    (:func:`outlier_cut`) and ``cut_rule="spectrum"`` the ``count`` smallest (:func:`count_cut`). With dropout
    (``obs.dropout`` > 0, dL/dA) the statistical test :func:`dropout_cut` instead, and at most ``batch_size``
    tokens per position (each position holds one token per example).
    """
    tok_res = res.min(dim=0).values
    if not k:
        none = torch.zeros_like(res, dtype=torch.bool)
        return none[0], none, 0.0
    if threshold is None and obs.dropout > 0 and use == "A":
        pairs = res <= dropout_cut(cands, obs.dropout)
        if positional:
            top = torch.topk(-res, min(obs.batch_size, res.shape[1]), dim=-1).indices
            pairs &= torch.zeros_like(pairs).scatter_(-1, top, True)
        return pairs.any(0), pairs, None
    cut = threshold if threshold is not None else gap_cut(tok_res, bound)
    beyond = threshold is None and cut == 0.0 and cut_rule != "gap"

    def fallback(values: torch.Tensor) -> float:
        return count_cut(values, count) if cut_rule == "spectrum" and count else outlier_cut(values)

    if beyond:
        cut = fallback(tok_res)
    if not positional:
        return tok_res < cut, (res < cut), cut
    pcut = threshold if threshold is not None else fallback(res) if beyond else gap_cut(res, bound)
    return tok_res < cut, res < pcut, cut


@register_attack("span")
def run(obs: Observation, channel: str = "auto", rounds: str = "all", bound: int | None = None,
        threshold: float | None = None, layer: int = 0, layers: str = "first", cut: str = "gap",
        **_: Any) -> AttackResult:
    """Span check; ``channel`` = "A" (dL/dA), "B" (dL/dB, projected) or "auto" (A unless it is zero).

    ``bound``: upper bound on distinct first-layer inputs (default: the public token count).
    ``threshold``: residual cut for the recovered bag (default: the largest gap, see ``gap_cut``; with
    ``obs.dropout`` > 0 the statistical :func:`dropout_cut`). A learned-position model's single example
    (batch size 1) comes back as a sequence: the accepted token of each position, in order.
    Prefix-tuning observations get the per-head prefix-key check (``channel`` is ignored there).
    ``layers="all"`` (dL/dA channel) ranks by the residuals of every LoRA layer combined
    (:func:`all_layer_residuals`: more rows than the first block's rank budget, approximate inputs past it);
    with dropout the accepted bag still comes from the first block alone. ``cut="outlier"``: where the
    largest gap is no clear gap (a batch beyond the rank budget) the bag is the residuals' robust outliers
    (:func:`fedpeft.attacks.lora_io.outlier_cut`) instead of nothing. ``cut="spectrum"`` (dL/dA channel; the
    B channel falls back to "outlier"): there the bag is the m best-ranked inputs, m the stacked rows' singular
    values above their noise bulk (:func:`fedpeft.attacks.lora_io.signal_rank`): a float32 update whose least
    weighted tokens sink into its rounding noise (no gap even inside the rank budget), or a batch past it.
    """
    if layers not in ("first", "all"):
        raise ValueError(f"span layers must be 'first' or 'all', got {layers!r}")
    if cut not in ("gap", "outlier", "spectrum"):
        raise ValueError(f"span cut must be 'gap', 'outlier' or 'spectrum', got {cut!r}")
    if prefix_layout(obs.working_model()) is not None:
        return run_prefix(obs, rounds, bound, threshold)
    group, cands, positional, frozen = span_group(obs, layer)
    bound = bound or obs.token_bound
    if frozen and channel == "A":
        raise NotApplicable("span channel 'A': A is frozen (FFA-LoRA), only dL/dB travels")
    a_zero = frozen or all(float(upd[m.a_name].abs().max()) == 0.0 for _, upd in obs.updates() for m in group)
    use = channel if channel != "auto" else ("B" if a_zero else "A")
    if use == "A":
        res, k = a_channel_residuals(obs, group, cands, bound, rounds)
    else:
        res, k = b_channel_residuals(obs, group, cands, bound, rounds)
    first_res, deeper_rows = res, 0
    if layers == "all" and use == "A" and k:
        res, deeper_rows = all_layer_residuals(obs, res, bound, rounds)
    token_scores, pos_scores = scores_from_residuals(res, positional)
    # the rank budget: stacked rows the test reads (modules sharing the input x rank x rounds) vs bound
    rows = deeper_rows + sum(upd[m.a_name if use == "A" else m.b_name].shape[0 if use == "A" else 1]
                             for _, upd in update_pairs(obs, rounds) for m in group)
    count = 0
    if cut == "spectrum" and use == "A" and k:
        count = signal_rank(torch.linalg.svdvals(a_channel_rows(obs, group, cands.shape[-1], rounds)), cands.shape[-1])
    in_bag, pairs, cut_at = _accepted(first_res if obs.dropout > 0 else res, cands, obs, use, k, bound, positional,
                                      threshold, cut, count)
    bag = in_bag.nonzero().flatten().tolist()
    positions = [(p, v) for p, v in pairs.nonzero().tolist()] if positional else []
    if cut_at is None:  # statistical test: the accepted pairs themselves
        consistent = [sorted(v for q, v in positions if q == p) for p in range(res.shape[0])] if positional else []
    else:
        consistent = [[v for v in bag if float(res[p, v]) < cut_at] for p in range(res.shape[0])] if positional else []
    sequences = []
    if positional and obs.batch_size == 1 and positions:
        visible = [p for p in range(res.shape[0]) if bool(pairs[p].any())]
        if cut_at is None:  # statistical test: choose the sentence jointly, it is the bag
            basis = a_channel_basis(obs, group, cands.shape[-1], bound, rounds)
            sequences = [joint_sequence(first_res, cands, basis, visible)]
            positions = list(zip(visible, sequences[0]))
            bag = sorted(set(sequences[0]))
        else:
            masked = torch.where(pairs, res, torch.inf)
            sequences = [[int(masked[p].argmin()) for p in visible]]
    log.info("span[%s]: %d modules, rank %d, cut %s -> %d tokens", use, len(group), k,
             "statistical" if cut_at is None else f"{cut_at:.2e}", len(bag))
    return AttackResult("span", token_scores=token_scores, position_scores=pos_scores, bag=bag, sequences=sequences,
                        extra={"channel": use, "rank": k, "cut": cut_at, "signal_rank": count, "positional": positional,
                               "rows": rows, "positions": positions, "consistent": consistent, "dropout": obs.dropout,
                               "modules": [m.path for m in group]})
