"""The Flower ClientApp. One data holder: apply the received global adapter, train on the local
partition, reply with the (compressed) adapter delta and metrics; for federated evaluation, evaluate
the received global adapter (after a few steps of local fine-tuning, with personalization) on the node's
own held-out split and reply with counts.

The partition comes from the node config (``partition-id``), or a deployed node trains on all of
its own file (node config ``data-path``, read with the scenario's data settings) less its held-out
split (``data.client_eval_fraction``); the run configuration comes from the run config
(``fedpeft-config``). The base model is loaded once per
process (the engine's ``runtime.RuntimeCache``, see ``clients.node_runtime``).
Error-feedback residuals and (with a lossy downlink codec) the last broadcast state live in
``context.state``, which Flower keeps per node across rounds. In a simulation with an ``[adversary]``
section, an attacking client's attack hooks in at one point (its data, its delta or its metrics; see
:mod:`fedpeft.adversary`); every other client runs the honest no-op hooks.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from torch.utils.data import Dataset

from fedpeft import adversary, config, lora, models, privacy, protocol, scaffold, tracking, update
from fedpeft.clients import node_runtime, node_store, secagg
from fedpeft.compression import Layout, make_codec
from fedpeft.errors import ConfigError, PayloadError, PrivacyError
from fedpeft.progress import step_writer
from fedpeft.runtime import Runtime
from fedpeft.split.plugin import split_of
from fedpeft.training import client_seed, evaluate_counts, num_local_steps, set_threads, train_local

app = ClientApp()
log = logging.getLogger(__name__)
EF_STATE = "fedpeft.error-feedback"
LOCAL_DP_STATE = "fedpeft.local-dp"
BROADCAST_STATE, BROADCAST_ROUND = "fedpeft.broadcast", "fedpeft.broadcast-round"
SCAFFOLD_STATE = "fedpeft.scaffold"  # SCAFFOLD: this node's control variate c_i
PERSONAL_STATE = "fedpeft.personal"  # adapter tensors that never leave the node (share_a's B)
RANK_STATE = "fedpeft.lora-rank"  # mixed ranks: the rank this node pruned itself to (adapter.rank_prune_decay)
STORE_STATE = "fedpeft.node-store"  # node config state-dir: this Flower run already looked for a stored state
#: what a node store keeps across Flower runs (the lossy-downlink copy belongs to the old run's broadcasts)
STORED = (EF_STATE, LOCAL_DP_STATE, SCAFFOLD_STATE, PERSONAL_STATE, RANK_STATE)
NEWEST_ROUND = 2**62  # node_store.load(..., before_round=NEWEST_ROUND): the newest stored state of any round


def _arrays(record: object) -> dict:
    """The arrays of a node-state ArrayRecord (written by this app)."""
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"node state holds a {type(record).__name__}, not an ArrayRecord")
    return {k: v.numpy() for k, v in record.items()}


def _record(state: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(np.asarray(v))) for k, v in state.items()})


def receive_global(msg: Message, context: Context, layout: Layout, downlink_spec: str) -> models.AdapterState:
    """The adapter to start from: a full state, or the stored broadcast state plus a coded delta."""
    instruction = protocol.config_record(msg.content)
    kind, spec = protocol.text(instruction, "downlink"), protocol.text(instruction, "codec")
    configured = make_codec(downlink_spec)
    if spec not in (configured.spec, "none"):
        raise PayloadError(f"downlink codec {spec!r} is neither the configured {configured.spec!r} nor 'none'")
    decoded = make_codec(spec).decode(protocol.record_payload(msg.content[protocol.GLOBAL]), layout)
    if kind == "full":
        state = decoded
    elif kind == "delta":
        held = (int(protocol.number(protocol.config_record(context.state, BROADCAST_ROUND), "round"))
                if BROADCAST_ROUND in context.state else None)
        base = int(protocol.number(instruction, "base-round"))
        if held != base:
            raise PayloadError(f"downlink delta is against round {base}, this node holds {held}; the server will "
                               "send the full state next time")
        stored = _arrays(context.state[BROADCAST_STATE])
        state = {k: v + torch.from_numpy(stored[k]) for k, v in decoded.items()}
    else:
        raise PayloadError(f"unknown downlink kind {kind!r}")
    if not configured.lossless:
        context.state[BROADCAST_STATE] = _record({k: v.numpy() for k, v in state.items()})
        context.state[BROADCAST_ROUND] = ConfigRecord({"round": int(protocol.number(instruction, "round"))})
    return state


def receive_correction(msg: Message, global_state: models.AdapterState) -> dict[str, torch.Tensor]:
    """``exact`` / ``stack``'s frozen per-module correction sent with the instruction (none before the first
    aggregation), each module dense or as factors of the rank its record declares (:func:`lora.correction_wire`)."""
    record = msg.content.get(protocol.CORRECTION)
    if record is None:
        return {}
    shapes = lora.correction_shapes(global_state)
    declared = protocol.config_record(msg.content, lora.CORRECTION_RANKS)
    if set(declared) != set(shapes):
        raise PayloadError(f"{lora.CORRECTION_RANKS} names {sorted(declared)[:3]}, not the LoRA modules")
    ranks = {}
    for name, (rows, cols) in shapes.items():
        k = protocol.number(declared, name)
        if k != int(k) or not 0 <= k <= min(rows, cols):
            raise PayloadError(f"{lora.CORRECTION_RANKS}[{name!r}] = {k:g} is not a rank of a {rows} x {cols} matrix")
        ranks[name] = int(k)
    decoded = make_codec("none").decode(protocol.record_payload(record), lora.correction_layout(global_state, ranks))
    return lora.correction_from_wire(decoded, ranks)


@app.train(mods=[secagg.client_mod])  # SecAgg+ rounds go through Flower's secaggplus_mod
def train(msg: Message, context: Context) -> Message:
    """Train on the local partition starting from the received global adapter."""
    t0 = time.perf_counter()
    cfg = config.from_run_config(context.run_config)
    set_threads(cfg.run.threads, workers=int(context.run_config.get("workers", 1)))
    data_path = str(context.node_config.get("data-path", "")) or None  # a deployed node's own data file
    rt = node_runtime(cfg, context)
    split = split_of(rt)  # before the layout: with split learning only the client side travels
    partition_id = int(context.node_config.get("partition-id", 0)) if data_path else int(
        context.node_config["partition-id"])
    instruction = protocol.config_record(msg.content)
    rnd = int(protocol.number(instruction, "round"))
    _restore(context, rt, cfg, partition_id, rnd)
    rank = _rank(cfg, rt, partition_id, context)
    if rank is None:
        global_state = receive_global(msg, context, rt.layout, cfg.compression.downlink)
    else:  # the server sends this node's rank once it knows it, the whole adapter before (rank_rule = node)
        sent = _sent_rank(instruction, cfg)
        rank = min(rank, sent)
        global_state = lora.truncate(receive_global(msg, context, _rank_layout(rt, sent), cfg.compression.downlink),
                                     rank)
    layout = rt.layout if rank is None else _rank_layout(rt, rank)
    if cfg.federation.lora_aggregation in lora.CORRECTED:
        lora.set_correction(rt.model, receive_correction(msg, global_state))
    attacker = adversary.attack_for(cfg, partition_id, _simulated(context))
    dataset = attacker.data(rt.client_dataset(0 if data_path else partition_id), rt, partition_id)
    n_examples = len(dataset)  # type: ignore[arg-type]  # a map-style dataset: sized
    seed = client_seed(int(protocol.number(instruction, "seed")), rnd, partition_id)
    local_dp = None
    limit = float(context.node_config.get("max-epsilon", 0.0))  # the node's own limit (fedpeft node --max-epsilon)
    if limit > 0 and cfg.privacy.mode not in ("local", "both"):
        raise PrivacyError(f"this node trains only under record-level DP-SGD within epsilon {limit:g} (node config "
                           f"max-epsilon); the run's privacy.mode = {cfg.privacy.mode!r}: refused")
    if cfg.privacy.mode in ("local", "both"):
        local_dp = privacy.LocalDP(cfg.privacy, dataset_size=n_examples, batch_size=cfg.train.batch_size,
                                   total_steps=cfg.federation.rounds * num_local_steps(cfg.train, n_examples),
                                   seed=seed if _simulated(context) else None, max_epsilon=limit)
        if LOCAL_DP_STATE in context.state:
            local_dp.load_state_dict(json.loads(str(context.state[LOCAL_DP_STATE]["json"])))
    extra: dict[str, float] = {}
    codec = make_codec(cfg.compression.uplink)
    controls = _controls(msg, context, layout) if cfg.federation.strategy == "scaffold" else None
    if split is not None:  # SplitFed: train through the split server's body; only the client side travels
        result, state, split_metrics = split.train_round(f"node-{context.node_id}", dataset, global_state, seed)
        extra.update(split_metrics)
    else:
        # with this node's personal tensors (at their init the first time); a lower rank zero-padded to the model's
        start = _with_personal(rt, context, global_state if rank is None else lora.pad(global_state, cfg.adapter.r))
        models.set_adapter_state(rt.model, start)
        result = train_local(rt.model, dataset, rt.collate, cfg.train, rt.device, seed=seed,
                             proximal_mu=protocol.number(instruction, "proximal-mu"), dp=local_dp,
                             fisher=codec.wants_fisher, step_every=cfg.tracking.step_every,
                             grad_hook=None if controls is None else _corrector(rt.model, *controls),
                             on_step=getattr(context, "on_step", None)  # the in-process engine's progress
                             or step_writer(context.run_config, rnd, context.node_id))  # Ray's (progress.py)
        extra.update(tracking.step_metrics(result.step_log))
        state = models.adapter_state(rt.model)
        if rank is not None:  # the components beyond the rank stayed at zero (zero gradients)
            state = lora.truncate(state, rank)
            if cfg.adapter.rank_prune_decay > 0:  # HetLoRA self-pruning: drop small trailing components
                new = lora.pruned_rank(state, rank, cfg.adapter.rank_prune_decay, cfg.adapter.rank_prune_threshold)
                if new < rank:
                    rank, layout = new, _rank_layout(rt, new)
                    state, global_state = lora.truncate(state, rank), lora.truncate(global_state, rank)
                    context.state[RANK_STATE] = ConfigRecord({"rank": rank})
            extra["lora-rank"] = rank  # the server decodes the reply with this rank's layout
        personal = {k: v for k, v in state.items() if k not in global_state}
        if personal:
            context.state[PERSONAL_STATE] = _record({k: v.numpy() for k, v in personal.items()})
        state = {k: v for k, v in state.items() if k in global_state}  # the model's order, as before
    delta = attacker.update(models.subtract(state, global_state), seed)  # before EF / clip / encode: any codec
    if local_dp is not None:
        context.state[LOCAL_DP_STATE] = ConfigRecord({"json": json.dumps(local_dp.state_dict())})
        extra["epsilon-local"] = local_dp.epsilon()
    ef = update.error_feedback(codec, cfg.compression.error_feedback)
    if ef is not None and EF_STATE in context.state and not instruction.get(protocol.EF_RESET, False):
        ef.load_state_dict(_arrays(context.state[EF_STATE]))
    clip = protocol.number(instruction, "clip-norm") if cfg.privacy.mode in ("client", "both") else None
    fisher = result.fisher if rank is None or result.fisher is None else lora.truncate(result.fisher, rank)
    enc = update.encode_update(delta, codec, layout, rng=np.random.default_rng(seed), fisher=fisher, ef=ef, clip=clip)
    if ef is not None:
        context.state[EF_STATE] = _record(ef.state_dict())
    if controls is not None:  # SCAFFOLD: c_i += Δc_i of the update as sent; the server derives the same Δc_i
        c, ci = controls
        dc = scaffold.control_delta(c, enc.sent, result.steps, cfg.train.lr)
        context.state[SCAFFOLD_STATE] = _record({k: (ci[k] + dc[k]).numpy() for k in ci})
    if enc.clip_indicator is not None and enc.update_norm is not None:  # client-level DP clipped the update
        extra.update({"clip-indicator": enc.clip_indicator, "update-norm": enc.update_norm})
    metrics = {"num-examples": result.num_examples, "train-loss": result.loss, "train-steps": result.steps,
               "train-seconds": result.seconds, "encode-ms": enc.encode_ms,
               "client-seconds": time.perf_counter() - t0, "partition-id": partition_id, **extra}
    if protocol.hides_metrics(cfg.privacy):
        metrics = protocol.public_metrics(metrics)
    _persist(context, rnd)
    return Message(protocol.train_reply(enc.payload, attacker.metrics(metrics)), reply_to=msg)


def _simulated(context: Context) -> bool:
    """Whether this node is a simulated one (seeded DP-SGD noise, the adversary harness): the run config says so
    and the node is not a deployed one (``fedpeft node`` sets ``deployed`` in its node config, which the server
    cannot change; a SuperNode started otherwise should set it too: docs/deploy.md)."""
    return bool(context.run_config.get("simulation", False)) and not context.node_config.get("deployed", False)


def _store(context: Context) -> tuple[Path, str] | None:
    """(state directory, run name) when this node keeps its state on disk (node config ``state-dir``, from
    ``fedpeft node --state-dir``); the run name is the run directory's, which a resumed run keeps."""
    state_dir, run_dir = str(context.node_config.get("state-dir", "")), str(context.run_config.get("run-dir", ""))
    return (Path(state_dir), Path(run_dir).name) if state_dir and run_dir else None


