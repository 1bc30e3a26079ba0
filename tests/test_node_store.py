"""Node state across a resumed deployment (fedpeft node --state-dir, fedpeft/clients/node_store.py): the store's
files (atomic, newest before the round, pruned, no pickle), what it refuses, and a resumed run whose nodes start
with empty state (as a new Flower run does) continuing every node's personal head and error feedback exactly."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from test_deploy_ranks import run_two_nodes
from test_personal import PATHOLOGICAL

from fedpeft import report
from fedpeft.clients import node_store
from fedpeft.clients.node_store import NodeState, NodeStateError
from fedpeft.deploy import launch
from fedpeft.errors import FedPeftError
from fedpeft.simulation import runner
from fedpeft.simulation.inprocess import node_id

from conftest import interrupt_and_resume


def _state(rnd: int, value: float = 1.0) -> NodeState:
    return NodeState(rnd, {"fedpeft.personal": {"head.weight": np.full((3, 4), value, np.float32)}},
                     {"fedpeft.lora-rank": {"rank": 4}})


def test_save_and_load_the_newest_state_before_a_round(tmp_path):
    for rnd in (1, 2, 3):
        node_store.save(tmp_path, "run-a", 7, _state(rnd, float(rnd)))
    directory = node_store.node_dir(tmp_path, "run-a", 7)
    assert sorted(p.name for p in directory.iterdir()) == ["round-2.safetensors", "round-3.safetensors"]  # keep 2
    got = node_store.load(tmp_path, "run-a", 7, before_round=4)
    assert got is not None and got.round == 3 and got.configs == {"fedpeft.lora-rank": {"rank": 4}}
    assert np.array_equal(got.arrays["fedpeft.personal"]["head.weight"], np.full((3, 4), 3.0, np.float32))
    # a run resumed from round 2's checkpoint trains round 3 again: the state after round 2, not 3
    assert node_store.load(tmp_path, "run-a", 7, before_round=3).round == 2
    assert node_store.load(tmp_path, "run-a", 7, before_round=2) is None  # round 1's was pruned
    assert node_store.load(tmp_path, "run-b", 7, before_round=9) is None  # another run, another directory
    node_store.save(tmp_path, "run-a", 7, _state(2, 5.0))  # round 2 again: round 3's future is dropped
    assert sorted(p.name for p in directory.iterdir()) == ["round-2.safetensors"]
    assert not list(directory.glob(".*"))  # no temporary file left behind


def test_the_store_refuses_what_is_not_this_nodes_state(tmp_path):
    node_store.save(tmp_path, "run-a", 7, _state(1))
    other = node_store.node_dir(tmp_path, "run-a", 8)
    other.mkdir(parents=True)
    (node_store.node_dir(tmp_path, "run-a", 7) / "round-1.safetensors").rename(other / "round-1.safetensors")
    with pytest.raises(NodeStateError, match="saved for run 'run-a', node 7, round 1, not run 'run-a', node 8"):
        node_store.load(tmp_path, "run-a", 8, before_round=2)
    (other / "round-1.safetensors").write_bytes(b"\x80\x04 a pickle, not a safetensors file")
    with pytest.raises(NodeStateError, match="not a readable safetensors file"):
        node_store.load(tmp_path, "run-a", 8, before_round=2)
    with pytest.raises(NodeStateError, match="cannot name a directory"):
        node_store.node_dir(tmp_path, "../x", 1)
    state = _state(1)
    node_store.check_shapes(state, {"fedpeft.personal": {"head.weight": (3, 4)}})
    with pytest.raises(NodeStateError, match=r"'head.weight' is float32 \(3, 4\), this run's is float32 \(3, 5\)"):
        node_store.check_shapes(state, {"fedpeft.personal": {"head.weight": (3, 5)}})
    with pytest.raises(NodeStateError, match="'head.weight' is not one of this run's"):
        node_store.check_shapes(state, {"fedpeft.personal": {"x": (3, 4)}})


def test_fedpeft_node_passes_its_state_dir_in_the_node_config(tmp_path):
    opts = launch.NodeOptions("h:9092", partition_id=0, state_dir=tmp_path / "state")
    assert launch.node_config(opts) == f'partition-id=0 state-dir="{(tmp_path / "state").resolve()}"'
    assert (tmp_path / "state").is_dir()
    with pytest.raises(FedPeftError, match="--state-dir .* may not contain spaces"):
        launch.node_config(launch.NodeOptions("h:9092", partition_id=0, state_dir=tmp_path / "a b"))


#: a personal head (never sent) and a top-10 % uplink with error feedback (its residual never sent either)
KEPT = {**PATHOLOGICAL, "federation.personalization": "head", "compression.uplink": "topk:0.1",
        "federation.rounds": 3, "federation.clients_per_round": 2}
KEYS = ("train_loss", "fed_eval_loss", "fed_eval_clients", "bytes_up")


def _as_deployed(monkeypatch, state_dir: Path | None) -> None:
    """The in-process engine as a deployment runs: nothing restores node state into a resumed run (a new Flower
    run), and each node's config carries ``state-dir`` when it keeps a store."""
    from fedpeft.simulation.inprocess import InProcessGrid

    monkeypatch.delattr(InProcessGrid, "load_node_states")
    original = InProcessGrid.context

    def context(self, node):
        ctx = original(self, node)
        if state_dir is not None:
            ctx.node_config["state-dir"] = str(state_dir)
        return ctx

    monkeypatch.setattr(InProcessGrid, "context", context)


