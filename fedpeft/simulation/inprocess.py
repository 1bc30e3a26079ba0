"""The in-process engine: one process, no sockets, deterministic.

:class:`InProcessGrid` implements Flower's ``Grid`` interface, so the ServerApp runs unchanged: each
pushed message is handed to the ClientApp of its virtual node, one after another. The server and all
virtual clients get the engine's :class:`~fedpeft.runtime.RuntimeCache` in their ``Context``, so they
share one frozen base model and swap adapters, and memory stays flat as clients and rounds grow; a
node's ``Context`` (its persistent state, e.g. the error-feedback residual) is created when the node is
first sampled.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedpeft import config, protocol
from fedpeft.runtime import PROCESS_RUNTIMES, RuntimeCache

if TYPE_CHECKING:
    from fedpeft.progress import StepProgress

log = logging.getLogger(__name__)

SERVER_NODE_ID = 0
NODE_ID_BASE = 1000  # virtual node i has node id NODE_ID_BASE + i and partition-id i
# Node state never written to checkpoints: Flower's SecAgg+ state of an unfinished round (secret keys and
# shares as bytes; a new round starts the protocol afresh, and key material does not belong on disk).
TRANSIENT_STATE = ("secaggplus_state",)


def node_id(partition_id: int) -> int:
    """The node id of the virtual client holding ``partition_id``."""
    return NODE_ID_BASE + partition_id


class EngineContext(Context):
    """A Flower ``Context`` that also carries the engine's runtime cache to the app it is given to, and the
    step-progress hook the ClientApp hands to ``train_local`` (None: no progress display)."""

    def __init__(self, runtimes: RuntimeCache, on_step: Callable[[int, int], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.runtimes = runtimes
        self.on_step = on_step


class InProcessGrid(Grid):
    """A Grid whose nodes are virtual clients called in this process (sharing ``runtimes``)."""

    progress: StepProgress | None = None  # told which message runs; its step hook goes to every node

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict, run_id: int = 1,
                 runtimes: RuntimeCache = PROCESS_RUNTIMES) -> None:
        self.client_app = client_app
        self.num_nodes = num_nodes
        self.run_config = run_config
        self.runtimes = runtimes
        self._run = Run.create_empty(run_id)
        self._contexts: dict[int, Context] = {}
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [node_id(i) for i in range(self.num_nodes)]

    def partition_of(self, node: int) -> int | None:
        """The partition a virtual node trains on (the server caps its weight at that partition's size;
        the adversary harness labels dropped updates with it)."""
        return node - NODE_ID_BASE if 0 <= node - NODE_ID_BASE < self.num_nodes else None

    def context(self, node: int) -> Context:
        """The persistent context of a virtual node (created on first use; a node whose state is empty after
        its call is not kept, so memory follows the nodes that hold state, not every node ever sampled)."""
        if node not in self._contexts:
            pid = node - NODE_ID_BASE
            self._contexts[node] = EngineContext(self.runtimes, None if self.progress is None else self.progress.step,
                                                 run_id=self._run.run_id, node_id=node,
                                                 node_config={"partition-id": pid, "num-partitions": self.num_nodes},
                                                 state=RecordDict(), run_config=dict(self.run_config))
        return self._contexts[node]

    def call(self, msg: Message) -> Message:
        """Run the ClientApp of ``msg``'s node on it; a failing client is an error reply, as in a deployment."""
        node = msg.metadata.dst_node_id
        try:
            return self.client_app(msg, self.context(node))
        except Exception as e:
            log.info("virtual node %s failed", node, exc_info=True)  # the traceback with -v; the round logs one line
            return Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
        finally:
            if node in self._contexts and not self._contexts[node].state:
                del self._contexts[node]  # nothing to keep: a fresh context next time is the same

    def announced(self, messages: Iterable[Message]) -> Iterator[Message]:
        """``messages`` one by one, each announced to :attr:`progress` (round, kind, i of n) as it is taken."""
        batch = list(messages)
        for i, msg in enumerate(batch):
            if self.progress is not None:
                self.progress.begin(protocol.round_of(msg.metadata.group_id), msg.metadata.message_type, i,
                                    len(batch))
            yield msg

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in self.announced(messages):
            if self.partition_of(msg.metadata.dst_node_id) is None:
                raise ValueError(f"unknown node {msg.metadata.dst_node_id}")
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._replies[msg.metadata.message_id] = self.call(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # ---- persistence of client state (called by the server at checkpoints) ------------------
    def save_node_states(self, directory: Path) -> None:
        """Save the state of every node that holds some: arrays to ``<node>.npz``, config records to
        ``<node>.json`` (no pickle). A node without files starts empty on resume, as it would have."""
        directory.mkdir(parents=True, exist_ok=True)
        for node, ctx in self._contexts.items():
            arrays = {f"{rec}/{key}": arr.numpy() for rec, record in ctx.state.items()
                      if isinstance(record, ArrayRecord) for key, arr in record.items()}
            configs = {rec: dict(record) for rec, record in ctx.state.items() if isinstance(record, ConfigRecord)
                       and rec not in TRANSIENT_STATE}
            if not arrays and not configs:
                continue
            # numpy's stub: a **mapping could also fill the allow_pickle keyword, so mypy wants bool values too
            np.savez(directory / f"{node}.npz", **arrays)  # type: ignore[arg-type]
            (directory / f"{node}.json").write_text(json.dumps(configs))

    def load_node_states(self, directory: Path) -> None:
        """Restore node states saved by :meth:`save_node_states`."""
        if not directory.is_dir():
            return
        for path in sorted(directory.glob("*.npz")):
            ctx = self.context(int(path.stem))
            with np.load(path, allow_pickle=False) as npz:
                records: dict[str, dict[str, Array]] = {}
                for name in npz.files:
                    rec, key = name.split("/", 1)
                    records.setdefault(rec, {})[key] = Array(npz[name])
            for rec, arrays in records.items():
                ctx.state[rec] = ArrayRecord(arrays)
            configs = path.with_suffix(".json")
            if configs.exists():
                for rec, values in json.loads(configs.read_text()).items():
                    ctx.state[rec] = ConfigRecord(values)


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_nodes: int, run_config: dict,
                  runtimes: RuntimeCache = PROCESS_RUNTIMES, progress: StepProgress | None = None) -> float:
    """Run ``server_app`` against ``num_nodes`` virtual clients, all on ``runtimes``; returns the wall time in seconds.

    The default is this process's cache, so later work in the process (an audit of the run, a test) finds the
    model the run loaded. ``progress`` (optional) follows the clients' local steps.
    """
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SERVER_NODE_ID
    TaskIdentity.task_id = 1
    grid = InProcessGrid(client_app, num_nodes, run_config, runtimes=runtimes)
    cfg = config.loads(str(run_config["fedpeft-config"])) if "fedpeft-config" in run_config else None
    if cfg is not None and cfg.devices.clock:  # simulated time (simulation/clock.py)
        from fedpeft.simulation.clocked import ClockedGrid

        grid = ClockedGrid(client_app, num_nodes, run_config, runtimes, cfg)
    grid.progress = progress
    server_ctx = EngineContext(runtimes, run_id=1, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                               run_config=dict(run_config))
    t0 = time.perf_counter()
    server_app(grid, server_ctx)
    return time.perf_counter() - t0