def _restore(context: Context, rt: Runtime, cfg: config.Config, partition_id: int, rnd: int) -> None:
    """At a Flower run's first message to this node: load its newest stored state from before round ``rnd``
    (:mod:`fedpeft.clients.node_store`) into the empty node state; a file that does not fit this run is refused
    with a warning, and the node starts fresh."""
    where = _store(context)
    if where is None or STORE_STATE in context.state or any(k in context.state for k in STORED):
        return  # no store, already looked, or the engine restored the node state itself (in-process checkpoint)
    context.state[STORE_STATE] = ConfigRecord({"round": rnd})
    try:
        newest = node_store.load(*where, context.node_id, NEWEST_ROUND)
        # usually the newest file is before round rnd, and is the one to restore: read it once
        saved = newest if newest is None or newest.round < rnd else node_store.load(*where, context.node_id, rnd)
        _keep_spent(context, newest, saved)
        if saved is None:
            return
        for rec, values in saved.configs.items():
            if rec == LOCAL_DP_STATE and rec in context.state:
                continue  # _keep_spent took a newer accountant
            if rec in STORED:
                context.state[rec] = ConfigRecord(values)
        rank = _rank(cfg, rt, partition_id, context)  # a stored self-pruned rank shapes the rest
        full = rt.full_state(rt.initial_adapter())
        shapes = {k: tuple(v.shape) for k, v in (full if rank is None else lora.truncate(full, rank)).items()}
        node_store.check_shapes(saved, {PERSONAL_STATE: shapes, SCAFFOLD_STATE: shapes,
                                        EF_STATE: shapes})
        for rec, arrays in saved.arrays.items():
            if rec in STORED:
                context.state[rec] = _record(arrays)
        log.info("node %d: restored its state of round %d from %s", context.node_id, saved.round, where[0])
    except (node_store.NodeStateError, ConfigError, PayloadError) as e:
        for rec in STORED:
            context.state.pop(rec, None)
        log.warning("node %d starts with fresh client state: %s", context.node_id, e)


