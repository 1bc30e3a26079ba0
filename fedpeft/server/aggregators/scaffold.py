"""SCAFFOLD (``federation.strategy = "scaffold"``): FedAvg's step plus the server control variate (see
:mod:`fedpeft.scaffold` for the algorithm and why the control deltas do not travel).

The server's ``c`` is aggregator state (``control/<name>``), so checkpoints carry it; each client's ``c_i`` is
node state. Each reply's control delta is option II's for the update the server decoded, with ``K`` from the
reply's ``num-examples``: the client derives the same from the update it sent, so a client moves ``c`` only
through its own (screened) update. Needs each client's decoded update (no SecAgg+) and is not the noised mean
of client-level DP (refused by :mod:`fedpeft.config_rules`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft import lazy
from fedpeft.server.aggregators.base import AGGREGATORS
from fedpeft.server.aggregators.fedavg import FedAvg

if TYPE_CHECKING:
    import torch

    from fedpeft import scaffold
    from fedpeft.config import TrainSection
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
    #: the clients' training settings (set by the server loop): K and lr of each control delta
    train: TrainSection | None = None

    def aggregate(self, replies: RoundReplies, global_state: AdapterState) -> AdapterState:
        from fedpeft.training import num_local_steps

        if self.train is None:
            raise RuntimeError("Scaffold.train must be set to the clients' train section before aggregating")
        c = self.control(global_state)
        sums = {k: torch.zeros_like(v) for k, v in c.items()}
        for reply in replies.clients:
            if reply.delta is None:
                continue
            steps = num_local_steps(self.train, int(reply.metrics["num-examples"]))
            for k, v in scaffold.control_delta(c, reply.delta, steps, self.train.lr).items():
                sums[k] += v.float()
        n = self.population or len(replies.deltas)
        for k, ref in global_state.items():
            self._buf(CONTROL, k, ref).add_(sums[k] / n)
        return super().aggregate(replies, global_state)

    def control(self, template: AdapterState) -> AdapterState:
        """The server control variate ``c`` (zeros before the first aggregation), float32."""
        return {k: self.state.get(f"{CONTROL}/{k}", torch.zeros_like(v)).float() for k, v in template.items()}
