"""FedBuff on real time (the deployment path: push_messages / pull_messages, server/async_grid.py), on the in-process
grid without the virtual clock: K = all clients is synchronous FedAvg, a node whose reply is held back is not waited
for and arrives down-weighted, a message left unanswered past round_timeout frees its node, and an error reply the
SuperLink writes is charged to the node the message went to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fedpeft import config, report
from fedpeft.clients.app import app as client_app
from fedpeft.server import async_grid
from fedpeft.server.asynchronous import BufferedServer
from fedpeft.simulation import runner
from fedpeft.simulation.clock import CLIENTS_FILE
from fedpeft.simulation.inprocess import InProcessGrid

from conftest import tiny_overrides, write_classification

SLOW = 1002  # the node whose replies are held back


@pytest.fixture(scope="module")
def make_cfg(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("live")
    data = write_classification(tmp / "topics.jsonl", n=60)

    def make(**extra: object) -> config.Config:
        sets = {"data.num_clients": 3, "federation.rounds": 2, "train.local_steps": 2, "model.max_length": 16, **extra}
        return config.load(None, tiny_overrides(data, tmp / "runs", **sets))

    return make


class HoldingGrid(InProcessGrid):
    """The in-process grid whose node ``SLOW`` answers only on the ``hold + 1``-th pull that asks for its reply
    (never, with ``hold = None``): a slow device on real time."""

    def __init__(self, *args: object, hold: int | None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.hold, self.asked = hold, dict[str, int]()

    def pull_messages(self, message_ids):
        ready = []
        for mid in message_ids:
            reply = self._replies.get(mid)
            if reply is not None and reply.metadata.src_node_id == SLOW:
                self.asked[mid] = self.asked.get(mid, 0) + 1
                if self.hold is None or self.asked[mid] <= self.hold:
                    continue
            ready.append(mid)
        return super().pull_messages(ready)


def _run(cfg: config.Config, hold: int | None) -> Path:
    """A FedBuff run of ``cfg`` on a HoldingGrid (what the in-process engine does, with that grid)."""
    cfg, run_dir = runner.prepare(cfg)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = HoldingGrid(client_app, cfg.data.num_clients, runner.run_config(cfg, run_dir, False), hold=hold)
    BufferedServer(cfg, run_dir).run(grid)
    return run_dir


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_k_all_clients_on_real_time_is_synchronous_fedavg(make_cfg):
    sync = runner.simulate(make_cfg())
    buffered = runner.simulate(make_cfg(**{"federation.buffer_size": 3}))
    keys = ("replies", "train_loss", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down")
    a, b = report.read_metrics(sync), report.read_metrics(buffered)
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert [r["staleness_max"] for r in b] == [0, 0]
    sa, sb = _adapter(sync), _adapter(buffered)
    assert all(sa[k].equal(sb[k]) for k in sa)
    flights = [json.loads(line) for line in (buffered / CLIENTS_FILE).read_text().splitlines()]
    assert [(f["round"], f["node"], f["status"]) for f in flights] == [(r, 1000 + i, "ok") for r in (1, 2)
                                                                        for i in range(3)]


def test_a_held_back_node_is_not_waited_for_and_arrives_down_weighted(make_cfg):
    run_dir = _run(make_cfg(**{"federation.buffer_size": 2, "federation.rounds": 4, "federation.poll_interval": 0.01}),
                   hold=2)
    rows = report.read_metrics(run_dir)
    buffered = [sorted(tuple(b) for b in r["buffered"]) for r in rows]
    # updates 1 and 2 are applied from nodes 0 and 1 while node 2's first reply (sent with version 0) is held back
    assert buffered[0] == buffered[1] == [(1000, 0, 0), (1001, 1, 0)]
    assert buffered[2] == [(1000, 0, 0), (SLOW, 2, 2)]  # released on the third pull: sent at version 0, applied at 2
    assert buffered[3] == [(1000, 0, 0), (1001, 1, 1)]  # node 1's reply came with it and waited one update
    assert [r["replies"] for r in rows] == [2, 2, 2, 2] and rows[0]["in_flight"] == 1


class FewReplies:
    """A SuperLink whose node 1007 never answers and whose node 1008 gets an error the SuperLink writes itself
    (sender: the SuperLink's node id 0, as Flower's grid does when a reply's objects cannot be pulled)."""

    def __init__(self) -> None:
        self.sent: dict[str, Message] = {}

    def push_messages(self, messages):
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent[f"m{i}"] = msg
        return list(self.sent)

    def pull_messages(self, message_ids):
        replies = []
        for mid in message_ids:
            if self.sent[mid].metadata.dst_node_id == 1008:
                reply = Message(Error(code=0, reason="objects unavailable"), reply_to=self.sent[mid])
                reply.metadata.__dict__["_src_node_id"] = 0
                replies.append(reply)
        return replies


def test_a_silent_node_is_given_up_after_round_timeout_and_a_superlink_error_names_its_node(tmp_path):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    flights = async_grid.LiveFlights(FewReplies(), 0.05, tmp_path / CLIENTS_FILE, 0.01)  # type: ignore[arg-type]
    flights.dispatch([Message(RecordDict(), node, "train", group_id="3") for node in (1007, 1008)])
    failed, late = flights.next_reply(), flights.next_reply()
    assert failed is not None and failed.metadata.src_node_id == 1008 and failed.error.reason == "objects unavailable"
    assert late is not None and late.has_error() and late.metadata.src_node_id == 1007
    assert "no reply within federation.round_timeout = 0.05 s" in late.error.reason
    assert flights.next_reply() is None  # nothing left in flight
    rows = [json.loads(line) for line in (tmp_path / CLIENTS_FILE).read_text().splitlines()]
    assert [(r["round"], r["node"], r["status"]) for r in rows] == [(3, 1008, "failed"), (3, 1007, "late")]
    assert rows[1]["finish"] >= 0.05