def _keep_spent(context: Context, newest: node_store.NodeState | None, saved: node_store.NodeState | None) -> None:
    """Local DP: the accountant of the ``newest`` stored round, also of a round after ``saved`` (the resumed run
    trains it again). That round's update was sent, so its DP-SGD steps stay charged, and charged again when
    retrained: a node's accountant never rolls back."""
    if newest is None or LOCAL_DP_STATE not in newest.configs or (saved is not None and newest.round <= saved.round):
        return
    context.state[LOCAL_DP_STATE] = ConfigRecord(newest.configs[LOCAL_DP_STATE])
    log.warning("node %d: its DP-SGD accountant continues from round %d, which the resumed run trains again (those "
                "steps are charged twice)", context.node_id, newest.round)


def _persist(context: Context, rnd: int) -> None:
    """Write this node's state after training round ``rnd`` to its store (when it keeps one)."""
    where = _store(context)
    if where is None:
        return
    state = node_store.NodeState(rnd)
    for rec in STORED:
        record = context.state.get(rec)
        if isinstance(record, ArrayRecord):
            state.arrays[rec] = _arrays(record)
        elif isinstance(record, ConfigRecord):
            state.configs[rec] = dict(record)
    node_store.save(*where, context.node_id, state)


def _with_personal(rt: Runtime, context: Context, global_state: models.AdapterState) -> models.AdapterState:
    """The whole adapter to load: the global tensors plus this node's personal ones (node state; at their init
    the first time)."""
    state = rt.full_state(global_state)
    if PERSONAL_STATE in context.state:
        state.update({k: torch.tensor(v) for k, v in _arrays(context.state[PERSONAL_STATE]).items()})
    return state


