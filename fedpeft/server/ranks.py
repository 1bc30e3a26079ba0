"""Mixed LoRA ranks at the server (``adapter.client_ranks`` or ``adapter.rank_rule = "node"``): each node's
rank, its share of the global adapter and the layout its payloads use.

The server keeps the global factors at rank ``R = adapter.r``. A node of rank ``r_i`` is sent the first ``r_i``
rank components of every LoRA factor (:func:`fedpeft.lora.truncate`; after ``svd`` these are the top ``r_i``
singular directions, FlexLoRA's per-client truncation), encoded with its own layout, so its downlink and
uplink bytes are those of a rank-``r_i`` adapter.

Where the rank comes from: ``cycle`` / ``by_size`` follow the node's partition, which only the in-process
engine knows; under ``node`` (a deployment) each node trains at its node-config ``rank`` and the server learns
it from the node's replies: a node it has not heard from is sent the whole rank-``R`` adapter. Every reply
declares its rank (metric ``lora-rank``), which must be between 1 and the rank the node was sent this round
(a node may prune its rank, HetLoRA; it cannot grow it), and its payload is decoded with that rank's layout (a
payload of another rank fails the layout's fingerprint check): a reply that breaks either is dropped and logged.
A valid reply's rank is what the node is sent from then on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fedpeft import lora, models, protocol
from fedpeft.compression import Layout, make_codec
from fedpeft.config import Config
from fedpeft.errors import FedPeftError, PayloadError
from fedpeft.server.replies import RoundReplies

RANK_METRIC = "lora-rank"  # the rank a reply declares


class RankPlan:
    """Each node's LoRA rank, and the per-rank contents and layouts of the messages."""

    def __init__(self, cfg: Config, sizes: list[int], template: models.AdapterState) -> None:
        self.rule, self.max_rank = cfg.adapter.rank_rule, cfg.adapter.r
        self.ranks = ([] if self.rule == "node" else
                      lora.client_ranks(cfg.adapter.client_ranks, self.rule, sizes))  # by partition
        self.codec = make_codec(cfg.compression.downlink)  # lossless (config_rules)
        self.template = template
        self.layouts: dict[int, Layout] = {}
        self.learned: dict[int, int] = {}  # node -> the rank of its last valid reply
        self.partition_of: Callable[[int], int | None] | None = None

    def bind(self, partition_of: Callable[[int], int | None] | None) -> None:
        """Use the engine's node -> partition map (``cycle`` / ``by_size`` need it; ``node`` needs node configs,
        which simulated nodes do not have)."""
        if self.rule == "node" and partition_of is not None:
            raise FedPeftError("adapter.rank_rule = 'node' takes each node's rank from its node config (fedpeft node "
                               "--rank R); simulated nodes have none: use adapter.rank_rule 'cycle' or 'by_size'")
        if self.rule != "node" and partition_of is None:
            raise FedPeftError(f"adapter.rank_rule = {self.rule!r} needs an engine that knows each node's partition "
                               "(run.engine = 'inprocess'); in a deployment use adapter.rank_rule = 'node' and "
                               "start each node with fedpeft node --rank R")
        self.partition_of = partition_of

    def rank(self, node: int) -> int:
        """The LoRA rank ``node`` is sent this round."""
        if node in self.learned:
            return self.learned[node]
        if self.rule == "node":
            return self.max_rank
        pid = self.partition_of(node) if self.partition_of is not None else None
        if pid is None:
            raise FedPeftError(f"node {node} has no known partition, so no LoRA rank (adapter.client_ranks)")
        return self.ranks[pid]

    def layout_of(self, r: int) -> Layout:
        """The layout of a rank-``r`` adapter."""
        if r not in self.layouts:
            self.layouts[r] = Layout.from_state(lora.truncate(self.template, r))
        return self.layouts[r]

    def layout(self, node: int) -> Layout:
        """The layout of what ``node`` is sent (its rank's)."""
        return self.layout_of(self.rank(node))

    def reply_layout(self, node: int, metrics: Mapping[str, float]) -> Layout:
        """The layout of ``node``'s reply: its declared rank's, checked against the rank it was sent."""
        sent = self.rank(node)
        declared = metrics.get(RANK_METRIC)
        if declared is None:
            raise PayloadError(f"the reply declares no {RANK_METRIC!r} (mixed LoRA ranks)")
        if declared != int(declared) or not 1 <= declared <= sent:
            raise PayloadError(f"declared {RANK_METRIC} = {declared:g} is not between 1 and the rank {sent} the "
                               "node was sent")
        return self.layout_of(int(declared))

    def learn(self, replies: RoundReplies) -> None:
        """Remember the rank of each valid reply (the shape of its decoded ``lora_A``, which the layout checked
        against the declaration)."""
        for c in replies.clients:
            if c.delta is not None:
                r = lora.adapter_rank(c.delta)
                if r:
                    self.learned[c.node] = r

    def state(self) -> dict[str, int]:
        """The learned ranks, for the checkpoint (JSON)."""
        return {str(node): r for node, r in self.learned.items()}

    def restore(self, saved: Mapping[str, int]) -> None:
        """Continue with the ranks :meth:`state` saved."""
        self.learned = {int(node): int(r) for node, r in saved.items()}

    def contents(self, global_state: models.AdapterState, sampled: list[int], rnd: int,
                 config: dict[str, Any]) -> dict[int, protocol.RecordDict]:
        """Each sampled node's training instruction: the global adapter truncated to its rank (one content
        object per rank)."""
        by_rank: dict[int, protocol.RecordDict] = {}
        out = {}
        for node in sampled:
            r = self.rank(node)
            if r not in by_rank:
                payload = self.codec.encode(lora.truncate(global_state, r), self.layout_of(r))
                by_rank[r] = protocol.train_instruction(payload, {**config, "downlink": "full", RANK_METRIC: r,
                                                                  "codec": self.codec.spec, "base-round": rnd - 1})
            out[node] = by_rank[r]
        return out
