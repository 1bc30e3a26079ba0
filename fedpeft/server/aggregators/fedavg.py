"""FedAvg and its server-side variants: average the round's deltas, then step the global adapter.

Clients send *deltas* (local adapter - global adapter), so these strategies are "average the deltas,
then let a server optimizer turn the average into a step" (Reddi et al., *Adaptive Federated
Optimization*, Algorithm 2): FedAvg/FedProx step by ``server_lr * mean``; FedAvgM keeps momentum.
The adaptive family (FedAdam, FedYogi, FedAdagrad) is in :mod:`.fedopt`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft import lazy
from fedpeft.server.aggregators.base import AGGREGATORS, Aggregator, mean_update

if TYPE_CHECKING:
    import torch

    from fedpeft.models import AdapterState
    from fedpeft.server.replies import RoundReplies
else:  # torch on first use: checking a configuration imports this module (fedpeft/lazy.py)
    torch = lazy.module("torch")


@AGGREGATORS.register("fedavg")
class FedAvg(Aggregator):
    """global + server_lr * mean; subclasses change the step direction (:meth:`direction`)."""

    def aggregate(self, replies: RoundReplies, global_state: AdapterState) -> AdapterState:
        return self.apply(global_state, mean_update(replies, self.privacy, global_state))

    def apply(self, global_state: AdapterState, mean_delta: AdapterState) -> AdapterState:
        """One server-optimizer step from the averaged delta."""
        self.t += 1
        return {k: global_state[k] + self.direction(k, mean_delta[k]) for k in global_state}

    def direction(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        """The step for one tensor, given its averaged delta."""
        return self.cfg.server_lr * delta


@AGGREGATORS.register("fedprox")
class FedProx(FedAvg):
    """FedAvg on the server; the clients add the proximal term (mu/2)||w - w_global||^2 to their loss."""

    @property
    def proximal_mu(self) -> float:
        return self.cfg.proximal_mu


@AGGREGATORS.register("fedavgm")
class FedAvgM(FedAvg):
    """Server momentum: v = beta*v + delta; step = lr * v."""

    def direction(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        v = self._buf("v", key, delta)
        v.mul_(self.cfg.server_momentum).add_(delta)
        return self.cfg.server_lr * v
