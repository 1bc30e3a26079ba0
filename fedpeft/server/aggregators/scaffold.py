"""SCAFFOLD (``federation.strategy = "scaffold"``): FedAvg's step plus the server control variate (see
:mod:`fedpeft.scaffold` for the algorithm and how the control variates travel).

The server's ``c`` is aggregator state (``control/<name>``), so checkpoints carry it; each client's ``c_i`` is
node state. Needs each client's decoded update (no SecAgg+) and is not the noised mean of client-level DP
(refused by :mod:`fedpeft.config_rules`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft import lazy
from fedpeft.server.aggregators.base import AGGREGATORS, weighted_mean
from fedpeft.server.aggregators.fedavg import FedAvg

if TYPE_CHECKING:
    import torch

    from fedpeft import scaffold
    from fedpeft.models import AdapterState
    from fedpeft.server.replies import RoundReplies
else:  # on first use: checking a configuration imports this module (fedpeft/lazy.py)
    torch = lazy.module("torch")
    scaffold = lazy.module("fedpeft.scaffold")

CONTROL = "control"


@AGGREGATORS.register("scaffold")
class Scaffold(FedAvg):
    """x += server_lr · mean(Δy_i) (example-weighted, FedAvg's step); c += (1 / N) Σ Δc_i."""

    needs_individual_updates = True
    supports_client_dp = False
    population = 0  # N = data.num_clients (set by the server loop); 0: the round's replies are everyone

    def aggregate(self, replies: RoundReplies, global_state: AdapterState) -> AdapterState:
        parts = [scaffold.split(d) for d in replies.deltas]
        n = self.population or len(parts)
        for k, ref in global_state.items():
            c = self._buf(CONTROL, k, ref)
            c += sum((dc[k] for _, dc in parts if k in dc), torch.zeros_like(ref)) / n
        return self.apply(global_state, weighted_mean([u for u, _ in parts], replies.weights))

    def control(self, template: AdapterState) -> AdapterState:
        """The server control variate ``c`` (zeros before the first aggregation), float32."""
        return {k: self.state.get(f"{CONTROL}/{k}", torch.zeros_like(v)).float() for k, v in template.items()}
