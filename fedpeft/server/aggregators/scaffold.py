"""SCAFFOLD (``federation.strategy = "scaffold"``): FedAvg's step plus the server control variate (see
:mod:`fedpeft.scaffold` for the algorithm and how the control variates travel).

The server's ``c`` is aggregator state (``control/<name>``), so checkpoints carry it; each client's ``c_i`` is
node state. Over a lossless uplink each reply's control delta must be option II's for its own update, else the
reply is left out (:meth:`Scaffold._consistent`): the control variate would otherwise be a channel by which one
client steers every client's steps. Needs each client's decoded update (no SecAgg+) and is not the noised mean
of client-level DP (refused by :mod:`fedpeft.config_rules`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedpeft import lazy
from fedpeft.server.aggregators.base import AGGREGATORS, weighted_mean
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
CONTROL_TOLERANCE = 1e-4  # relative: fp32 rounding of the client's and the server's arithmetic
log = logging.getLogger(__name__)


@AGGREGATORS.register("scaffold")
class Scaffold(FedAvg):
    """x += server_lr · mean(Δy_i) (example-weighted, FedAvg's step); c += (1 / N) Σ Δc_i."""

    needs_individual_updates = True
    supports_client_dp = False
    population = 0  # N = data.num_clients (set by the server loop); 0: the round's replies are everyone
    #: set by the server loop when the uplink is lossless: the clients' training settings, to check each control delta
    check_with: TrainSection | None = None

    def aggregate(self, replies: RoundReplies, global_state: AdapterState) -> AdapterState:
        parts = [scaffold.split(d) for d in replies.deltas]
        weights = replies.weights
        if self.check_with is not None:
            kept = self._consistent(replies, parts, global_state, self.check_with)
            parts, weights = [parts[i] for i in kept], [weights[i] for i in kept]
            if not parts:
                return global_state
        n = self.population or len(parts)
        for k, ref in global_state.items():
            c = self._buf(CONTROL, k, ref)
            c += sum((dc[k] for _, dc in parts if k in dc), torch.zeros_like(ref)) / n
        return self.apply(global_state, weighted_mean([u for u, _ in parts], weights))

    def _consistent(self, replies: RoundReplies, parts: list[tuple[AdapterState, AdapterState]],
                    global_state: AdapterState, train: TrainSection) -> list[int]:
        """The replies whose control delta is option II's ``-c - Δy_i / (K lr)`` for their own update (what an
        honest client computes, :func:`fedpeft.scaffold.control_delta`, with ``K`` from its num-examples; exact
        over a lossless uplink); the others are left out of the round, logged in ``excluded``. Without this one
        client could steer ``c`` within the norm bounds, and ``c`` steers every client's steps (measured:
        docs/lora-aggregation.md, "SCAFFOLD")."""
        from fedpeft.privacy.client_dp import global_norm
        from fedpeft.training import num_local_steps

        c = self.control(global_state)
        clients = [r for r in replies.clients if r.delta is not None]
        kept = []
        for i, ((update, control), reply) in enumerate(zip(parts, clients)):
            steps = num_local_steps(train, int(reply.metrics["num-examples"]))
            expected = scaffold.control_delta(c, update, steps, train.lr)
            off, size = global_norm({k: control[k] - expected[k] for k in c}), global_norm(expected)
            if off <= CONTROL_TOLERANCE * size + 1e-12:
                kept.append(i)
            else:
                why = f"SCAFFOLD control delta is {off:.3g} away from -c - update / (K lr) (norm {size:.3g})"
                replies.excluded[reply.node] = why
                log.warning("node %s: %s; left out of the round", reply.node, why)
        return kept

    def control(self, template: AdapterState) -> AdapterState:
        """The server control variate ``c`` (zeros before the first aggregation), float32."""
        return {k: self.state.get(f"{CONTROL}/{k}", torch.zeros_like(v)).float() for k, v in template.items()}
