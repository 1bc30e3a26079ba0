"""FedBuff on the virtual clock: equal speeds with K = all clients is synchronous FedAvg, a straggler does not
hold the server back and arrives down-weighted by its staleness, a crashed run resumes exactly, and what it
cannot account or run is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft import config, report
from fedpeft.errors import ConfigError
from fedpeft.server import asynchronous
from fedpeft.simulation import runner
from fedpeft.simulation.clocked import CLIENTS_FILE

from conftest import Interrupted, tiny_overrides, write_classification

KEYS = ("round", "replies", "train_loss", "eval_loss", "eval_accuracy", "sim_time", "staleness_max", "bytes_up",
        "bytes_down")
SLOW = 3.0  # the straggler's slowdown: 2 steps x 0.5 s x 3 = 3 s of compute against 1 s


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("fedbuff")
    data = write_classification(tmp / "topics.jsonl", n=60)
    profiles = tmp / "devices.csv"
    profiles.write_text(f"client,slowdown\n2,{SLOW}\n")

    def cfg(**extra: object) -> config.Config:
        sets = {"data.num_clients": 3, "federation.rounds": 2, "train.local_steps": 2, "model.max_length": 16,
                "devices.clock": True, "devices.step_seconds": 0.5, **extra}
        return config.load(None, tiny_overrides(data, tmp / "runs", **sets))

    return {"cfg": cfg, "profiles": str(profiles)}


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / CLIENTS_FILE).read_text().splitlines()]


def test_staleness_weights_as_specified():
    assert asynchronous.staleness_weight(0, 0.5) == 1.0
    assert asynchronous.staleness_weight(3, 0.5) == 0.5  # 1 / sqrt(1 + 3)
    assert asynchronous.staleness_weight(1, 1.0) == 0.5
    assert asynchronous.staleness_weight(7, 0.0) == 1.0


def test_equal_speeds_and_k_all_clients_is_synchronous_fedavg(setup):
    sync = runner.simulate(setup["cfg"]())
    buffered = runner.simulate(setup["cfg"](**{"federation.buffer_size": 3}))
    a, b = report.read_metrics(sync), report.read_metrics(buffered)
    assert [[r.get(k) for k in KEYS if k != "staleness_max"] for r in a] == \
        [[r.get(k) for k in KEYS if k != "staleness_max"] for r in b]
    assert [r["staleness_max"] for r in b] == [0, 0]
    sa, sb = _adapter(sync), _adapter(buffered)
    assert sa.keys() == sb.keys() and all(sa[k].equal(sb[k]) for k in sa)
    assert _log(sync) == _log(buffered)


def test_a_straggler_is_not_waited_for_and_arrives_down_weighted(setup, monkeypatch):
    weights: list[tuple[int, float]] = []
    real = asynchronous.staleness_weight
    monkeypatch.setattr(asynchronous, "staleness_weight", lambda tau, e: weights.append((tau, e)) or real(tau, e))
    run_dir = runner.simulate(setup["cfg"](**{"federation.buffer_size": 2, "federation.rounds": 3,
                                              "devices.profiles": setup["profiles"]}))
    rows, log = report.read_metrics(run_dir), _log(run_dir)
    straggler = next(e for e in log if e["node"] == 1002)
    assert straggler["round"] == 1 and straggler["finish"] > rows[1]["sim_time"]  # dispatched first, back late
    assert [r["replies"] for r in rows] == [2, 2, 2]
    assert rows[0]["sim_time"] < straggler["finish"] / 2  # the first update did not wait for it
    assert rows[2]["sim_time"] >= straggler["finish"] and rows[2]["staleness_max"] == 2  # sent at v0, applied at v2
    assert [r["staleness_max"] for r in rows[:2]] == [0, 0]
    assert {w for w in weights if w[0]} == {(2, 0.5)}  # only the straggler's tensors were scaled, by 1/sqrt(3)


@pytest.fixture(scope="module")
def interrupted(setup) -> dict:
    """A 4-update FedBuff run with the straggler in flight at the round-2 checkpoint, and that run crashed
    at the start of update 3."""
    extra = {"federation.buffer_size": 2, "federation.rounds": 4, "devices.profiles": setup["profiles"],
             "compression.uplink": "topk:0.3", "federation.max_staleness": 1}
    reference = runner.simulate(setup["cfg"](**extra))
    original = asynchronous.BufferedServer.run_round

    def crash(self, grid, rnd):
        if rnd == 3:
            raise Interrupted()
        return original(self, grid, rnd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(asynchronous.BufferedServer, "run_round", crash)
        cfg, crashed = runner.prepare(setup["cfg"](**extra))
        with pytest.raises(Interrupted):
            runner.execute(cfg, crashed)
    return {"reference": reference, "crashed": crashed}


def test_a_resumed_fedbuff_run_matches_the_uninterrupted_one(interrupted):
    crashed = interrupted["crashed"]
    assert json.loads((crashed / "checkpoint" / "server.json").read_text())["round"] == 2
    runner.simulate(resume=crashed)
    ref, res = (report.read_metrics(d) for d in (interrupted["reference"], crashed))
    assert [[r.get(k) for k in KEYS] for r in res] == [[r.get(k) for k in KEYS] for r in ref]
    assert _log(crashed) == _log(interrupted["reference"])
    a, b = _adapter(interrupted["reference"]), _adapter(crashed)
    assert all(a[k].equal(b[k]) for k in a)


def test_what_fedbuff_cannot_account_or_run_is_refused(setup):
    with pytest.raises(ConfigError, match="privacy.mode = 'client' is not supported .*device timing"):
        setup["cfg"](**{"federation.buffer_size": 2, "privacy.mode": "client"})
    with pytest.raises(ConfigError, match="needs run.engine = 'inprocess'"):
        setup["cfg"](**{"federation.buffer_size": 2, "devices.clock": False, "run.engine": "ray"})
    with pytest.raises(ConfigError, match="buffer_size <= federation.concurrency"):
        setup["cfg"](**{"federation.buffer_size": 3, "federation.concurrency": 2})
    with pytest.raises(ConfigError, match="strategy = 'scaffold' is not supported"):  # it was accepted, then every
        setup["cfg"](**{"federation.buffer_size": 2, "federation.strategy": "scaffold",  # reply was dropped
                        "train.optimizer": "sgd"})


def test_fedbuff_waits_for_and_sends_only_to_clients_the_trace_has_online(setup, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("client,start,end\n0,0,3\n1,0,1000\n")  # client 0 back at 3 s, client 1 off all run
    run_dir = runner.simulate(setup["cfg"](**{"federation.buffer_size": 2, "federation.concurrency": 2,
                                              "devices.availability_trace": str(trace)}))
    log = _log(run_dir)
    assert 1001 not in {e["node"] for e in log}
    assert [(e["node"], e["start"]) for e in log[:2]] == [(1000, 3.0), (1002, 3.0)]  # filled when two were online
    assert [r["replies"] for r in report.read_metrics(run_dir)] == [2, 2]


def test_observers_see_each_buffered_update_with_the_adapter_its_client_was_sent(setup):
    """The audit's capture hook under FedBuff: every applied update, decoded and not yet staleness-weighted, with
    the global adapter of the round its message carried (checked against the same run cut short)."""
    from fedpeft.runtime import get_runtime
    from fedpeft.server.loop import ObservedUpdate

    extra = {"federation.buffer_size": 2, "federation.rounds": 3, "devices.profiles": setup["profiles"]}
    seen: list[ObservedUpdate] = []
    cfg = setup["cfg"](**extra)
    full = runner.simulate(cfg, observers=[seen.append])
    rows = report.read_metrics(full)
    stale = [int(u.metrics["staleness"]) for u in seen]
    applied = sorted((u.round + s, u.node, u.partition_id, s) for u, s in zip(seen, stale))
    assert applied == sorted((r["round"], *b) for r in rows for b in r["buffered"])
    assert max(stale) == 2  # the straggler: sent in round 1, applied in update 3
    sent = {1: get_runtime(cfg).initial_adapter()}
    for cut in (1, 2, 3):
        run_dir = full if cut == 3 else runner.simulate(setup["cfg"](**{**extra, "federation.rounds": cut}))
        sent[cut + 1] = load_file(str(run_dir / "checkpoint" / "global.safetensors"))
    for u in seen:
        assert u.start_state.keys() == sent[u.round].keys()
        assert all(u.start_state[k].equal(sent[u.round][k]) for k in u.start_state), (u.round, u.node)
    # update 3 = the global after update 2 + the example-weighted mean of the observed deltas, each scaled by
    # 1 / sqrt(1 + staleness) by the server: what was observed is the decoded delta before that scaling
    last = [(u, s) for u, s in zip(seen, stale) if u.round + s == 3]
    total = sum(u.metrics["num-examples"] for u, _ in last)
    for k in sent[4]:
        step = sum(u.metrics["num-examples"] * asynchronous.staleness_weight(s, 0.5) * u.delta[k] for u, s in last)
        assert torch.allclose(sent[4][k], sent[3][k] + step / total, atol=1e-6), k
