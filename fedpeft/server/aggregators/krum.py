"""Krum and multi-Krum (Blanchard et al., 2017; El Mhamdi et al., 2018): keep the update(s) closest to their
neighbours.

Each update is scored by the sum of its squared distances to its ``n - f - 2`` nearest others
(f = ``federation.byzantine_clients``); Krum steps along the best-scored update, multi-Krum along the
mean of the ``multi_krum`` best. With ``n >= 2f + 3`` this tolerates f hostile clients whatever they send.

For LoRA the distances are, by default, between the updates as sent (A and B factors,
``federation.krum_space = "factors"``). ``"delta_w"`` measures them between the changes each client
makes to the effective weight ``ΔW = B·A``, which compares what the updates do to the model (factors
are defined only up to an invertible r x r map) but is blind to what does not change ΔW yet: while the
global B is 0 (LoRA's init) an update of A alone has ΔW = 0, sits at the centre of the honest updates
and is selected, however large (a regression test holds this). The tiny-model measurement in
docs/robust-aggregation.md showed no consistent gain from ΔW distances, at about 20x the cost. The selected updates
are averaged as sent (exact for Krum; FedAvg's usual approximation for multi-Krum). Tensors that are
not a LoRA pair (a classification head, prompts, IA3 vectors) are compared as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fedpeft import lazy
from fedpeft.server.aggregators.base import AGGREGATORS
from fedpeft.server.aggregators.robust import RobustAggregator

if TYPE_CHECKING:
    import torch

    from fedpeft.models import AdapterState
else:  # torch on first use: checking a configuration imports this module (fedpeft/lazy.py)
    torch = lazy.module("torch")

log = logging.getLogger(__name__)


def delta_w(deltas: list[AdapterState], global_state: AdapterState, a: str, b: str) -> torch.Tensor:
    """Each client's change to ``B·A``, as (clients, out*in): ``(B + dB)(A + dA) - B·A = (B + dB)·dA + dB·A``,
    one batched product of rank-2r factors ``[B + dB | dB] @ [dA ; A]``."""
    da = torch.stack([d[a] for d in deltas])
    db = torch.stack([d[b] for d in deltas])
    n, ga, gb = len(deltas), global_state[a], global_state[b]
    left = torch.cat([gb + db, db], dim=2)
    right = torch.cat([da, ga.expand(n, *ga.shape)], dim=1)
    return torch.bmm(left, right).reshape(n, -1)


def _blocks(deltas: list[AdapterState], global_state: AdapterState, space: str) -> Iterator[torch.Tensor]:
    """The updates as (clients, elements) blocks: one per LoRA pair (its ΔW) in ``delta_w`` space, one per
    other tensor."""
    from fedpeft.models import lora_pairs  # transformers: only when the aggregator runs

    pairs = lora_pairs(global_state) if space == "delta_w" else {}
    for a, b in pairs.items():
        yield delta_w(deltas, global_state, a, b)
    paired = set(pairs) | set(pairs.values())
    for k in global_state:
        if k not in paired:
            yield torch.stack([d[k].reshape(-1) for d in deltas])


def gram_matrix(deltas: list[AdapterState], global_state: AdapterState, space: str = "factors") -> torch.Tensor:
    """(n, n) float64 inner products between the updates; LoRA pairs in ΔW space when ``space == "delta_w"``.

    Accumulated block by block, so no (n, whole adapter) matrix is built.
    """
    n = len(deltas)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for x in _blocks(deltas, global_state, space):
        gram += (x @ x.T).double()
    return gram


def squared_distances(deltas: list[AdapterState], global_state: AdapterState, space: str) -> torch.Tensor:
    """(n, n) squared L2 distances between the updates (from :func:`gram_matrix`)."""
    gram = gram_matrix(deltas, global_state, space)
    sq = gram.diagonal()
    return (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * gram).clamp_min(0)


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Each update's sum of squared distances to its ``n - f - 2`` nearest others (at least 1)."""
    n = dist.shape[0]
    k = min(max(n - f - 2, 1), n - 1)
    others = dist + torch.diag(torch.full((n,), float("inf"), dtype=dist.dtype))
    return others.sort(dim=1).values[:, :k].sum(dim=1)


@AGGREGATORS.register("krum")
class Krum(RobustAggregator):
    """Step along the mean of the ``multi_krum`` best-scored updates (1: Krum; 0: the ``n - f`` best)."""

    def combine(self, deltas: list[AdapterState], global_state: AdapterState) -> AdapterState:
        n, f = len(deltas), self.cfg.byzantine_clients
        if n < 2 * f + 3:
            log.warning("krum: %d update(s) this round < 2f + 3 = %d (federation.byzantine_clients = %d); "
                        "Krum's guarantee does not hold this round", n, 2 * f + 3, f)
        if n == 1:
            return dict(deltas[0])
        scores = krum_scores(squared_distances(deltas, global_state, self.cfg.krum_space), f)
        m = min(self.cfg.multi_krum or max(n - f, 1), n)
        chosen = torch.argsort(scores, stable=True)[:m].tolist()
        self.left_out = {i: f"krum: not among the {m} best-scored of {n}" for i in range(n) if i not in chosen}
        log.info("krum: stepping along update(s) %s of %d", chosen, n)
        log.debug("krum scores: %s", scores.tolist())
        return {k: torch.stack([deltas[i][k] for i in chosen]).mean(dim=0) for k in deltas[0]}