def _controls(msg: Message, context: Context, layout: Layout) -> tuple[models.AdapterState, models.AdapterState]:
    """SCAFFOLD: the server's control variate ``c`` (sent with the instruction) and this node's ``c_i`` (node
    state, zero at first)."""
    record = msg.content.get(protocol.CONTROL)
    if record is None:
        raise PayloadError(f"a SCAFFOLD instruction must carry {protocol.CONTROL!r}")
    c = make_codec("none").decode(protocol.record_payload(record), layout)
    if SCAFFOLD_STATE not in context.state:
        return c, {k: torch.zeros_like(v) for k, v in c.items()}
    return c, {k: torch.tensor(v) for k, v in _arrays(context.state[SCAFFOLD_STATE]).items()}


def _corrector(model: torch.nn.Module, c: models.AdapterState, ci: models.AdapterState) -> Callable[[], None]:
    """The gradient hook of SCAFFOLD's local steps: every gradient += c - c_i."""
    pairs = [(p, c[n] - ci[n]) for n, p in model.named_parameters() if p.requires_grad and n in c]

    def correct() -> None:
        for p, d in pairs:
            if p.grad is not None:
                p.grad.add_(d.to(p.grad.device, p.grad.dtype))
    return correct


def _rank(cfg: config.Config, rt: Runtime, partition_id: int, context: Context) -> int | None:
    """This client's LoRA rank under mixed ranks (its partition's, or its node config's ``rank`` under
    adapter.rank_rule = node; lower once it pruned itself), else None (the model's)."""
    if not lora.mixed_ranks(cfg.adapter.client_ranks, cfg.adapter.rank_rule):
        return None
    if cfg.adapter.rank_rule == "node":
        own = context.node_config.get("rank", cfg.adapter.r)
        if isinstance(own, bool) or not isinstance(own, int) or not 1 <= own <= cfg.adapter.r:
            raise ConfigError(f"node config rank = {own!r}: expected an integer between 1 and adapter.r = "
                              f"{cfg.adapter.r} (the server's rank)")
    else:
        sizes = [len(p) for p in rt.partitions]
        own = lora.client_ranks(cfg.adapter.client_ranks, cfg.adapter.rank_rule, sizes)[partition_id]
    if RANK_STATE in context.state:
        own = min(own, int(protocol.number(protocol.config_record(context.state, RANK_STATE), "rank")))
    return own


