"""The in-process engine on the virtual clock: messages take simulated time, late replies are lost.

:class:`ClockedGrid` is the in-process grid with a clock (``devices.clock = true``). Each message is
delivered at the grid's current simulated time ``sim_time``; the client runs at once (in this process),
and its reply is stamped with the time it would arrive (:mod:`fedpeft.simulation.clock`: the exact
serialized bytes of the message and the reply over the client's links, its compute time). Two ways to
wait for replies:

- :meth:`send_and_receive` (synchronous rounds, SecAgg+ stages, federated evaluation): all messages leave
  now; the call returns the replies that arrive within ``timeout`` simulated seconds, and the clock moves
  to the last of them (or to the deadline when an awaited client is late or gone). A late reply is lost,
  as in a deployment whose round timed out.
- :meth:`dispatch` and :meth:`next_reply` (buffered asynchronous FL): replies queue by arrival time and
  the server takes them one at a time, the clock moving to each arrival.

With an availability trace only the clients online at ``sim_time`` are listed (:meth:`get_node_ids`), the
server waits for clients in simulated time (:meth:`wait_for_nodes`), and a client that goes offline before
its reply arrives answers "went offline" at that moment.

Every message is one line of ``RUN/clients.jsonl`` (an :class:`~fedpeft.simulation.clock.Event`). The
clock's time, the lines written and the replies still in flight are saved with the node states, so a
resumed run continues on the same clock.
"""

from __future__ import annotations

import heapq
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedpeft import protocol
from fedpeft.config import Config
from fedpeft.runtime import RuntimeCache
from fedpeft.simulation import clock
from fedpeft.simulation.inprocess import NODE_ID_BASE, InProcessGrid
from fedpeft.training import num_local_steps

CLIENTS_FILE = clock.CLIENTS_FILE
CLOCK_DIR = "clock"  # beside the node states in a checkpoint


@dataclass(order=True)
class Pending:
    """A reply on its way to the server."""

    finish: float
    seq: int
    event: clock.Event = field(compare=False)
    reply: Message = field(compare=False)


def _work(msg: Message) -> tuple[str, str | None]:
    """(label for the log, what the client computes: 'train', 'evaluate' or None)."""
    if msg.metadata.message_type == protocol.EVALUATE:
        return "evaluate", "evaluate"
    stage_record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if stage_record is None:
        return "train", "train"
    stage = str(stage_record.get(Key.STAGE))
    return stage, "train" if stage == Stage.COLLECT_MASKED_VECTORS else None  # SecAgg+ trains in this stage


