"""Cosine filter: clip every update to a common norm, leave out those that point away from the others, average
the rest.

Aimed at what the coordinate-wise rules and Krum handle worst: hostile updates of ordinary size that point the
wrong way (a sign flip, the adaptive attacker that stays inside a norm bound), and sparse ternary uplinks where
a coordinate median has too few senders per coordinate. The rule, per round of n updates:

1. **Clip** each update to the bound ``federation.norm_bound`` (0: the round's median update norm), as
   ``norm_bounded`` does: no client moves the aggregate by more than bound / n, whatever its scale.
2. **Leave-one-out direction test**: client i's clipped update ``c_i`` is compared with the sum of the others,
   ``S - c_i``; it is left out when ``cos(c_i, S - c_i) < federation.min_cosine`` (0). Leaving ``c_i`` out of
   its own reference matters: against the plain mean every update, a flipped one too, correlates with itself.
   Honest clients share a task direction, so an honest update agrees with the sum of the others; a flipped
   copy of an honest update disagrees with it by the same amount.
3. **Average** the kept clipped updates, one vote per client (claimed ``num-examples`` are ignored).

Everything is computed from the (n, n) Gram matrix of the updates as sent (A and B factors of LoRA, each
tensor of a compeft update decoded), so the cost is one pass of inner products. Like every filter it is a
heuristic, not a breakdown-point guarantee: hostile updates that agree with the honest direction pass the
test (their influence stays bounded by the clip), and when hostile clients are the majority the reference
is theirs. FLTrust (Cao et al., 2021) scores clients by their cosine with a reference computed on a server
dataset; this rule needs no server data and uses the other clients' updates as the reference.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedpeft import lazy
from fedpeft.server.aggregators.base import AGGREGATORS
from fedpeft.server.aggregators.krum import gram_matrix
from fedpeft.server.aggregators.robust import RobustAggregator, median

if TYPE_CHECKING:
    import torch

    from fedpeft.models import AdapterState
else:  # torch on first use: checking a configuration imports this module (fedpeft/lazy.py)
    torch = lazy.module("torch")

log = logging.getLogger(__name__)


def leave_one_out_cosines(gram: torch.Tensor) -> torch.Tensor:
    """Per update i, ``cos(x_i, sum_j x_j - x_i)`` from the Gram matrix of the x's (1 where either is 0)."""
    row = gram.sum(dim=1)
    own = gram.diagonal()
    dot = row - own
    rest = (gram.sum() - 2 * row + own).clamp_min(0)
    denom = (own * rest).sqrt()
    return torch.where(denom > 0, dot / denom.clamp_min(1e-300), torch.ones_like(dot))


@AGGREGATORS.register("cosine_filter")
class CosineFilter(RobustAggregator):
    """Clip to a common norm, drop updates whose cosine with the sum of the others is below ``min_cosine``,
    average the rest (one vote each)."""

    def combine(self, deltas: list[AdapterState], global_state: AdapterState) -> AdapterState:
        n = len(deltas)
        gram = gram_matrix(deltas, global_state)
        norms = gram.diagonal().clamp_min(0).sqrt()
        self.bound = bound = self.cfg.norm_bound or float(median(norms))
        scales = torch.where(norms > bound, bound / norms.clamp_min(1e-300), torch.ones_like(norms))
        cos = leave_one_out_cosines(gram * scales.unsqueeze(0) * scales.unsqueeze(1))
        keep = [i for i in range(n) if cos[i] >= self.cfg.min_cosine]
        self.left_out = {i: f"cosine_filter: cosine {float(cos[i]):.3f} with the other updates < "
                            f"{self.cfg.min_cosine}" for i in range(n) if i not in keep}
        log.info("cosine_filter: clip bound %.4g (%d clipped), kept %d of %d (cosines %s)", bound,
                 int((scales < 1).sum()), len(keep), n, [round(float(c), 3) for c in cos])
        if not keep:
            return {k: torch.zeros_like(v) for k, v in deltas[0].items()}
        weights = scales[keep].to(torch.float32) / len(keep)
        return {k: torch.einsum("n,n...->...", weights, torch.stack([deltas[i][k] for i in keep]).float())
                for k in deltas[0]}
