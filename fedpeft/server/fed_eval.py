"""Federated evaluation: every connected node evaluates the global adapter on its own held-out split.

The server sends each node an ``evaluate`` message with the exact global adapter (codec ``none``; one
content object shared by all nodes, bytes counted per node) and, under ``exact`` LoRA aggregation, the
frozen correction. Each node replies with counts (:data:`fedpeft.protocol.EVAL_METRICS`); a failed or
malformed reply is dropped and logged. The round's row gets the example-weighted (token-weighted for a
causal LM) ``fed_eval_loss``, ``fed_eval_accuracy`` / ``fed_eval_perplexity``, each node's value in
``fed_eval_clients`` and the worst of them in ``fed_eval_worst``. Nothing here draws random numbers, so a
resumed run evaluates exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedpeft import models, protocol
from fedpeft.compression import Layout, make_codec
from fedpeft.errors import PayloadError, error_line

log = logging.getLogger(__name__)


def evaluate_instruction(global_state: models.AdapterState, layout: Layout, rnd: int,
                         correction: ArrayRecord | None = None) -> RecordDict:
    """The content of an evaluate message: the exact global adapter, the round and (exact LoRA) the correction."""
    content = protocol.train_instruction(make_codec("none").encode(global_state, layout), {"round": rnd})
    if correction is not None:
        content[protocol.CORRECTION] = correction
    return content


def federated_evaluate(grid: Grid, nodes: list[int], content: RecordDict, rnd: int, task: str,
                       timeout: float | None) -> dict[str, Any]:
    """Send ``content`` to ``nodes`` as evaluate messages; aggregate the valid replies into the row's metrics."""
    classification = task == "classification"
    messages = [Message(content, node, protocol.EVALUATE, group_id=f"{rnd}-eval") for node in nodes]
    counts: dict[int, dict[str, float]] = {}
    dropped: dict[int, str] = {}
    bytes_up = 0
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            dropped[node] = f"failed: {error_line(reply.error.reason or '')}"
        else:
            try:
                counts[node] = protocol.parse_evaluate_reply(reply.content, classification)
                bytes_up += protocol.record_bytes(reply.content)
            except PayloadError as e:
                dropped[node] = f"malformed evaluate reply: {e}"
        if node in dropped:
            log.warning("round %d: evaluation of node %s dropped: %s", rnd, node, dropped[node])
    for node in nodes:
        if node not in counts and node not in dropped:
            dropped[node] = "no reply"
    row: dict[str, Any] = {"fed_eval_replies": len(counts),
                           "fed_eval_bytes_down": len(nodes) * protocol.record_bytes(content),
                           "fed_eval_bytes_up": bytes_up}
    if dropped:
        row["fed_eval_dropped"] = {str(node): why for node, why in sorted(dropped.items())}
    if counts:
        row.update(aggregate(counts, classification))
    return row


def aggregate(counts: dict[int, dict[str, float]], classification: bool) -> dict[str, Any]:
    """Example-weighted loss and accuracy (token-weighted loss and perplexity for a causal LM) over the nodes,
    each node's accuracy (loss for a causal LM) and the worst node's."""
    weight = sum(c["eval-weight"] for c in counts.values())
    loss = sum(c["eval-loss-sum"] for c in counts.values()) / weight
    row: dict[str, Any] = {"fed_eval_loss": loss, "fed_eval_examples": int(sum(c["num-examples"]
                                                                               for c in counts.values()))}
    if classification:
        row["fed_eval_accuracy"] = sum(c["eval-correct"] for c in counts.values()) / row["fed_eval_examples"]
        per_node = {str(n): c["eval-correct"] / c["num-examples"] for n, c in sorted(counts.items())}
        row["fed_eval_worst"] = min(per_node.values())
    else:
        row["fed_eval_perplexity"] = math.exp(min(loss, 50.0))
        per_node = {str(n): c["eval-loss-sum"] / c["eval-weight"] for n, c in sorted(counts.items())}
        row["fed_eval_worst"] = max(per_node.values())
    row["fed_eval_clients"] = per_node
    return row