def _sent_rank(instruction: ConfigRecord, cfg: config.Config) -> int:
    """The rank of the adapter a mixed-rank message carries (``lora-rank``), checked against ``adapter.r``."""
    sent = int(protocol.number(instruction, "lora-rank"))
    if not 1 <= sent <= cfg.adapter.r:
        raise PayloadError(f"instruction lora-rank = {sent} is not between 1 and adapter.r = {cfg.adapter.r}")
    return sent


def _rank_layout(rt: Runtime, rank: int) -> Layout:
    """The layout of a rank-``rank`` share of the adapter (mixed ranks)."""
    return Layout.from_state(lora.truncate(rt.initial_adapter(), rank))


def _local_eval(rt: Runtime, dataset: Dataset, cfg: config.Config) -> dict[str, float]:
    """The counts of this node's held-out split (one seam, so tests can make a node misbehave)."""
    return evaluate_counts(rt.model, dataset, rt.collate, cfg.train.eval_batch_size, rt.device, cfg.model.task,
                           cfg.train.precision)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter (with this node's personal tensors, if any) on the node's own
    held-out split (data.client_eval_fraction); reply with counts the server can add up."""
    cfg = config.from_run_config(context.run_config)
    if protocol.hides_metrics(cfg.privacy):  # the server refuses this too (config_rules); a node does not rely on it
        raise PrivacyError("federated evaluation under DP sends this node's exact evaluation counts, which the run's "
                           "configuration keeps on the node (privacy.release_client_metrics = false): refused")
    set_threads(cfg.run.threads, workers=int(context.run_config.get("workers", 1)))
    data_path = str(context.node_config.get("data-path", "")) or None
    rt = node_runtime(cfg, context)
    pid = 0 if data_path else int(context.node_config["partition-id"])
    instruction = protocol.config_record(msg.content)
    _restore(context, rt, cfg, pid, int(protocol.number(instruction, "round")))
    payload = protocol.record_payload(msg.content[protocol.GLOBAL])
    rank = _rank(cfg, rt, pid, context)
    if rank is None:
        global_state = make_codec("none").decode(payload, rt.layout)
    else:  # mixed ranks: the adapter at the rank this node trains (as its train message), zero-padded to the model's
        sent = _sent_rank(instruction, cfg)
        global_state = lora.pad(lora.truncate(make_codec("none").decode(payload, _rank_layout(rt, sent)),
                                              min(rank, sent)), cfg.adapter.r)
    if cfg.federation.lora_aggregation in lora.CORRECTED:
        lora.set_correction(rt.model, receive_correction(msg, global_state))
    models.set_adapter_state(rt.model, _with_personal(rt, context, global_state))
    steps = int(protocol.number(instruction, "personal-steps")) if "personal-steps" in instruction else 0
    steps = min(steps, cfg.federation.personal_steps) if cfg.federation.personalization == "finetune" else 0
    if steps > 0:  # personalization: fine-tune a copy on this node's own training data; it never leaves the node
        rnd = int(protocol.number(instruction, "round"))
        train_local(rt.model, rt.client_dataset(pid), rt.collate, cfg.train, rt.device,
                    seed=client_seed(cfg.run.seed, rnd, pid), steps=steps)
    return Message(protocol.evaluate_reply(_local_eval(rt, rt.client_eval_dataset(pid), cfg)), reply_to=msg)
