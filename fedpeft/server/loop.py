"""The federated round loop, run inside the Flower ServerApp on any ``Grid``.

A round reads as phases, like Flower's ``Strategy.start``: **sample** connected nodes (seeded; the RNG
state is checkpointed) -> **instruct** them (the global adapter through the downlink codec,
:mod:`fedpeft.server.downlink`) -> **collect** the replies into one
:class:`~fedpeft.server.replies.RoundReplies` (validated and decoded; a bad reply is dropped and
logged, the round goes on; under SecAgg+ a secure sum, :mod:`fedpeft.server.secagg`) -> **aggregate**
with the registered aggregator (:mod:`fedpeft.server.aggregators`) if the quorum guard passes ->
**account** privacy -> **evaluate** on the server's held-out set and/or on every node's own held-out split
(federated, :mod:`fedpeft.server.fed_eval`) -> **record** one JSON line in
``metrics.jsonl`` and the checkpoint. The sanity checks (:mod:`fedpeft.server.sanity`) bound each reply
in collect, screen the updates' norms before aggregation and guard the new global adapter after it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from safetensors.torch import save_file

from fedpeft import export, generation, lora, models, protocol, tracking
from fedpeft.adversary import Ledger
from fedpeft.compression import make_codec
from fedpeft.config import Config
from fedpeft.errors import ConfigError, FedPeftError, PayloadError
from fedpeft.privacy import check_privacy
from fedpeft.privacy.server_dp import LEDGER_FILE, ServerPrivacy
from fedpeft.privacy.tuning import noise_hint
from fedpeft.privacy.tuning import suggestions as dp_suggestions
from fedpeft.report import METRICS_FILE
from fedpeft.runtime import PROCESS_RUNTIMES, RuntimeCache
from fedpeft.server import checkpoint, fed_eval
from fedpeft.server.aggregators import make_aggregator
from fedpeft.server.aggregators.scaffold import Scaffold
from fedpeft.server.downlink import Downlink
from fedpeft.server.ranks import RankPlan
from fedpeft.server.replies import RoundReplies, collect
from fedpeft.server.sanity import ReplyChecks, global_problem, metric_ranges, screen_norms
from fedpeft.split.plugin import split_of
from fedpeft.training import evaluate, num_local_steps

log = logging.getLogger(__name__)
SANITY_COUNTS = ("sanity_dropped", "sanity_clipped", "sanity_metrics_dropped", "global_rejected")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def connected_nodes(grid: Grid, wanted: int, patience: float) -> list[int]:
    """The connected nodes, sorted, once ``wanted`` are connected or after ``patience`` seconds (simulated
    seconds on the virtual clock, whose grid waits by itself)."""
    wait = getattr(grid, "wait_for_nodes", None)
    if wait is not None:
        return sorted(wait(wanted, patience))
    deadline = time.time() + patience
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < wanted and time.time() < deadline:
        time.sleep(1.0)
        nodes = sorted(grid.get_node_ids())
    return nodes


@dataclass(frozen=True)
class ObservedUpdate:
    """One client's update exactly as the server decoded it, with what it was trained from (under SecAgg+
    the unmasked mean of the sum instead: ``node`` and ``partition_id`` -1, ``metrics["summed"]`` clients).

    What an honest-but-curious server holds (the privacy audit attacks these); nothing here is
    ground truth: ``partition_id`` only lets an audit score an attack against that client's data.
    """

    round: int
    node: int
    partition_id: int
    start_state: models.AdapterState
    delta: models.AdapterState
    metrics: dict[str, float]


Observer = Callable[[ObservedUpdate], None]


class FederatedServer:
    """Owns the global adapter, the aggregator, client sampling and the run directory.

    ``observers`` are called with every valid decoded update (before aggregation); in-process only.
    ``simulation``: the run is an experiment whose DP noise may come from ``run.seed`` (reproducible); a
    deployment's noise comes from the operating system's entropy (:mod:`fedpeft.privacy.server_dp`).
    """

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, observers: Sequence[Observer] = (),
                 runtimes: RuntimeCache = PROCESS_RUNTIMES, simulation: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.observers = list(observers)
        self.rt = runtimes.get(cfg)  # data first: the privacy check needs the partition sizes, not the model
        self.split = split_of(self.rt)  # split learning plugs in here (None without it)
        check_privacy(cfg.privacy, cfg.data.num_clients, cfg.federation.clients_per_round, cfg.federation.rounds,
                      min(len(p) for p in self.rt.partitions), batch_size=cfg.train.batch_size,
                      local_steps=cfg.train.local_steps or None)
        for line in dp_suggestions(cfg):
            log.warning(line)
        self.global_state = self.rt.initial_adapter()
        hint = noise_hint(cfg, sum(t.numel() for t in self.global_state.values()))
        if hint is not None:
            log.log(logging.WARNING if hint[0] else logging.INFO, hint[1])
        self.layout = self.rt.layout
        self.uplink = make_codec(cfg.compression.uplink)
        self.downlink = Downlink(cfg, self.layout, self.global_state)
        self.rng = np.random.default_rng(cfg.run.seed)
        self.privacy = ServerPrivacy(cfg, seeded=simulation, ledger=run_dir / LEDGER_FILE)
        self.aggregator = make_aggregator(cfg.federation, self.privacy)
        if isinstance(self.aggregator, Scaffold):  # derives each client's control delta from its update
            self.aggregator.population, self.aggregator.train = cfg.data.num_clients, cfg.train
        self.aggregator.seed = cfg.run.seed
        self.ranks = (RankPlan(cfg, [len(p) for p in self.rt.partitions], self.global_state)
                      if lora.mixed_ranks(cfg.adapter.client_ranks, cfg.adapter.rank_rule)
                      else None)  # mixed LoRA ranks (server/ranks.py)
        self.lora_row: dict[str, float | None] = {}  # this round's lora_agg_error (and svd's truncation error)
        self.adversary = Ledger(cfg, self.rt)  # the simulated attackers, recorded (never aggregated by)
        self.secagg = None
        if cfg.privacy.secure_aggregation == "secaggplus":  # the server sees only the sum (server/secagg.py)
            from fedpeft.server.secagg import SecureAggregator

            self.secagg = SecureAggregator(cfg, self.layout, max(len(p) for p in self.rt.partitions))
        self.checks = self._reply_checks() if cfg.sanity.enabled else None
        self.round = 0
        self.first_round = 1
        self.applied = 0  # rounds of this process that changed the global adapter
        self.not_applied: Counter[str] = Counter()  # why the other rounds did not (one line per kind)
        self.not_applied_example: dict[str, str] = {}  # kind -> the first round's details
        self.started = time.time()
        self.tracker: tracking.Tracker | None = None
        if self.split is not None:
            self.split.reset()
        if resume:
            self._restore()

    def _reply_checks(self) -> ReplyChecks:
        """The per-reply sanity checks; the exclusive weight cap must leave room for every partition."""
        largest = max(len(p) for p in self.rt.partitions)
        if largest >= self.cfg.sanity.max_num_examples:
            raise ConfigError(f"sanity.max_num_examples = {self.cfg.sanity.max_num_examples} must exceed the "
                              f"largest partition ({largest} examples): the cap is exclusive")
        elements = sum(p.numel() for p in self.rt.model.parameters())
        return ReplyChecks(self.cfg.sanity, metric_ranges(self.cfg, largest, elements), largest)

    # ---- persistence -------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoint"

    def _restore(self) -> None:
        """Continue from the newest verified checkpoint (see :mod:`fedpeft.server.checkpoint`)."""
        checkpoint.recover(self.checkpoint_dir, self.run_dir / METRICS_FILE, self.cfg)
        ckpt = checkpoint.load(self.checkpoint_dir)
        try:
            self.layout.check(ckpt.tensors["global"])
        except PayloadError as e:
            raise FedPeftError(f"the checkpoint in {self.checkpoint_dir} does not fit this run's adapter: "
                               f"{e}") from None
        self.global_state = ckpt.tensors["global"]
        if self.split is not None and "split_body" in ckpt.tensors:  # in-process split body: adapters + optimizer
            self.split.restore(ckpt.tensors["split_body"], ckpt.extra["split_body"])
        self.aggregator.load_state_dict(ckpt.tensors["optimizer"], int(ckpt.extra["optimizer_t"]))
        self.rng.bit_generator.state = ckpt.rng_state
        self.downlink.restore(ckpt.extra, ckpt.tensors)
        self.privacy.restore(ckpt.extra["privacy"], ckpt.tensors["privacy"])
        self.round = ckpt.round
        self.started = time.time() - float(ckpt.extra.get("elapsed", 0.0))
        self.restore_extra(ckpt.extra)
        if self.ranks is not None:
            self.ranks.restore(ckpt.extra.get("lora_ranks", {}))
        log.info("resumed from round %d", self.round)

    def extra_state(self) -> dict[str, Any]:
        """JSON state a subclass adds to the checkpoint (FedBuff: the clients in flight)."""
        return {}

    def restore_extra(self, extra: dict[str, Any]) -> None:
        """Continue from what :meth:`extra_state` saved."""

    def _save(self, grid: Grid) -> None:
        agg_state, t = self.aggregator.state_dict()
        privacy_meta, privacy_tensors = self.privacy.state()
        downlink_meta, downlink_tensors = self.downlink.state()
        tensors = {"global": self.global_state, "optimizer": agg_state, "privacy": privacy_tensors, **downlink_tensors}
        extra = {"elapsed": time.time() - self.started, "optimizer_t": t, "privacy": privacy_meta, **downlink_meta,
                 **self.extra_state()}
        if self.ranks is not None:  # the ranks learned from the replies (self-pruned, node configs)
            extra["lora_ranks"] = self.ranks.state()
        split_state = self.split.state() if self.split is not None else None
        if split_state is not None:  # the in-process split body's adapters and optimizer
            tensors["split_body"], extra["split_body"] = split_state
        ckpt = checkpoint.ServerCheckpoint(round=self.round, tensors=tensors,
                                           rng_state=dict(self.rng.bit_generator.state), extra=extra)
        save_nodes = getattr(grid, "save_node_states", None)  # the in-process engine keeps client state
        checkpoint.save(ckpt, self.checkpoint_dir, self.run_dir / METRICS_FILE, self.cfg.to_toml(),
                        None if save_nodes is None else lambda tmp: save_nodes(tmp / "nodes"))

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, grid: Grid) -> None:
        """Run the remaining rounds, then write the final adapter and the report."""
        self.first_round = self.round + 1
        if self.round:
            load_nodes = getattr(grid, "load_node_states", None)  # the in-process engine keeps client state
            if load_nodes is not None:
                load_nodes(self.checkpoint_dir / "nodes")
            else:  # a new deployment run: nodes start with empty state, so none holds a broadcast state; the
                self.downlink.forget_nodes()  # LoRA ranks learned from their replies (node ids persist) are kept
        partition_of = getattr(grid, "partition_of", None)  # the in-process engine knows each node's partition
        if self.ranks is not None:
            self.ranks.bind(partition_of)
        if self.checks is not None and partition_of is not None:
            sizes = [len(p) for p in self.rt.partitions]
            held = [len(p) for p in self.rt.client_eval_partitions]
            self.checks.partition_size = lambda node: None if (pid := partition_of(node)) is None else sizes[pid]
            self.checks.eval_size = lambda node: None if (pid := partition_of(node)) is None else held[pid]
        self.tracker = tracking.for_run(self.cfg, self.run_dir, max(len(p) for p in self.rt.partitions))
        try:
            for rnd in range(self.round + 1, self.cfg.federation.rounds + 1):
                self._record(grid, rnd, self.run_round(grid, rnd))
        finally:
            if self.tracker is not None:
                self.tracker.close()
        self.finish()
        if not self.applied and self.not_applied:
            causes = "; ".join(f"{why} ({n}x, e.g. {self.not_applied_example[why]})"
                               for why, n in self.not_applied.most_common(3))
            state = "holds no client's update (only DP noise)" if self.privacy.active else "is unchanged"
            raise FedPeftError(f"no client update was applied in rounds {self.first_round}-{self.round}, the "
                               f"global adapter {state}: {causes}")

    def _record(self, grid: Grid, rnd: int, row: dict[str, Any]) -> None:
        """Append the round's row to metrics.jsonl; checkpoint every output.checkpoint_every rounds and last."""
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before a checkpoint commits it
        if self.tracker is not None:
            self.tracker.round(row)
        self.round = rnd
        if rnd % self.cfg.output.checkpoint_every == 0 or rnd == self.cfg.federation.rounds:
            self._save(grid)

    def _sample(self, grid: Grid, rnd: int) -> list[int]:
        """Seeded sample of the connected nodes (Poisson under client-level DP, else a fixed size). Waits up
        to node_wait_timeout for enough nodes in the first round (and after a resume); later rounds wait at
        most 10 s, so a node that died does not stall every round."""
        fed = self.cfg.federation
        wanted = fed.clients_per_round or self.cfg.data.num_clients
        patience = fed.node_wait_timeout if rnd == self.first_round else min(fed.node_wait_timeout, 10.0)
        nodes = connected_nodes(grid, wanted, patience)
        if len(nodes) < fed.min_clients:
            raise FedPeftError(f"only {len(nodes)} node(s) connected after {patience:.0f} s; "
                               f"federation.min_clients = {fed.min_clients}")
        # the eligible population is whoever is connected now; under client-level DP the accountant is
        # charged this round's real rate (privacy/sampling.py)
        return self.privacy.sample(self.rng, nodes).clients

    def _instructions(self, sampled: list[int], rnd: int) -> dict[int, protocol.RecordDict]:
        """The training message content for each sampled node (see :mod:`fedpeft.server.downlink`)."""
        base = {"round": rnd, "seed": self.cfg.run.seed, "clip-norm": self.privacy.clip_norm,
                "proximal-mu": self.aggregator.proximal_mu}
        contents = (self.downlink.contents(self.global_state, sampled, rnd, base) if self.ranks is None
                    else self.ranks.contents(self.global_state, sampled, rnd, base))
        records: dict[str, Any] = dict(self._correction_records())
        if isinstance(self.aggregator, Scaffold):  # the server control variate, dense fp32
            records[protocol.CONTROL] = protocol.payload_record(make_codec("none").encode(
                self.aggregator.control(self.global_state), self.layout))
        for content in {id(c): c for c in contents.values()}.values():  # one per content object
            content.update({key: record for key, record in records.items() if record is not None})
        return contents

    def _correction_records(self) -> dict[str, ArrayRecord | ConfigRecord]:
        """``exact`` / ``stack``'s frozen correction, each module dense or as factors when fewer bytes
        (:func:`fedpeft.lora.correction_wire`; fp32), with the record of each module's rank (none before the first
        aggregation and in other modes)."""
        correction = self.aggregator.correction()
        if correction is None:
            return {}
        wire, ranks = lora.correction_wire(correction)
        payload = make_codec("none").encode(wire, lora.correction_layout(self.global_state, ranks))
        declared: dict[str, Any] = dict(ranks)  # module -> rank (0: dense)
        return {protocol.CORRECTION: protocol.payload_record(payload), lora.CORRECTION_RANKS: ConfigRecord(declared)}

    def _collect(self, grid: Grid, contents: dict[int, protocol.RecordDict], rnd: int) -> RoundReplies:
        """Send the instructions and collect the replies: decoded per client, or a secure sum (SecAgg+)."""
        if self.secagg:
            replies = self.secagg.run_round(grid, contents, rnd, self.checks)  # checks: the cleartext metrics
            if replies.secure_mean is not None:  # all the server holds: the mean, no node (-1), no partition (-1)
                for observe in self.observers:
                    observe(ObservedUpdate(rnd, -1, -1, self.downlink.broadcast, replies.secure_mean,
                                           {"summed": float(len(replies.clients))}))
            return replies
        layout = self.layout if self.ranks is None else self.ranks.reply_layout
        replies = collect(grid, contents, rnd, self.uplink, layout,
                          self.cfg.federation.round_timeout or None, self.checks)
        if self.ranks is not None:
            self.ranks.learn(replies)
        if self.checks is not None:
            replies.sanity.update(screen_norms(replies, self.global_state, self.cfg.sanity, rnd,
                                               relative=not self.privacy.active))  # DP clips to C instead
        for c, delta in zip(replies.clients, replies.deltas):
            for observe in self.observers:
                observe(ObservedUpdate(rnd, c.node, int(c.metrics.get("partition-id", -1)),
                                       self.downlink.start_state(c.node), delta, dict(c.metrics)))
        return replies

    def _aggregate(self, replies: RoundReplies, rnd: int) -> float | None:
        """Step the global adapter with the aggregator if enough valid updates arrived (the quorum guard; under
        client-level DP the noised release happens whatever arrived, see :meth:`_below_quorum`); returns the
        round's example-weighted training loss (None when the round is skipped)."""
        if self._below_quorum(replies, rnd):
            log.warning("round %d: %d valid update(s) < federation.min_clients = %d; global adapter unchanged",
                        rnd, len(replies.clients), self.cfg.federation.min_clients)
            self._not_applied(f"{len(replies.clients)} valid update(s) < federation.min_clients = "
                              f"{self.cfg.federation.min_clients}", self._why(replies))
            return None
        saved, t = self.aggregator.state_dict()
        saved = {k: v.clone() for k, v in saved.items()}  # buffers are updated in place
        self.lora_row = self._naive_lora_error(replies)
        new_state = self.aggregator.aggregate(replies, self.global_state)
        self.lora_row.update(self.aggregator.metrics)
        problem = global_problem(new_state, self.cfg.sanity.max_global_value if self.cfg.sanity.enabled else math.inf)
        if problem is not None:
            log.warning("round %d: the new global adapter is not applied (%s); global adapter unchanged", rnd, problem)
            self.aggregator.load_state_dict(saved, t)
            replies.sanity["global_rejected"] = 1
            self._not_applied("the new global adapter was rejected by the sanity bounds", problem)
            return None
        self.global_state = new_state
        if replies.clients:
            self.applied += 1
        else:  # client-level DP released the noise alone (_below_quorum)
            self._not_applied("0 valid updates: client-level DP released the noise alone", self._why(replies))
        return replies.train_loss()

    def _below_quorum(self, replies: RoundReplies, rnd: int) -> bool:
        """Whether the round is skipped for fewer than ``federation.min_clients`` valid updates. Not under
        client-level DP: whether a round is skipped would depend on who took part (with Poisson sampling, on
        which clients exist), a release the accountant does not charge; DP-FedAvg releases the noised sum of
        whatever arrived (the noise alone when nothing did), which it does charge."""
        few = len(replies.clients) < self.cfg.federation.min_clients
        if few and self.privacy.active:
            log.info("round %d: %d valid update(s) < federation.min_clients = %d; client-level DP releases the "
                     "noised sum anyway", rnd, len(replies.clients), self.cfg.federation.min_clients)
            return False
        return few

    def _naive_lora_error(self, replies: RoundReplies) -> dict[str, float | None]:
        """``lora_agg_error`` of factor averaging (docs/lora-aggregation.md) under ``naive`` (the exact and svd
        aggregators report their own), from the individual updates: not under SecAgg+ (there are none) nor
        client-level DP (it would release an un-noised function of them)."""
        if self.cfg.federation.lora_aggregation != "naive" or replies.secure_mean is not None or self.privacy.active:
            return {}
        error = lora.agg_error(lora.pair_means(replies.deltas, replies.weights, self.global_state))
        return {} if error is None else {"lora_agg_error": error}

    @staticmethod
    def _why(replies: RoundReplies) -> str:
        """The most common reason the round's sampled clients sent no valid update."""
        whys = Counter(replies.dropped.values()).most_common(1)
        return whys[0][0] if whys else "no client was sampled"

    def _not_applied(self, kind: str, details: str) -> None:
        """Count a round that left the global adapter unchanged, by kind (the first details kept)."""
        self.not_applied[kind] += 1
        self.not_applied_example.setdefault(kind, details)

    def _account(self, replies: RoundReplies) -> dict[str, float]:
        """Privacy metrics: client-level DP is charged every round (the noised release happens whatever
        arrived, :meth:`_below_quorum`); local DP-SGD reports the largest client epsilon."""
        row = self.privacy.end_round(replies.clip_indicators) if self.privacy.active else {}
        if self.secagg is not None and self.secagg.ddp is not None:  # charged whether or not the sum was released
            row.update(self.privacy.charge_distributed(self.secagg.ddp.accounted_noise_multiplier))
        if replies.local_epsilons:
            row["epsilon_local"] = max(replies.local_epsilons)
        return row

    def _gather(self, grid: Grid, rnd: int) -> tuple[list[int], RoundReplies]:
        """Sample, instruct and collect: the nodes asked and their replies (FedBuff overrides this)."""
        sampled = self._sample(grid, rnd)
        replies = self._collect(grid, self._instructions(sampled, rnd), rnd)
        self.downlink.commit(sampled, replies.nodes, rnd)
        return sampled, replies

    def run_round(self, grid: Grid, rnd: int) -> dict[str, Any]:
        """One round: sample, instruct, collect, aggregate, account, evaluate; returns its metrics row."""
        t0, sim_start = time.time(), getattr(grid, "sim_time", None)  # the in-process virtual clock, if on
        sampled, replies = self._gather(grid, rnd)
        row: dict[str, Any] = {"round": rnd, "sampled": len(sampled), "replies": len(replies.clients),
                               "dropped": len(replies.dropped)}
        self.lora_row = {}
        row["train_loss"] = self._aggregate(replies, rnd)
        if self.cfg.tracking.step_every:  # the clients' sampled step logs (tracking.py)
            row["step_logs"] = tracking.round_step_logs(
                replies.clients, num_local_steps(self.cfg.train, self.cfg.sanity.max_num_examples),
                self.cfg.sanity.max_loss, rnd)
        row.update(self.lora_row)
        if self.ranks is not None:  # each valid reply's LoRA rank (its node's or self-pruned)
            row["lora_ranks"] = {str(n): self.ranks.learned[n] for n in replies.nodes if n in self.ranks.learned}
        if self.checks is not None or replies.sanity:
            row.update({**dict.fromkeys(SANITY_COUNTS, 0), **replies.sanity})
        for key, nodes in (("dropped_nodes", replies.dropped), ("excluded_nodes", replies.excluded)):
            if nodes:  # node -> why its update is not in the round / was left out by a robust aggregator
                row[key] = {str(node): why for node, why in nodes.items()}
        row.update(self._account(replies))
        row.update(self.adversary.round_row(replies, grid))
        if rnd % self.cfg.federation.eval_every == 0 or rnd == self.cfg.federation.rounds:
            if self.cfg.federation.evaluation != "federated":
                row.update(self.evaluate())
                row.update(generation.evaluate_round(self.rt, self.cfg, self.run_dir, rnd))  # [generation]
            if self.cfg.federation.evaluation != "server":
                row.update(self.federated_evaluate(grid, rnd))
        row.update({**replies.traffic_row(self.layout.total),
                    "seconds": round(time.time() - t0, 3), "elapsed": round(time.time() - self.started, 3),
                    "peak_rss_mb": round(peak_rss_mb(), 1)})
        if sim_start is not None:  # simulated seconds (simulation/clock.py): this round's and since the start
            row.update(sim_seconds=round(grid.sim_time - sim_start, 6), sim_time=round(grid.sim_time, 6))  # type: ignore[attr-defined]
        log.info("round %d: %s", rnd, row)
        return row

    def model_state(self) -> models.AdapterState | None:
        """The whole adapter of the model being trained; with split learning the client side plus the
        in-process body's adapters (None with a remote split server: its adapters live there)."""
        if self.split is None:  # share_a: the clients' personal B is not here; the global model has B at its init
            return self.rt.full_state(self.global_state)
        return self.split.model_state(self.global_state)

    def evaluate(self) -> dict[str, float]:
        """Centralized evaluation of the global adapter on the held-out set."""
        state = self.model_state()
        if state is None:
            log.info("remote split server: the body's adapters are not here; centralized evaluation skipped")
            return {}
        models.set_adapter_state(self.rt.model, state)
        if self.cfg.federation.lora_aggregation in lora.CORRECTED:
            lora.set_correction(self.rt.model, self.aggregator.correction() or {})
        return {**evaluate(self.rt.model, self.rt.eval_dataset, self.rt.collate, self.cfg.train.eval_batch_size,
                           self.rt.device, self.cfg.model.task, self.cfg.train.precision),
                **self.adversary.evaluate(self.rt.model)}

    def federated_evaluate(self, grid: Grid, rnd: int) -> dict[str, Any]:
        """Every connected node evaluates the global adapter on its own held-out split, and with personalization
        a fine-tuned copy of it (server/fed_eval.py)."""
        return fed_eval.evaluations(grid, self.global_state, self.layout, rnd, self._correction_records(), self.cfg,
                                    self.ranks, self.checks)

    def finish(self) -> None:
        """Write the final adapter (a peft adapter usable outside fedpeft, see :mod:`fedpeft.export`; with a
        remote split server only its client side), summary.md and plots."""
        from fedpeft import report

        state = self.model_state()
        if state is None:
            (self.run_dir / "adapter").mkdir(exist_ok=True)
            save_file(self.global_state, str(self.run_dir / "adapter" / export.SPLIT_CLIENT_FILE))
        else:
            export.save_run_adapter(self.rt.model, state, self.run_dir / "adapter", self.cfg,
                                    list(self.rt.examples.label_names), self.rt.tokenizer)
        correction = self.aggregator.correction()
        if correction is not None:  # exact: part of the global model that peft's adapter format cannot hold
            save_file({k: v.float().contiguous() for k, v in correction.items()},
                      str(self.run_dir / "adapter" / lora.CORRECTION_FILE))
        report.write_run_report(self.run_dir, self.cfg)

