"""Buffered asynchronous FL (FedBuff, Nguyen et al. 2022) on the in-process engine's virtual clock.

Clients train at their own pace: ``federation.concurrency`` of them are always in flight, each from the
global adapter of the moment it was sent. The server takes replies in order of arrival (simulated time,
:class:`~fedpeft.simulation.clocked.ClockedGrid`) and, whenever ``federation.buffer_size`` (K) valid updates
have arrived, applies one update through the configured mean-based aggregator; each applied update is a
"round" of metrics.jsonl. A freed slot is refilled at once with the adapter of that moment; replies that
arrive at the same instant are taken together first (so equal speeds with K = all clients is synchronous
FedAvg, update for update).

Staleness: an update trained from version v and applied at version t has staleness tau = t - v and enters
the mean scaled by ``1 / (1 + tau) ** federation.staleness_exponent`` (0.5 in the paper). The example
weights stay as they are, so the step is sum_i w_i s_i delta_i / sum_i w_i: with uniform weights exactly
FedBuff's (1/K) sum_i s_i delta_i, with tau = 0 FedAvg's weighted mean. A client whose error-feedback
residual was made more than ``federation.max_staleness`` versions ago is told to start from zero.

Client-level DP, SecAgg+, split learning, exact/svd LoRA aggregation, federated evaluation and lossy
downlinks are refused (:func:`fedpeft.simulation.clock.check_async`); local DP-SGD is accounted by each client
as in synchronous runs. The real-deployment path (a Grid that keeps messages in flight) is not built.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedpeft import protocol
from fedpeft.config import Config
from fedpeft.errors import ConfigError
from fedpeft.runtime import PROCESS_RUNTIMES, RuntimeCache
from fedpeft.server.loop import FederatedServer, Observer
from fedpeft.server.replies import RoundReplies
from fedpeft.server.sanity import screen_norms

log = logging.getLogger(__name__)


def staleness_weight(tau: int, exponent: float) -> float:
    """FedBuff's down-weighting of an update ``tau`` server updates old."""
    return float((1.0 + tau) ** -exponent)


class BufferedServer(FederatedServer):
    """The federated server with FedBuff's buffered asynchronous rounds (needs the clocked in-process grid)."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, observers: Sequence[Observer] = (),
                 runtimes: RuntimeCache = PROCESS_RUNTIMES) -> None:
        self.dispatched: dict[int, int] = {}  # node in flight -> the version it trains from
        self.residual_version: dict[int, int] = {}  # node -> the version its error-feedback residual was made at
        self.async_row: dict[str, Any] = {}
        super().__init__(cfg, run_dir, resume=resume, observers=observers, runtimes=runtimes)
        fed = cfg.federation
        self.concurrency = fed.concurrency or fed.clients_per_round or cfg.data.num_clients

    def extra_state(self) -> dict[str, Any]:
        return {"fedbuff": {"dispatched": {str(k): v for k, v in self.dispatched.items()},
                            "residual_version": {str(k): v for k, v in self.residual_version.items()}}}

    def restore_extra(self, extra: dict[str, Any]) -> None:
        state = extra.get("fedbuff", {})
        self.dispatched = {int(k): int(v) for k, v in state.get("dispatched", {}).items()}
        self.residual_version = {int(k): int(v) for k, v in state.get("residual_version", {}).items()}

    def _fill(self, grid: Any, rnd: int, refused: set[int], replies: RoundReplies) -> list[int]:
        """Send the adapter of version ``rnd - 1`` to idle nodes until ``concurrency`` are in flight (seeded
        choice; not to nodes that failed this round); counts the bytes sent in ``replies``; returns the nodes."""
        idle = [n for n in sorted(grid.get_node_ids()) if n not in self.dispatched and n not in refused]
        want = min(self.concurrency - len(self.dispatched), len(idle))
        if want <= 0:
            return []
        chosen = sorted(int(n) for n in self.rng.choice(idle, size=want, replace=False)) if want < len(idle) else idle
        version, bound = rnd - 1, self.cfg.federation.max_staleness
        contents = self._instructions(chosen, rnd)
        sizes = {id(c): protocol.record_bytes(c) for c in contents.values()}  # nodes share one content
        for node in chosen:
            if bound and version - self.residual_version.get(node, version) > bound:
                contents[node] = _with_reset(contents[node])
                sizes[id(contents[node])] = protocol.record_bytes(contents[node])
            self.dispatched[node] = self.residual_version[node] = version
            replies.bytes_down += sizes[id(contents[node])]
        grid.dispatch([Message(contents[n], n, protocol.TRAIN, group_id=str(rnd)) for n in chosen])
        return chosen

    def _gather(self, server_grid: Grid, rnd: int) -> tuple[list[int], RoundReplies]:
        """Take replies in arrival order until K valid updates are in the buffer, refilling freed slots."""
        grid: Any = server_grid  # a ClockedGrid (simulation/clocked.py): dispatch, next_reply, pending
        if not hasattr(grid, "dispatch"):
            raise ConfigError("federation.buffer_size (FedBuff) needs run.engine = 'inprocess' with devices.clock")
        k, version = self.cfg.federation.buffer_size, rnd - 1
        replies, refused, stale = RoundReplies(), set[int](), []
        sent = self._fill(grid, rnd, refused, replies)
        while len(replies.clients) < k:
            reply = grid.next_reply()
            if reply is None:  # nothing left in flight: apply what arrived (the quorum guard decides)
                break
            while True:
                node = reply.metadata.src_node_id
                start = self.dispatched.pop(node)
                before = len(replies.clients)
                replies.add(reply, self.uplink, self.layout, rnd, self.checks)
                if len(replies.clients) > before:
                    stale.append(version - start)
                else:
                    refused.add(node)
                if len(replies.clients) >= k or not _arrives_now(grid):
                    break
                reply = grid.next_reply()
            if len(replies.clients) < k:
                sent += self._fill(grid, rnd, refused, replies)
        if self.checks is not None:
            replies.sanity.update(screen_norms(replies, self.global_state, self.cfg.sanity, rnd))
        exponent = self.cfg.federation.staleness_exponent
        taus = dict(zip([c.node for c in replies.clients], stale))
        replies.clients = [c if c.delta is None else replace(c, delta={
            key: v * staleness_weight(taus[c.node], exponent) for key, v in c.delta.items()}) for c in replies.clients]
        self.async_row = {"staleness_mean": float(np.mean(stale)) if stale else None,
                          "staleness_max": max(stale) if stale else None, "in_flight": len(self.dispatched)}
        return sent, replies

    def run_round(self, grid: Grid, rnd: int) -> dict[str, Any]:
        """One applied update (K arrivals); the row also holds the staleness of what was applied."""
        row = super().run_round(grid, rnd)
        row.update(self.async_row)
        return row


def _arrives_now(grid: Any) -> bool:
    """Whether the next reply in flight arrives at the clock's current time (taken in the same batch)."""
    return bool(grid.pending) and grid.pending[0].finish <= grid.sim_time


def _with_reset(content: RecordDict) -> RecordDict:
    """A node's own copy of a shared instruction, telling it to drop its error-feedback residual."""
    records = {name: record for name, record in content.items()}
    records[protocol.CONFIG] = ConfigRecord({**dict(protocol.config_record(content)), protocol.EF_RESET: True})
    return RecordDict(records)
