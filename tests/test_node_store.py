"""Node state across a resumed deployment (fedpeft node --state-dir, fedpeft/clients/node_store.py): the store's
files (atomic, newest before the round, pruned, no pickle), what it refuses, and a resumed run whose nodes start
with empty state (as a new Flower run does) continuing every node's personal head and error feedback exactly."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from test_deploy import RESTARTED_RUN, restart_mid_round_then_resume
from test_deploy_ranks import run_two_nodes
from test_personal import PATHOLOGICAL

from fedpeft import config, report
from fedpeft.clients import node_store
from fedpeft.clients.node_store import NodeState, NodeStateError
from fedpeft.deploy import launch
from fedpeft.errors import FedPeftError
from fedpeft.simulation import runner
from fedpeft.simulation.inprocess import node_id

from conftest import interrupt_and_resume, tiny_overrides


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
    assert launch.node_config(opts) == f'partition-id=0 state-dir="{(tmp_path / "state").resolve()}" deployed=true'
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


def _newest(node: Path) -> dict[str, np.ndarray]:
    """The tensors of the newest state stored in ``node`` (``<state dir>/<run>/node-<id>``), as ``<record>/<key>``."""
    got = node_store.load(node.parent.parent, node.parent.name, int(node.name.split("-")[1]), before_round=10**6)
    assert got is not None
    return {f"{r}/{k}": a for r, arrays in got.arrays.items() for k, a in arrays.items()}


def _final_states(state_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """node -> the tensors of its newest stored state."""
    return {node.name: _newest(node) for node in sorted(state_dir.glob("*/node-*"))}


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


#: a personal head and a top-10 % uplink with error feedback on two nodes; federated evaluation after round 3 only
ON_NODES = {**PATHOLOGICAL, "data.classes_per_client": 2, "federation.personalization": "head",
            "compression.uplink": "topk:0.1", "federation.rounds": 3, "federation.eval_every": 3}


def _tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of every safetensors file under ``path``, by file and tensor name."""
    from safetensors.numpy import load_file

    return {f"{f.relative_to(path)}:{k}": v for f in sorted(path.rglob("*.safetensors"))
            for k, v in load_file(f).items()}


@pytest.mark.slow
def test_a_resume_through_real_processes_continues_each_nodes_stored_state(tmp_path: Path, monkeypatch) -> None:
    """Real SuperLink + two warm ``fedpeft node --state-dir`` SuperNodes (personal head, top-k uplink with error
    feedback). In round 2 the proxy holds the first reply a node sends (that node has trained round 2 and stored its
    state of round 2), the SuperLink is killed and restarted, and ``fedpeft run --resume`` continues from round 1's
    checkpoint (test_deploy.restart_mid_round_then_resume). Each node must restore its state of round 1 (not the
    round-2 file of the dead run, and not start fresh), and its final head and residual, the global adapter and
    the metrics must equal, bit for bit, those of an uninterrupted run with the same seed on the in-process engine
    run as a deployment (the same ClientApp and ServerApp code on the same partitions, seeds and thread count; the
    uninterrupted real-process run equals it too, but a second cluster would double the wall time)."""
    stores = [tmp_path / f"s{i}" for i in range(2)]
    ahead: list[Path] = []  # round-2 files of the dead run when the SuperLink died
    run_dir, rows = restart_mid_round_then_resume(
        tmp_path, b"/v1/fleet/push-messages", ON_NODES, lambda i: ["--state-dir", stores[i]],
        held=lambda: ahead.extend(p for s in stores for p in s.glob("*/node-*/round-2.safetensors")))
    assert ahead, "no node had stored round 2 when the SuperLink died"
    nodes = [next((store / run_dir.name).glob("node-*")) for store in stores]  # partition -> its node's states
    for i, node in enumerate(nodes):  # each node restored round 1's state, and stored rounds 2 and 3 anew
        log = (tmp_path / f"n{i}.log").read_text(errors="replace")
        assert log.count("restored its state of round 1 from") == 1 and "fresh client state" not in log, log[-3000:]
        assert sorted(p.name for p in node.iterdir()) == ["round-2.safetensors", "round-3.safetensors"]
    with monkeypatch.context() as m:
        _as_deployed(m, tmp_path / "in-process")
        want = runner.simulate(config.load(None, tiny_overrides(tmp_path / "all.jsonl", tmp_path / "runs-in-process",
                                                                **{**RESTARTED_RUN, **ON_NODES})))
    # the same metrics, but for the node ids that name each client's evaluation
    ids = {node.name.removeprefix("node-"): str(node_id(i)) for i, node in enumerate(nodes)}
    rows[-1]["fed_eval_clients"] = {ids[k]: v for k, v in rows[-1]["fed_eval_clients"].items()}
    assert [[r.get(k) for k in KEYS] for r in rows] == [[r.get(k) for k in KEYS] for r in report.read_metrics(want)]
    got_adapter, want_adapter = _tensors(run_dir / "adapter"), _tensors(want / "adapter")
    assert got_adapter.keys() == want_adapter.keys() and all(np.isfinite(v).all() for v in got_adapter.values())
    assert all(np.array_equal(got_adapter[k], want_adapter[k]) for k in want_adapter)
    for i, node in enumerate(nodes):
        got, expected = _newest(node), _newest(tmp_path / "in-process" / want.name / f"node-{node_id(i)}")
        assert {k.split("/")[0] for k in got} == {"fedpeft.personal", "fedpeft.error-feedback"}
        assert got.keys() == expected.keys() and all(np.isfinite(v).all() for v in got.values())
        assert [k for k in expected if not np.array_equal(got[k], expected[k])] == [], f"node of partition {i}"


def _local_dp_steps(state_dir: Path) -> dict[str, int]:
    """node -> DP-SGD steps its newest stored accountant holds."""
    out = {}
    for node in sorted(state_dir.glob("*/node-*")):
        got = node_store.load(node.parent.parent, node.parent.name, int(node.name.split("-")[1]), before_round=10**6)
        history = json.loads(got.configs["fedpeft.local-dp"]["json"])["history"]
        out[node.name] = sum(int(h[2]) for h in history)
    return out


def test_a_resumed_deployment_keeps_charging_the_rounds_it_trains_again(tiny_cfg, monkeypatch, tmp_path, caplog):
    """Found by an outside review: a node restored its accountant from the state before the resumed round, so a
    round trained and sent before the crash (after the server's checkpoint) was charged once though released twice.
    Checkpoints every 2 of 4 rounds, crash at round 4: round 3 is retrained, and each node's accountant holds 5
    rounds of steps (4 without the crash)."""
    extra = {"privacy.mode": "local", "privacy.noise_multiplier": 1.0, "privacy.max_grad_norm": 1.0,
             "privacy.delta": 1e-3, "federation.rounds": 4, "output.checkpoint_every": 2, "train.local_steps": 1,
             "data.num_clients": 2, "train.batch_size": 4}
    with monkeypatch.context() as m:
        _as_deployed(m, tmp_path / "full")
        runner.simulate(tiny_cfg(**extra))
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="fedpeft.clients.app"):
        _as_deployed(m, tmp_path / "resumed")
        interrupt_and_resume(tiny_cfg(**extra), 4, m)
    full, resumed = _local_dp_steps(tmp_path / "full"), _local_dp_steps(tmp_path / "resumed")
    assert len(full) == 2 and set(full.values()) == {4}
    assert resumed.keys() == full.keys() and set(resumed.values()) == {5}
    assert caplog.text.count("its DP-SGD accountant continues from round 3") == 2
