"""Poll intervals of a deployment (issue 21): the ServerApp's reply pulls (``federation.poll_interval``) and
an idle SuperNode's requests for work (``fedpeft node --poll-interval``). Round times: benchmarks/bench_deploy.py
--polling; the real processes run through both in tests/test_deploy.py."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedpeft.deploy import launch, supernode
from fedpeft.errors import FedPeftError
from fedpeft.server.polling import PollingGrid, with_poll_interval


class ScriptedLink(Grid):
    """A SuperLink stand-in: the reply to message i can be pulled from ``ready[i]`` seconds after the push."""

    def __init__(self, ready: list[float]) -> None:
        self.ready, self.pulls, self.sent = ready, 0, {}

    def set_run(self, run: object) -> None: ...

    @property
    def run(self) -> object:
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return range(len(self.ready))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        now = time.monotonic()
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent[f"m{i}"] = (msg, now + self.ready[i])
        return list(self.sent)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        now, out = time.monotonic(), []
        for mid in list(message_ids):
            msg, at = self.sent[mid]
            if at <= now:
                out.append(Message(RecordDict({"r": ConfigRecord({"ok": 1})}), reply_to=msg))
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("PollingGrid must not call the inner grid's own polling loop")


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Flower stamps messages with the running task's identity (set as the in-process engine sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _messages(n: int) -> list[Message]:
    return [Message(RecordDict(), i, "train", group_id="1") for i in range(n)]


def test_replies_are_seen_within_one_interval_of_arriving() -> None:
    link = ScriptedLink([0.2, 0.4])
    t0 = time.monotonic()
    replies = list(PollingGrid(link, 0.05).send_and_receive(_messages(2)))
    took = time.monotonic() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert 0.4 <= took < 1.0  # Flower's own loop: 3 s (its sleep after the first, empty pull)
    assert link.pulls >= 5


def test_a_timeout_returns_the_replies_that_arrived() -> None:
    link = ScriptedLink([0.05, 60.0])
    t0 = time.monotonic()
    replies = list(PollingGrid(link, 0.05).send_and_receive(_messages(2), timeout=0.5))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 0.5 <= time.monotonic() - t0 < 1.5


def test_only_flowers_deployment_grid_polls_faster() -> None:
    from flwr.superlink.grid.http_grid import HttpGrid

    from fedpeft.simulation.inprocess import InProcessGrid

    deployed = HttpGrid("127.0.0.1:1", insecure=True, token="t")  # not connected: nothing is sent
    assert isinstance(with_poll_interval(deployed, 0.2), PollingGrid)
    assert with_poll_interval(deployed, 3.0) is deployed  # >= Flower's 3 s: Flower's own loop
    local = InProcessGrid(None, 2, {})  # type: ignore[arg-type]
    assert with_poll_interval(local, 0.2) is local  # in-process engines call clients directly


def test_supernode_loop_sleeps_at_most_the_poll_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", time)  # restored after the test
    assert supernode.shorten_polling(0.05)
    t0 = time.monotonic()
    loop.time.sleep(3)  # what the idle SuperNode does after an empty pull
    assert time.monotonic() - t0 < 1.0
    assert loop.time.time() == pytest.approx(time.time(), abs=1.0)  # everything else is the time module's
    assert not supernode.shorten_polling(0.05)  # already replaced: not the loop it knows, nothing done


def test_node_command_polls_through_fedpeft_below_flowers_interval(tmp_path: Path) -> None:
    opts = launch.NodeOptions("h:9092", partition_id=0)
    assert launch.node_args(opts)[1:5] == ["-m", "fedpeft.deploy.supernode", "--poll-interval", "0.5"]
    opts.poll_interval = 3.0
    assert Path(launch.node_args(opts)[0]).name == "flower-supernode"  # Flower's own, unchanged
    opts.poll_interval = 0.0
    with pytest.raises(FedPeftError, match="--poll-interval"):
        launch.node_args(opts)
    out = subprocess.run([sys.executable, "-m", "fedpeft.deploy.supernode", "--poll-interval", "0.2", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "flower-supernode" in out.stdout and "--superlink" in out.stdout  # Flower's CLI
