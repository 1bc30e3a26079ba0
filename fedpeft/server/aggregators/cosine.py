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

Options (:mod:`.reputation`): the test per group of tensors (``score_groups``), a relative outlier test per group
(``outlier_z``) and a cross-round client reputation that weights the kept updates (``reputation_decay``).
"""

from __future__ import annotations

import logging
import operator
from functools import reduce
from typing import TYPE_CHECKING

from fedpeft import lazy
from fedpeft.server.aggregators.base import AGGREGATORS
from fedpeft.server.aggregators.reputation import group_grams, low_outliers, penalise, reputations
from fedpeft.server.aggregators.robust import RobustAggregator, median

if TYPE_CHECKING:
    import torch

    from fedpeft.config import FederationSection
    from fedpeft.models import AdapterState
    from fedpeft.privacy.server_dp import ServerPrivacy
    from fedpeft.server.replies import RoundReplies
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
    """Clip to a common norm, drop updates whose cosine with the sum of the others is below ``min_cosine`` (or, per
    score group, a robust outlier: :mod:`.reputation`), average the rest weighted by each client's reputation."""

    def __init__(self, cfg: FederationSection, privacy: ServerPrivacy | None = None) -> None:
        super().__init__(cfg, privacy)
        self.nodes: list[int] = []  # the node of each update this round

    def aggregate(self, replies: RoundReplies, global_state: AdapterState) -> AdapterState:
        self.nodes = replies.delta_nodes  # the reputation is per client, across rounds
        return super().aggregate(replies, global_state)

    def combine(self, deltas: list[AdapterState], global_state: AdapterState) -> AdapterState:
        n, cfg = len(deltas), self.cfg
        grams = group_grams(deltas, cfg.score_groups)
        norms = reduce(operator.add, grams.values()).diagonal().clamp_min(0).sqrt()
        self.bound = bound = cfg.norm_bound or float(median(norms))
        scales = torch.where(norms > bound, bound / norms.clamp_min(1e-300), torch.ones_like(norms))
        outer = scales.unsqueeze(0) * scales.unsqueeze(1)
        self.left_out = {}
        for group, gram in grams.items():
            cos = leave_one_out_cosines(gram * outer)
            where = "" if group == "whole" else f" in group {group!r}"
            outliers = low_outliers(cos, cfg.outlier_z)
            for i in range(n):
                if i not in self.left_out and (cos[i] < cfg.min_cosine or outliers[i]):
                    self.left_out[i] = (f"cosine_filter: cosine {float(cos[i]):.3f} with the other updates{where} < "
                                        + (f"{cfg.min_cosine}" if cos[i] < cfg.min_cosine else
                                           f"the group's median by more than outlier_z = {cfg.outlier_z} deviations"))
            log.info("cosine_filter: cosines%s %s", where, [round(float(c), 3) for c in cos])
        keep = [i for i in range(n) if i not in self.left_out]
        rep = reputations(self.state, self.nodes)
        penalise(self.state, self.nodes, rep, list(self.left_out), cfg.reputation_decay)
        log.info("cosine_filter: clip bound %.4g (%d clipped), kept %d of %d, reputations %s", bound,
                 int((scales < 1).sum()), len(keep), n, [round(float(r), 3) for r in rep])
        self.metrics["reputation_below_1"] = float((rep < 1).sum())
        if not keep or float(rep[keep].sum()) <= 0:
            return {k: torch.zeros_like(v) for k, v in deltas[0].items()}
        weights = (scales[keep] * rep[keep] / rep[keep].sum()).to(torch.float32)
        return {k: torch.einsum("n,n...->...", weights, torch.stack([deltas[i][k] for i in keep]).float())
                for k in deltas[0]}
