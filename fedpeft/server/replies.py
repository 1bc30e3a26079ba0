"""One round's collected replies as one typed object, and the plain (non-secure) collect phase.

:class:`RoundReplies` is what every later phase reads: the aggregator (per-client decoded deltas and
weights, or under SecAgg+ only their secure mean), the privacy accountant (clip indicators), the
metrics row (bytes, timings, split-learning traffic). :func:`collect` builds it from Flower replies,
validating and decoding each one; a bad reply is dropped and logged, and the round goes on.
SecAgg+ (:mod:`fedpeft.server.secagg`) builds the same object from its secure sum.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft import protocol
from fedpeft.errors import FedPeftError, PayloadError, error_line

if TYPE_CHECKING:
    from fedpeft.compression import Codec, Layout
    from fedpeft.models import AdapterState
    from fedpeft.server.sanity import ReplyChecks

log = logging.getLogger(__name__)

UP_KEYS = ("bytes_up", "up_positions", "up_values", "up_scales", "up_header", "up_framing")
ReplyLayout = Callable[[int, dict[str, float]], "Layout"]  # (node, its reply's metrics) -> the payload's layout
SPLIT_METRICS = ("split-bytes-up", "split-bytes-down", "fl-adapter-bytes-fp32")


@dataclass(frozen=True)
class ClientReply:
    """One valid reply: its node, its decoded update (None under SecAgg+: the server never sees it),
    its FedAvg weight (num-examples) and its validated metrics."""

    node: int
    weight: float
    metrics: dict[str, float]
    delta: AdapterState | None = None
    staleness: int = 0  # FedBuff: server updates applied since the version it trained from


@dataclass
class RoundReplies:
    """Everything one round collected; ``secure_mean`` stands in for the per-client deltas under SecAgg+."""

    clients: list[ClientReply] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)  # sampled node -> why its update is not in the round
    excluded: dict[int, str] = field(default_factory=dict)  # node -> why a robust aggregator left its update out
    secure_mean: AdapterState | None = None  # SecAgg+: weighted mean of the securely summed updates
    up: dict[str, float] = field(default_factory=lambda: dict.fromkeys(UP_KEYS, 0))  # uplink byte row
    bytes_down: int = 0
    decode_ms: list[float] = field(default_factory=list)
    split: dict[str, float] = field(default_factory=dict)  # split learning: activation/gradient bytes, summed
    clip_indicators: list[float] = field(default_factory=list)  # adaptive clipping: one 0/1 per client
    secagg: dict[str, float] = field(default_factory=dict)  # SecAgg+ per-stage bytes, seconds, clipped elements
    sanity: dict[str, int] = field(default_factory=dict)  # what the sanity checks dropped or clipped

    @property
    def nodes(self) -> list[int]:
        return [c.node for c in self.clients]

    @property
    def weights(self) -> list[float]:
        return [c.weight for c in self.clients]

    @property
    def deltas(self) -> list[AdapterState]:
        """The decoded per-client updates (robust and LoRA-aware aggregators need them all)."""
        if self.secure_mean is not None:
            raise FedPeftError("under secure aggregation the server holds only the sum, not per-client updates")
        return [c.delta for c in self.clients if c.delta is not None]

    @property
    def delta_nodes(self) -> list[int]:
        """The node of each entry of :attr:`deltas`, in the same order."""
        return [c.node for c in self.clients if c.delta is not None]

    @property
    def local_epsilons(self) -> list[float]:
        return [c.metrics["epsilon-local"] for c in self.clients if "epsilon-local" in c.metrics]

    def train_loss(self) -> float | None:
        """Example-weighted mean of the clients' training losses (None when none sent one: under DP a client
        keeps it unless privacy.release_client_metrics; the sanity checks drop one out of range)."""
        sent = [c for c in self.clients if "train-loss" in c.metrics]
        if not sent:
            return None
        return float(np.average([c.metrics["train-loss"] for c in sent], weights=[c.weight for c in sent]))

    def traffic_row(self, adapter_elements: int) -> dict[str, Any]:
        """The round's byte and codec-time metrics (uplink breakdown, SecAgg+ stages, split traffic,
        downlink, dense fp32/fp16 references)."""
        encode_ms = [c.metrics.get("encode-ms", 0.0) for c in self.clients]
        n = len(self.clients)
        return {**self.up, **self.secagg, **self.split, "bytes_down": self.bytes_down,
                "bytes_up_fp32": 4 * adapter_elements * n, "bytes_up_fp16": 2 * adapter_elements * n,
                "encode_ms": float(np.mean(encode_ms)) if encode_ms else None,
                "decode_ms": float(np.mean(self.decode_ms)) if self.decode_ms else None}

    def add(self, reply: Message, uplink: Codec, layout: Layout | ReplyLayout, rnd: int,
            checks: ReplyChecks | None = None) -> None:
        """Validate and decode one Flower reply with ``layout`` (or the one for the node and its metrics: mixed LoRA
        ranks, server/ranks.py); a failed or
        malformed one is dropped and logged. ``checks`` (the sanity checks) bound the decoded values and the
        weight, and drop bad metrics."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            why = error_line(reply.error.reason or "")
            self.dropped[node] = f"failed: {why}"
            log.warning("round %d: node %s failed: %s", rnd, node, why)
            log.debug("round %d: node %s failed with:\n%s", rnd, node, reply.error.reason)
            return
        try:
            payload, metrics = protocol.parse_reply(reply.content)
            if callable(layout):
                layout = layout(node, metrics)
            t_dec = time.perf_counter()
            if checks is None:
                delta = uplink.decode(payload, layout)
            else:
                checks.check_claim(metrics)
                delta = uplink.decode(payload, layout, checks.decode_bound)
            self.decode_ms.append(1000 * (time.perf_counter() - t_dec))
        except PayloadError as e:
            self.dropped[node] = f"malformed update: {e}"
            log.warning("round %d: dropped the update of node %s: %s", rnd, node, e)
            return
        weight = metrics["num-examples"]
        if checks is not None:
            weight = checks.weight(metrics, node, rnd)
            metrics = self.checked_metrics(checks, metrics, node, rnd)
        size = protocol.record_bytes(reply.content)
        self.up["bytes_up"] += size
        for part, n in payload.breakdown().items():
            self.up[f"up_{part}"] += n
        self.up["up_framing"] += size - payload.nbytes
        if "clip-indicator" in metrics:
            self.clip_indicators.append(metrics["clip-indicator"])
        for key in SPLIT_METRICS:
            if key in metrics:
                name = key.replace("-", "_")
                self.split[name] = self.split.get(name, 0.0) + metrics[key]
        self.clients.append(ClientReply(node, weight, metrics, delta))

    def checked_metrics(self, checks: ReplyChecks, metrics: dict[str, float], node: int, rnd: int) -> dict[str, float]:
        """``metrics`` as ``checks`` keep them; counts what was dropped in the round's ``sanity`` row."""
        kept = checks.metrics(metrics, node, rnd)
        self.sanity["sanity_metrics_dropped"] = self.sanity.get("sanity_metrics_dropped", 0) + len(metrics) - len(kept)
        return kept


def collect(grid: Grid, contents: dict[int, protocol.RecordDict], rnd: int, uplink: Codec,
            layout: Layout | ReplyLayout, timeout: float | None,
            checks: ReplyChecks | None = None) -> RoundReplies:
    """Send each sampled node its instruction, wait for the replies, validate and decode them (with the
    sanity ``checks`` when given)."""
    replies = RoundReplies()
    distinct = {id(c): c for c in contents.values()}  # sampled nodes share one content per kind
    sizes = {key: protocol.record_bytes(c) for key, c in distinct.items()}
    replies.bytes_down = sum(sizes[id(c)] for c in contents.values())
    messages = [Message(content, node, protocol.TRAIN, group_id=str(rnd)) for node, content in contents.items()]
    for reply in grid.send_and_receive(messages, timeout=timeout):
        replies.add(reply, uplink, layout, rnd, checks)
    for node in contents:
        if node not in replies.dropped and node not in replies.nodes:
            replies.dropped[node] = "no reply"
    return replies
