"""Mixed LoRA ranks at the server (``adapter.client_ranks``): each node's rank, its share of the global adapter
and the layout its payloads use.

The server keeps the global factors at rank ``R = adapter.r``. A node of rank ``r_i`` is sent the first ``r_i``
rank components of every LoRA factor (:func:`fedpeft.lora.truncate`; after ``svd`` these are the top ``r_i``
singular directions, FlexLoRA's per-client truncation), encoded with its own layout, so its downlink and
uplink bytes are those of a rank-``r_i`` adapter; its reply is decoded with that layout (a payload of another
rank fails the layout's fingerprint check and is dropped). The rank follows the node's partition, which only
the in-process engine knows (the configuration refuses other engines).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedpeft import lora, models, protocol
from fedpeft.compression import Layout, make_codec
from fedpeft.config import Config
from fedpeft.errors import FedPeftError


class RankPlan:
    """Each partition's LoRA rank, and the per-rank contents and layouts of the messages."""

    def __init__(self, cfg: Config, sizes: list[int], template: models.AdapterState) -> None:
        self.ranks = lora.client_ranks(cfg.adapter.client_ranks, cfg.adapter.rank_rule, sizes)
        self.codec = make_codec(cfg.compression.downlink)  # lossless (config_rules)
        self.layouts = {r: Layout.from_state(lora.truncate(template, r)) for r in set(self.ranks)}
        self.partition_of: Callable[[int], int | None] | None = None

    def bind(self, partition_of: Callable[[int], int | None] | None) -> None:
        """Use the engine's node -> partition map (required: a node's rank is its partition's)."""
        if partition_of is None:
            raise FedPeftError("adapter.client_ranks needs an engine that knows each node's partition "
                               "(run.engine = 'inprocess'); a deployment cannot assign per-node ranks yet")
        self.partition_of = partition_of

    def rank(self, node: int) -> int:
        """The LoRA rank ``node`` trains at."""
        pid = self.partition_of(node) if self.partition_of is not None else None
        if pid is None:
            raise FedPeftError(f"node {node} has no known partition, so no LoRA rank (adapter.client_ranks)")
        return self.ranks[pid]

    def layout(self, node: int) -> Layout:
        """The layout of ``node``'s payloads (its rank's)."""
        return self.layouts[self.rank(node)]

    def contents(self, global_state: models.AdapterState, sampled: list[int], rnd: int,
                 config: dict[str, Any]) -> dict[int, protocol.RecordDict]:
        """Each sampled node's training instruction: the global adapter truncated to its rank (one content
        object per rank)."""
        by_rank: dict[int, protocol.RecordDict] = {}
        out = {}
        for node in sampled:
            r = self.rank(node)
            if r not in by_rank:
                payload = self.codec.encode(lora.truncate(global_state, r), self.layouts[r])
                by_rank[r] = protocol.train_instruction(payload, {**config, "downlink": "full", "lora-rank": r,
                                                                  "codec": self.codec.spec, "base-round": rnd - 1})
            out[node] = by_rank[r]
        return out