def _final_states(state_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """node -> the tensors of its newest stored state."""
    out = {}
    for node in sorted(state_dir.glob("*/node-*")):
        got = node_store.load(state_dir, node.parent.name, int(node.name.split("-")[1]), before_round=10**6)
        assert got is not None
        out[node.name] = {f"{r}/{k}": a for r, arrays in got.arrays.items() for k, a in arrays.items()}
    return out


def test_a_resumed_deployment_continues_each_nodes_personal_head_and_error_feedback(tiny_cfg, monkeypatch,
                                                                                    tmp_path):
    """Crash at the start of round 3 and resume with empty node state: with a store, metrics and every node's
    final head and residual equal the uninterrupted run's; without one they do not (the heads restart)."""
    with monkeypatch.context() as m:
        _as_deployed(m, tmp_path / "full")
        full = report.read_metrics(runner.simulate(tiny_cfg(**KEPT)))
    with monkeypatch.context() as m:
        _as_deployed(m, None)
        fresh = report.read_metrics(interrupt_and_resume(tiny_cfg(**KEPT), 3, m))
    with monkeypatch.context() as m:
        _as_deployed(m, tmp_path / "resumed")
        resumed = report.read_metrics(interrupt_and_resume(tiny_cfg(**KEPT), 3, m))
    assert [[r[k] for k in KEYS] for r in resumed] == [[r[k] for k in KEYS] for r in full]
    assert [r[k] for r in fresh[2:] for k in KEYS] != [r[k] for r in full[2:] for k in KEYS]
    want, got = _final_states(tmp_path / "full"), _final_states(tmp_path / "resumed")
    assert len(want) == 3 and want.keys() == got.keys()
    for node, tensors in want.items():
        assert any(k.startswith("fedpeft.personal/") for k in tensors)
        assert any(k.startswith("fedpeft.error-feedback/") for k in tensors)
        assert tensors.keys() == got[node].keys()
        assert all(np.array_equal(tensors[k], got[node][k]) for k in tensors), node


def test_a_stored_state_of_other_shapes_is_refused_and_the_node_starts_fresh(tiny_cfg, monkeypatch, tmp_path, caplog):
    extra = {**KEPT, "federation.rounds": 2, "federation.clients_per_round": 3}
    store = tmp_path / "store"
    with monkeypatch.context() as m:
        _as_deployed(m, store)
        cfg, run_dir = runner.prepare(tiny_cfg(**extra))
        wrong = NodeState(0, {"fedpeft.personal": {"x.modules_to_save.default.weight": np.zeros((2, 2), np.float32)}})
        for pid in range(3):
            node_store.save(store, run_dir.name, node_id(pid), wrong)
        with caplog.at_level(logging.WARNING, logger="fedpeft.clients.app"):
            runner.execute(cfg, run_dir)
    rows = report.read_metrics(run_dir)
    assert [r["replies"] for r in rows] == [3, 3]  # refused, started fresh, trained
    assert caplog.text.count("starts with fresh client state") == 3
    assert "stored fedpeft.personal tensor 'x.modules_to_save.default.weight' is not one of this run's" in caplog.text


@pytest.mark.slow
def test_deployed_nodes_write_their_state_where_fedpeft_node_state_dir_says(tmp_path: Path) -> None:
    """Real SuperLink + two SuperNodes started with ``fedpeft node --state-dir``: after a 2-round personal-head run
    each node's directory holds its state of round 2 (its own head, not the server's init), readable by the store."""
    _, run_dir = run_two_nodes(tmp_path, {**PATHOLOGICAL, "data.classes_per_client": 2, "federation.rounds": 2,
                                          "federation.personalization": "head"},
                               [["--state-dir", tmp_path / f"s{i}"] for i in range(2)])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["replies"] for r in rows] == [2, 2]
    heads = []
    for i in range(2):
        (node,) = (tmp_path / f"s{i}" / run_dir.name).glob("node-*")
        assert sorted(p.name for p in node.iterdir()) == ["round-1.safetensors", "round-2.safetensors"]
        got = node_store.load(tmp_path / f"s{i}", run_dir.name, int(node.name.split("-")[1]), before_round=3)
        assert got is not None and got.round == 2 and got.arrays["fedpeft.personal"]
        heads.append(np.concatenate([a.ravel() for a in got.arrays["fedpeft.personal"].values()]))
    assert not np.array_equal(heads[0], heads[1])  # each node's own head
