"""Buffered asynchronous FL (FedBuff, Nguyen et al. 2022) on the virtual clock or on a real deployment.

Clients train at their own pace: ``federation.concurrency`` of them are always in flight, each from the
global adapter of the moment it was sent. The server takes replies in order of arrival (simulated time on the
in-process engine's :class:`~fedpeft.simulation.clocked.ClockedGrid`; real time on any other Grid, pushed and
pulled through Flower's Message API by :class:`~fedpeft.server.async_grid.LiveFlights`) and, whenever
``federation.buffer_size`` (K) valid updates have arrived, applies one update through the configured mean-based
aggregator; each applied update is a "round" of metrics.jsonl. A freed slot is refilled at once with the adapter
of that moment; replies that arrive together are taken together first (so equal speeds with K = all clients is
synchronous FedAvg, update for update).

Staleness: an update trained from version v and applied at version t has staleness tau = t - v and enters
the mean scaled by ``1 / (1 + tau) ** federation.staleness_exponent`` (0.5 in the paper). The example
weights stay as they are, so the step is sum_i w_i s_i delta_i / sum_i w_i: with uniform weights exactly
FedBuff's (1/K) sum_i s_i delta_i, with tau = 0 FedAvg's weighted mean. A client whose error-feedback
residual was made more than ``federation.max_staleness`` versions ago is told to start from zero.

Observers (the privacy audit's capture, :mod:`fedpeft.audit.capture`) see every update of the buffer as the
server decoded it, after the sanity screen and before the staleness weighting (the server's own scaling), with the
global adapter its client was sent; its ``round`` is the round that message carried (so the client's seeded
sampler replays), ``metrics["staleness"]`` says how many updates later it was applied.

Client-level DP, SecAgg+, split learning, exact/svd LoRA aggregation, federated evaluation and lossy
downlinks are refused (:func:`fedpeft.simulation.clock.check_async`); local DP-SGD is accounted by each client
as in synchronous runs. Replies are validated and decoded as in synchronous rounds (a bad one is dropped and
logged, and its node gets no new message in that update).
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
from fedpeft.models import AdapterState
from fedpeft.runtime import PROCESS_RUNTIMES, RuntimeCache
from fedpeft.server.async_grid import LiveFlights
from fedpeft.server.loop import FederatedServer, ObservedUpdate, Observer, connected_nodes
from fedpeft.server.replies import RoundReplies
from fedpeft.server.sanity import screen_norms
from fedpeft.simulation.clock import CLIENTS_FILE

log = logging.getLogger(__name__)


def staleness_weight(tau: int, exponent: float) -> float:
    """FedBuff's down-weighting of an update ``tau`` server updates old."""
    return float((1.0 + tau) ** -exponent)


