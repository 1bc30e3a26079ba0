"""What each sampled client receives: the global adapter, or a coded delta against what it holds.

With a lossless downlink codec every sampled client gets the global adapter. With a lossy one the
server keeps what clients reconstructed and sends coded deltas; what the codec dropped stays at the
server (error feedback on the downlink) and goes out with a later message:

* ``compression.downlink_residual = "shared"``: one *broadcast state* for everyone. Clients that
  hold the previous round's broadcast state (they replied last round) get
  ``encode(global - broadcast)``; every other client gets the exact broadcast state (codec
  ``none``), which costs a full fp32 adapter each time a client returns after missing a round.
* ``"per_client"``: the server holds the state *each* client reconstructed, i.e. a residual
  ``global - state[client]`` per client, and sends every returning client
  ``encode(global - state[client])``, however many rounds it missed. Meant for clients that
  participate rarely; costs one adapter of server memory per client ever sampled.

A client's new state is committed only when it replied (proof it received the message); a client
that did not reply is forgotten and gets the exact state next time.
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft import models, protocol
from fedpeft.compression import Codec, Layout, Payload, make_codec
from fedpeft.config import Config

Content = protocol.RecordDict


class Downlink:
    """The server side of the downlink codec: per-node contents, held states, checkpoint state."""

    def __init__(self, cfg: Config, layout: Layout, global_state: models.AdapterState) -> None:
        self.codec = make_codec(cfg.compression.downlink)
        self.exact = make_codec("none")
        self.per_client = cfg.compression.downlink_residual == "per_client"
        self.layout = layout
        self.broadcast = {k: v.clone() for k, v in global_state.items()}  # shared mode
        self.held: dict[int, int] = {}  # node -> round whose state it holds
        self.states: dict[int, models.AdapterState] = {}  # per_client mode: each node's reconstruction
        self._pending: dict[int, models.AdapterState] = {}

    def contents(self, global_state: models.AdapterState, sampled: list[int], rnd: int,
                 config: dict[str, Any]) -> dict[int, Content]:
        """The training message content for each sampled node (nodes may share one content object)."""
        def content(kind: str, codec: Codec, payload: Payload, base_round: int) -> Content:
            return protocol.train_instruction(payload, {**config, "downlink": kind, "codec": codec.spec,
                                                        "base-round": base_round})

        if self.codec.lossless:
            self.broadcast = global_state
            full = content("full", self.codec, self.codec.encode(global_state, self.layout), rnd - 1)
            return {node: full for node in sampled}
        if self.per_client:
            return {node: self._per_client(global_state, node, content) for node in sampled}
        delta_payload = self.codec.encode(models.subtract(global_state, self.broadcast), self.layout)
        self.broadcast = models.add(self.broadcast, self.codec.decode(delta_payload, self.layout))
        full = content("full", self.exact, self.exact.encode(self.broadcast, self.layout), rnd - 1)
        delta = content("delta", self.codec, delta_payload, rnd - 1)
        return {node: delta if self.held.get(node) == rnd - 1 else full for node in sampled}

    def _per_client(self, global_state: models.AdapterState, node: int, content: Any) -> Content:
        if node not in self.held:
            self._pending[node] = {k: v.clone() for k, v in global_state.items()}
            return content("full", self.exact, self.exact.encode(global_state, self.layout), -1)
        held = self.states[node]
        payload = self.codec.encode(models.subtract(global_state, held), self.layout)
        self._pending[node] = models.add(held, self.codec.decode(payload, self.layout))
        return content("delta", self.codec, payload, self.held[node])

    def start_state(self, node: int) -> models.AdapterState:
        """The adapter ``node`` trained from this round (valid between :meth:`contents` and :meth:`commit`)."""
        return self._pending.get(node, self.broadcast)

    def commit(self, sampled: list[int], replied: list[int], rnd: int) -> None:
        """After the round: nodes that replied hold this round's state; other sampled nodes are forgotten."""
        if self.codec.lossless:
            return
        for node in sampled:
            self.held.pop(node, None)
            self.states.pop(node, None)
        for node in replied:
            self.held[node] = rnd
            if node in self._pending:
                self.states[node] = self._pending[node]
        self._pending.clear()

    def forget_nodes(self) -> None:
        """A new deployment run: nodes start with empty state, so none holds anything."""
        self.held.clear()
        self.states.clear()

    def state(self) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """JSON metadata and named tensor dicts for the checkpoint."""
        tensors = {"broadcast": self.broadcast}
        if self.per_client:
            tensors["downlink_states"] = {f"{node}/{k}": v for node, st in self.states.items() for k, v in st.items()}
        return {"synced": {str(k): v for k, v in self.held.items()}}, tensors

    def restore(self, meta: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of :meth:`state`."""
        self.broadcast = tensors["broadcast"]
        self.held = {int(k): int(v) for k, v in meta["synced"].items()}
        self.states = {}
        for key, value in tensors.get("downlink_states", {}).items():
            node, name = key.split("/", 1)
            self.states.setdefault(int(node), {})[name] = value
