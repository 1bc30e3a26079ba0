"""Federated evaluation: every connected node evaluates the global adapter on its own held-out split.

The server sends each node an ``evaluate`` message with the exact global adapter (codec ``none``; one content object
shared by all nodes, bytes counted per node) and, under ``exact`` / ``stack`` LoRA aggregation, the frozen
correction. Under mixed LoRA ranks (:mod:`fedpeft.server.ranks`) a node gets the adapter at the rank it trains, the
same truncation as its training instruction (one content object per rank, each node's bytes counted), so a rank-2
node downloads and evaluates a rank-2 adapter. Each node replies with counts
(:data:`fedpeft.protocol.EVAL_METRICS`); a failed or malformed reply is dropped and logged. The round's row gets the
example-weighted (token-weighted for a causal LM) ``fed_eval_loss``, ``fed_eval_accuracy`` /
``fed_eval_perplexity``, each node's value in ``fed_eval_clients``, their unweighted mean in
``fed_eval_client_mean`` and the worst of them in ``fed_eval_worst``. With a personal head
(``federation.personalization = "head"``) or share_a's own ``B`` each node evaluates the shared adapter with its own
tensors (``fed_eval_model = "personal"``). Personalization (``federation.personalization = "finetune"``) runs a
second evaluation in which each node first fine-tunes the received adapter for ``federation.personal_steps`` steps
on its own training data (seeded; the fine-tuned adapter never leaves the node and is not kept):
``personal_eval_*``.
The server draws no random numbers here and the fine-tune is seeded, so a resumed run evaluates exactly as an
uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedpeft import lora, models, protocol
from fedpeft.compression import Layout, make_codec
from fedpeft.config import Config
from fedpeft.errors import PayloadError, error_line
from fedpeft.server.ranks import RANK_METRIC, RankPlan
from fedpeft.server.sanity import ReplyChecks

log = logging.getLogger(__name__)
PERSONAL = "personal_eval"  # row key prefix of the personalized evaluation
Corrections = dict[str, ArrayRecord | ConfigRecord]  # exact / stack: the correction's records (server/loop.py)


def evaluate_instruction(global_state: models.AdapterState, layout: Layout, rnd: int,
                         correction: Corrections | None = None, personal_steps: int = 0,
                         rank: int | None = None) -> RecordDict:
    """The content of an evaluate message: the exact global adapter (under mixed ranks already truncated to
    ``rank``, which the message declares), the round, (exact / stack LoRA) the correction, and how many steps
    each client fine-tunes it on its own training data first (0: none)."""
    config: dict[str, int] = {"round": rnd, "personal-steps": personal_steps}
    if rank is not None:
        config[RANK_METRIC] = rank
    content = protocol.train_instruction(make_codec("none").encode(global_state, layout), config)
    content.update(correction or {})
    return content


def contents(global_state: models.AdapterState, layout: Layout, nodes: list[int], rnd: int,
             correction: Corrections | None, personal_steps: int = 0,
             ranks: RankPlan | None = None) -> dict[int, RecordDict]:
    """Each node's evaluate content: one for all, or under mixed ranks one per rank, the global adapter truncated
    to the rank the node trains (:meth:`RankPlan.rank`)."""
    if ranks is None:
        content = evaluate_instruction(global_state, layout, rnd, correction, personal_steps)
        return {node: content for node in nodes}
    by_rank: dict[int, RecordDict] = {}
    for r in sorted({ranks.rank(node) for node in nodes}):
        by_rank[r] = evaluate_instruction(lora.truncate(global_state, r), ranks.layout_of(r), rnd, correction,
                                          personal_steps, rank=r)
    return {node: by_rank[ranks.rank(node)] for node in nodes}


def evaluations(grid: Grid, global_state: models.AdapterState, layout: Layout, rnd: int,
                correction: Corrections | None, cfg: Config, ranks: RankPlan | None = None,
                checks: ReplyChecks | None = None) -> dict[str, Any]:
    """The round's federated evaluation: every connected node evaluates the model as received (``fed_eval_*``;
    ``fed_eval_model`` says whether that is the global model or, with share_a's own B, a personal one) and,
    with ``federation.personalization = "finetune"``, again after fine-tuning it on its own training data
    (``personal_eval_*``). ``ranks``: mixed LoRA ranks (each node gets the adapter at its own rank); ``checks``:
    the sanity checks, which bound what a node may claim (:meth:`ReplyChecks.evaluation`)."""
    nodes, timeout = sorted(grid.get_node_ids()), cfg.federation.round_timeout or None
    row = federated_evaluate(grid, contents(global_state, layout, nodes, rnd, correction, ranks=ranks), rnd,
                             cfg.model.task, timeout, checks=checks)
    own = cfg.federation.lora_aggregation == "share_a" or cfg.federation.personalization == "head"
    row["fed_eval_model"] = "personal" if own else "global"  # with the node's own B / head
    if cfg.federation.personalization == "finetune":
        sent = contents(global_state, layout, nodes, rnd, correction, cfg.federation.personal_steps, ranks)
        row.update(federated_evaluate(grid, sent, rnd, cfg.model.task, timeout, PERSONAL, checks))
        row[f"{PERSONAL}_model"] = "personal"
    return row


def federated_evaluate(grid: Grid, sent: dict[int, RecordDict], rnd: int, task: str, timeout: float | None,
                       prefix: str = "fed_eval", checks: ReplyChecks | None = None) -> dict[str, Any]:
    """Send each node its content (``sent``: node -> content) as an evaluate message; aggregate the valid replies
    (bounded by the sanity ``checks`` when given) into the row's metrics (keys ``{prefix}_loss``, ...);
    ``{prefix}_bytes_down`` adds up every node's message."""
    classification = task == "classification"
    nodes = list(sent)
    messages = [Message(content, node, protocol.EVALUATE, group_id=f"{rnd}-{prefix}")
                for node, content in sent.items()]
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
                if checks is not None:
                    counts[node] = checks.evaluation(counts[node], node, rnd)
            except PayloadError as e:
                counts.pop(node, None)
                dropped[node] = f"malformed evaluate reply: {e}"
        if node in dropped:
            log.warning("round %d: evaluation of node %s dropped: %s", rnd, node, dropped[node])
    for node in nodes:
        if node not in counts and node not in dropped:
            dropped[node] = "no reply"
    size = {id(c): protocol.record_bytes(c) for c in sent.values()}  # one serialization per content object
    row: dict[str, Any] = {"replies": len(counts), "bytes_down": sum(size[id(c)] for c in sent.values()),
                           "bytes_up": bytes_up}
    if dropped:
        row["dropped"] = {str(node): why for node, why in sorted(dropped.items())}
    if counts:
        row.update(aggregate(counts, classification))
    return {f"{prefix}_{k}": v for k, v in row.items()}


def aggregate(counts: dict[int, dict[str, float]], classification: bool) -> dict[str, Any]:
    """Example-weighted loss and accuracy (token-weighted loss and perplexity for a causal LM) over the nodes,
    each node's accuracy (loss for a causal LM), their unweighted mean (each client counts once) and the
    worst node's (keys without the row's prefix)."""
    weight = sum(c["eval-weight"] for c in counts.values())
    loss = sum(c["eval-loss-sum"] for c in counts.values()) / weight
    row: dict[str, Any] = {"loss": loss, "examples": int(sum(c["num-examples"] for c in counts.values()))}
    if classification:
        row["accuracy"] = sum(c["eval-correct"] for c in counts.values()) / row["examples"]
        per_node = {str(n): c["eval-correct"] / c["num-examples"] for n, c in sorted(counts.items())}
        row["worst"] = min(per_node.values())
    else:
        row["perplexity"] = math.exp(min(loss, 50.0))
        per_node = {str(n): c["eval-loss-sum"] / c["eval-weight"] for n, c in sorted(counts.items())}
        row["worst"] = max(per_node.values())
    row["client_mean"] = sum(per_node.values()) / len(per_node)
    row["clients"] = per_node
    return row