class BufferedServer(FederatedServer):
    """The federated server with FedBuff's buffered asynchronous rounds: on the in-process engine's virtual clock
    (its :class:`~fedpeft.simulation.clocked.ClockedGrid`) or on real time on any other Flower Grid
    (:class:`~fedpeft.server.async_grid.LiveFlights`)."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, observers: Sequence[Observer] = (),
                 runtimes: RuntimeCache = PROCESS_RUNTIMES, simulation: bool = False) -> None:
        self.dispatched: dict[int, int] = {}  # node in flight -> the version it trains from
        self.residual_version: dict[int, int] = {}  # node -> the version its error-feedback residual was made at
        self.async_row: dict[str, Any] = {}
        self.sent_states: dict[int, AdapterState] = {}  # with observers: version -> the adapter sent as it
        self.flights: Any = None  # the ClockedGrid itself, or LiveFlights around a real Grid
        super().__init__(cfg, run_dir, resume=resume, observers=observers, runtimes=runtimes, simulation=simulation)
        fed = cfg.federation
        self.concurrency = fed.concurrency or fed.clients_per_round or cfg.data.num_clients

    def extra_state(self) -> dict[str, Any]:
        return {"fedbuff": {"dispatched": {str(k): v for k, v in self.dispatched.items()},
                            "residual_version": {str(k): v for k, v in self.residual_version.items()}}}

    def restore_extra(self, extra: dict[str, Any]) -> None:
        state = extra.get("fedbuff", {})
        self.dispatched = {int(k): int(v) for k, v in state.get("dispatched", {}).items()}
        self.residual_version = {int(k): int(v) for k, v in state.get("residual_version", {}).items()}

    def run(self, grid: Grid) -> None:
        """Run on the clock (replies in flight resume with it) or on real time (those of a previous run are
        gone; a deployment's nodes also lost their residuals)."""
        if hasattr(grid, "dispatch"):
            self.flights = grid
        else:
            self.flights = LiveFlights(grid, self.cfg.federation.round_timeout or None, self.run_dir / CLIENTS_FILE,
                                       self.cfg.federation.poll_interval)
            self.dispatched.clear()
            if not hasattr(grid, "load_node_states"):
                self.residual_version.clear()
        super().run(grid)

    def _fill(self, grid: Grid, rnd: int, refused: set[int], replies: RoundReplies) -> list[int]:
        """Send the adapter of version ``rnd - 1`` to idle nodes until ``concurrency`` are in flight (seeded
        choice; not to nodes that failed this round); counts the bytes sent in ``replies``; returns the nodes.
        With nothing in flight it first waits for nodes as a synchronous round does (federation.node_wait_timeout
        in the first round, at most 10 s later)."""
        fed = self.cfg.federation
        nodes = sorted(grid.get_node_ids())
        if not self.dispatched and len(nodes) < self.concurrency:
            patience = fed.node_wait_timeout if rnd == self.first_round else min(fed.node_wait_timeout, 10.0)
            nodes = connected_nodes(grid, self.concurrency, patience)
        idle = [n for n in nodes if n not in self.dispatched and n not in refused]
        want = min(self.concurrency - len(self.dispatched), len(idle))
        if want <= 0:
            return []
        chosen = sorted(int(n) for n in self.rng.choice(idle, size=want, replace=False)) if want < len(idle) else idle
        version, bound = rnd - 1, fed.max_staleness
        contents = self._instructions(chosen, rnd)
        sizes = {id(c): protocol.record_bytes(c) for c in contents.values()}  # nodes share one content
        for node in chosen:
            if bound and version - self.residual_version.get(node, version) > bound:
                contents[node] = _with_reset(contents[node])
                sizes[id(contents[node])] = protocol.record_bytes(contents[node])
            self.dispatched[node] = self.residual_version[node] = version
            replies.bytes_down += sizes[id(contents[node])]
        if self.observers:
            self.sent_states.setdefault(version, self.downlink.start_state(chosen[0]))  # lossless: one state
        self.flights.dispatch([Message(contents[n], n, protocol.TRAIN, group_id=str(rnd)) for n in chosen])
        return chosen

    def _gather(self, grid: Grid, rnd: int) -> tuple[list[int], RoundReplies]:
        """Take replies in arrival order until K valid updates are in the buffer, refilling freed slots."""
        k, version, flights = self.cfg.federation.buffer_size, rnd - 1, self.flights
        replies, refused = RoundReplies(), set[int]()
        sent = self._fill(grid, rnd, refused, replies)
        while len(replies.clients) < k:
            reply = flights.next_reply()
            if reply is None:  # nothing left in flight: apply what arrived (the quorum guard decides)
                break
            while True:
                node = reply.metadata.src_node_id
                start = self.dispatched.pop(node)
                before = len(replies.clients)
                replies.add(reply, self.uplink, self.layout, rnd, self.checks)
                if len(replies.clients) > before:
                    replies.clients[-1] = replace(replies.clients[-1], staleness=version - start)
                else:
                    refused.add(node)
                if len(replies.clients) >= k or not flights.arrives_now():
                    break
                reply = flights.next_reply()
            if len(replies.clients) < k:
                sent += self._fill(grid, rnd, refused, replies)
        if self.checks is not None:
            replies.sanity.update(screen_norms(replies, self.global_state, self.cfg.sanity, rnd))
        if self.observers:
            self._observe(replies, rnd)
        exponent = self.cfg.federation.staleness_exponent
        replies.clients = [c if c.delta is None else replace(c, delta={
            key: v * staleness_weight(c.staleness, exponent) for key, v in c.delta.items()}) for c in replies.clients]
        stale = [c.staleness for c in replies.clients]
        self.async_row = {"staleness_mean": float(np.mean(stale)) if stale else None,
                          "staleness_max": max(stale) if stale else None, "in_flight": len(self.dispatched),
                          "buffered": [[c.node, _partition(c.metrics), c.staleness] for c in replies.clients]}
        return sent, replies

    def _observe(self, replies: RoundReplies, rnd: int) -> None:
        """Hand each buffered update to the observers (see the module docstring); forget the adapters no reply
        in flight trained from. An update whose adapter is unknown (sent before a resume) is not observed."""
        version = rnd - 1
        for c in replies.clients:
            start = version - c.staleness
            sent = self.sent_states.get(start)
            if c.delta is None or sent is None:
                log.info("update %d: node %s's update (version %d) is not observed: its adapter is unknown",
                         rnd, c.node, start)
                continue
            for observe in self.observers:
                observe(ObservedUpdate(start + 1, c.node, int(c.metrics.get("partition-id", -1)), sent, c.delta,
                                       {**c.metrics, "staleness": float(c.staleness)}))
        waiting = set(self.dispatched.values())
        self.sent_states = {v: state for v, state in self.sent_states.items() if v in waiting}

    def run_round(self, grid: Grid, rnd: int) -> dict[str, Any]:
        """One applied update (K arrivals); the row also holds the staleness of what was applied."""
        row = super().run_round(grid, rnd)
        row.update(self.async_row)
        return row


def _partition(metrics: dict[str, float]) -> int | None:
    """The partition a reply says it trained on (validated by the sanity checks; absent under DP)."""
    return int(metrics["partition-id"]) if "partition-id" in metrics else None


def _with_reset(content: RecordDict) -> RecordDict:
    """A node's own copy of a shared instruction, telling it to drop its error-feedback residual."""
    records = {name: record for name, record in content.items()}
    records[protocol.CONFIG] = ConfigRecord({**dict(protocol.config_record(content)), protocol.EF_RESET: True})
    return RecordDict(records)