class ClockedGrid(InProcessGrid):
    """An :class:`InProcessGrid` whose messages take simulated time on each client's device and links."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict, runtimes: RuntimeCache,
                 cfg: Config) -> None:
        super().__init__(client_app, num_nodes, run_config, runtimes=runtimes)
        self.cfg = cfg
        self.devices = clock.devices_for(cfg, num_nodes)
        trace = cfg.devices.availability_trace
        self.trace = clock.read_trace(Path(trace).expanduser(), num_nodes) if trace else None
        self.sim_time = 0.0
        self.pending: list[Pending] = []
        self.seq = 0
        self.logged = 0
        self.log_path = Path(str(run_config["run-dir"])) / CLIENTS_FILE
        self._per_client: tuple[list[int], list[int], float] | None = None

    # ---- who is online (devices.availability_trace) ---------------------------------------------
    def get_node_ids(self) -> list[int]:
        """The nodes online now: without a trace all of them, as a SuperLink lists its connected nodes."""
        nodes = super().get_node_ids()
        return list(nodes) if self.trace is None else [n for n in nodes if self.trace.online(n - NODE_ID_BASE,
                                                                                             self.sim_time)]

    def wait_for_nodes(self, wanted: int, patience: float) -> list[int]:
        """Wait in simulated time, at most ``patience`` seconds, until ``wanted`` nodes are online; the nodes
        online then (the clock moves to that moment, or to the end of the patience)."""
        deadline = self.sim_time + patience
        while len(nodes := self.get_node_ids()) < wanted and self.trace is not None:
            trace, now = self.trace, self.sim_time
            back = [t for i in range(self.num_nodes) if (t := trace.next_online(i, now, deadline)) is not None
                    and t > now]
            self.sim_time = min(back, default=deadline)
            if not back:
                return self.get_node_ids()
        return nodes

    # ---- the time model ----------------------------------------------------------------------
    def _work_sizes(self) -> tuple[list[int], list[int], float]:
        """Per partition: local steps per round, evaluation batches; FLOPs of one training step."""
        if self._per_client is None:
            rt = self.runtimes.get(self.cfg)
            train, cfg = self.cfg.train, self.cfg
            steps = [num_local_steps(train, len(p)) for p in rt.partitions]
            evals = [math.ceil(len(p) / train.eval_batch_size) for p in getattr(rt, "client_eval_partitions", [])]
            params = sum(p.numel() for p in rt.model.parameters())
            flops = 6.0 * params * train.batch_size * cfg.model.max_length  # forward 2N + backward 4N per token
            self._per_client = (steps, evals or [0] * len(steps), flops)
        return self._per_client

    def compute_seconds(self, work: str | None, partition: int, measured: float) -> float:
        """Simulated compute time of one message on ``partition``'s device (devices.compute)."""
        dev, mode = self.devices[partition], self.cfg.devices.compute
        if mode == "measured":
            return measured * dev.slowdown
        if work is None:  # SecAgg+ key agreement and unmasking: negligible next to training
            return 0.0
        steps, evals, flops = self._work_sizes()
        n = steps[partition] if work == "train" else evals[partition] * clock.EVAL_STEP_SHARE
        per_step = self.cfg.devices.step_seconds if mode == "steps" else flops / self.cfg.devices.flops
        return n * per_step * dev.slowdown

    def split_seconds(self, reply: Message, partition: int) -> float:
        """Split learning's own traffic, from the reply's counted bytes: one round trip per step plus the
        activations up and the gradients down."""
        if reply.has_error() or not isinstance(reply.content.get(protocol.METRICS), MetricRecord):
            return 0.0
        m, dev, loss = reply.content[protocol.METRICS], self.devices[partition], self.cfg.network.loss
        steps = float(m.get("split-steps", 0.0))  # type: ignore[arg-type]
        if not steps:
            return 0.0
        up = clock.transfer_seconds(float(m.get("split-bytes-up", 0.0)), dev.uplink_mbps, 0.0, loss)  # type: ignore[arg-type]
        down = clock.transfer_seconds(float(m.get("split-bytes-down", 0.0)), dev.downlink_mbps, 0.0, loss)  # type: ignore[arg-type]
        return 2 * dev.latency_s * steps + up + down

    def _deliver(self, msg: Message) -> Pending:
        """Deliver ``msg`` now: an offline client answers 'unavailable', one that drops out answers
        'dropped out' when it goes; any other runs and its reply is stamped with its arrival time."""
        node = msg.metadata.dst_node_id
        pid = node - NODE_ID_BASE
        dev, loss, seed = self.devices[pid], self.cfg.network.loss, self.cfg.run.seed
        rnd = protocol.round_of(msg.metadata.group_id)
        label, work = _work(msg)
        msg.metadata.__dict__["_message_id"] = f"{rnd}-{node}-{label}-{self.seq}"
        bytes_down = protocol.record_bytes(msg.content)
        down = clock.transfer_seconds(bytes_down, dev.downlink_mbps, dev.latency_s, loss)
        rng = clock.keyed_rng(seed, "presence", node, rnd, label)
        online, drop_at = rng.random() < dev.availability, rng.random()
        online = online and (self.trace is None or self.trace.online(pid, self.sim_time))
        event = clock.Event(rnd, node, label, self.sim_time, 0.0, 0.0, 0.0, 0.0, self.sim_time, 0, 0, "ok")
        if not online:
            event.status, reply = "unavailable", Message(Error(code=0, reason="unavailable (virtual clock)"),
                                                         reply_to=msg)
        elif rng.random() < dev.dropout:  # goes after receiving, part way through its work
            event.down_s, event.compute_s = down, drop_at * self.compute_seconds(work, pid, 0.0)
            event.status, reply = "dropout", Message(Error(code=0, reason="dropped out (virtual clock)"),
                                                     reply_to=msg)
        else:
            t0 = time.perf_counter()
            reply = self.call(msg)
            event.down_s, event.compute_s = down, self.compute_seconds(work, pid, time.perf_counter() - t0)
            event.split_s = self.split_seconds(reply, pid)
            if not reply.has_error():
                event.bytes_up = protocol.record_bytes(reply.content)
                event.up_s = clock.transfer_seconds(event.bytes_up, dev.uplink_mbps, dev.latency_s, loss)
        event.bytes_down = bytes_down if online else 0
        event.finish = self.sim_time + event.down_s + event.compute_s + event.split_s + event.up_s
        gone = None if self.trace is None or not online else self.trace.offline_from(pid, self.sim_time, event.finish)
        if gone is not None:  # the trace takes it offline before its reply is in: the SuperLink answers for it
            event.status, event.finish, event.bytes_up = "offline", gone, 0
            reply = Message(Error(code=0, reason="went offline (virtual clock trace)"), reply_to=msg)
        self.seq += 1
        return Pending(event.finish, self.seq, event, reply)

    # ---- waiting -------------------------------------------------------------------------------
    def send_and_receive(self, messages: list[Message] | tuple[Message, ...], *,  # type: ignore[override]
                         timeout: float | None = None) -> list[Message]:
        """Send all now; the replies that arrive within ``timeout`` simulated seconds (the clock moves to the
        last arrival, or to the deadline when an awaited reply is late)."""
        batch = sorted(self._deliver(msg) for msg in self.announced(messages))
        deadline = self.sim_time + timeout if timeout else math.inf
        replies, end = [], self.sim_time
        for p in batch:
            if p.finish <= deadline:
                replies.append(p.reply)
                end = max(end, p.finish)
            else:
                p.event.status, end = "late", deadline
            self._log(p.event)
        self.sim_time = end
        return replies

    def dispatch(self, messages: list[Message]) -> None:
        """Send ``messages`` now; their replies queue by arrival time (:meth:`next_reply`)."""
        for msg in self.announced(messages):
            heapq.heappush(self.pending, self._deliver(msg))

    def next_reply(self) -> Message | None:
        """The next reply to arrive (the clock moves to its arrival); None when nothing is in flight."""
        if not self.pending:
            return None
        p = heapq.heappop(self.pending)
        self.sim_time = max(self.sim_time, p.finish)
        self._log(p.event)
        return p.reply

    def arrives_now(self) -> bool:
        """Whether the next reply in flight arrives at the current time (FedBuff takes such replies together)."""
        return bool(self.pending) and self.pending[0].finish <= self.sim_time

    def _log(self, event: clock.Event) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(event.row()) + "\n")
        self.logged += 1

    # ---- persistence ---------------------------------------------------------------------------
    def save_node_states(self, directory: Path) -> None:
        """Node states, plus the clock: its time, the log lines it stands for, the replies in flight."""
        super().save_node_states(directory)
        (directory / CLOCK_DIR).mkdir(parents=True, exist_ok=True)
        pending, payloads = [], {}
        for i, p in enumerate(self.pending):
            entry: dict = {"finish": p.finish, "seq": p.seq, "event": p.event.row(),
                           "group": p.reply.metadata.group_id}
            if p.reply.has_error():
                entry["error"] = p.reply.error.reason
            else:
                payloads[str(i)] = np.frombuffer(protocol.payload_bytes(p.reply.content[protocol.UPDATE]), np.uint8)
                entry["metrics"] = dict(p.reply.content[protocol.METRICS])
            pending.append(entry)
        state = {"sim_time": self.sim_time, "seq": self.seq, "logged": self.logged, "pending": pending}
        (directory / CLOCK_DIR / "state.json").write_text(json.dumps(state))
        np.savez(directory / CLOCK_DIR / "payloads.npz", **payloads)  # type: ignore[arg-type]

    def load_node_states(self, directory: Path) -> None:
        """Restore :meth:`save_node_states`; the client log is cut back to the checkpoint's lines."""
        super().load_node_states(directory)
        path = directory / CLOCK_DIR / "state.json"
        if not path.is_file():
            return
        state = json.loads(path.read_text())
        self.sim_time, self.seq, self.logged = float(state["sim_time"]), int(state["seq"]), int(state["logged"])
        if self.log_path.exists():
            lines = self.log_path.read_text().splitlines(keepends=True)[:self.logged]
            self.log_path.write_text("".join(lines))
        with np.load(directory / CLOCK_DIR / "payloads.npz", allow_pickle=False) as npz:
            payloads = {name: npz[name].tobytes() for name in npz.files}
        self.pending = []
        for i, entry in enumerate(state["pending"]):
            event = clock.Event(**entry["event"])
            sent = Message(RecordDict(), event.node, protocol.TRAIN, group_id=entry["group"])
            if "error" in entry:
                reply = Message(Error(code=0, reason=entry["error"]), reply_to=sent)
            else:
                data = payloads[str(i)]
                arrays = ArrayRecord({protocol.PAYLOAD: Array(dtype="uint8", shape=(len(data),), stype="raw",
                                                              data=data)})
                reply = Message(RecordDict({protocol.UPDATE: arrays, protocol.METRICS: MetricRecord(
                    entry["metrics"])}), reply_to=sent)
            self.pending.append(Pending(float(entry["finish"]), int(entry["seq"]), event, reply))
        heapq.heapify(self.pending)
