"""The virtual clock: device draws, the hand-computed time of a two-client round from the exact bytes, late
clients dropped by the simulated round_timeout, and the same seed giving the same event log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedpeft import cli, config, report
from fedpeft.errors import ConfigError
from fedpeft.simulation import clock, runner
from fedpeft.simulation.clocked import CLIENTS_FILE

from conftest import tiny_overrides, write_classification

# two clients: (slowdown, uplink Mbit/s, downlink Mbit/s, latency ms)
PROFILES = {0: (1.0, 1.0, 10.0, 50.0), 1: (3.0, 2.0, 5.0, 20.0)}
STEPS, STEP_SECONDS = 2, 0.5


def test_distributions_parse_draw_and_refuse_bad_specs():
    rng = np.random.default_rng(0)
    assert clock.parse_distribution("k", "2.5") == ("fixed", (2.5,))
    assert (clock.draw(clock.parse_distribution("k", "pareto:1"), rng, 1000) >= 1).all()
    assert (clock.draw(clock.parse_distribution("k", "pareto:2,3"), rng, 1000) >= 3).all()
    u = clock.draw(clock.parse_distribution("k", "uniform:1,4"), rng, 1000)
    assert 1 <= u.min() and u.max() <= 4
    for bad, words in (("zipf:1", "unknown distribution 'zipf'"), ("uniform:4,1", "0 < LO <= HI"),
                       ("pareto:a", "must be numbers"), ("lognormal:1", "wrong parameters")):
        with pytest.raises(ConfigError, match=words):
            clock.parse_distribution("network.uplink_mbps", bad)


def test_the_same_seed_draws_the_same_devices_and_a_csv_overrides_them(tmp_path):
    sets = ["devices.slowdown=pareto:1", "network.uplink_mbps=lognormal:0,1", "data.num_clients=5"]
    a, b = (clock.devices_for(config.load(None, sets), 5) for _ in range(2))
    assert a == b and len({d.slowdown for d in a}) == 5
    other = clock.devices_for(config.load(None, [*sets, "run.seed=1"]), 5)
    assert other != a
    csv = tmp_path / "devices.csv"
    csv.write_text("client,slowdown,latency_ms\n3,7.5,200\n")
    with_csv = clock.devices_for(config.load(None, [*sets, f"devices.profiles={csv}"]), 5)
    assert with_csv[3].slowdown == 7.5 and with_csv[3].latency_s == 0.2
    assert with_csv[3].uplink_mbps == a[3].uplink_mbps and with_csv[:3] == a[:3]
    csv.write_text("client,speed\n0,2\n")
    with pytest.raises(ConfigError, match="columns must be 'client' and any of"):
        clock.devices_for(config.load(None, [*sets, f"devices.profiles={csv}"]), 5)


def test_transfer_time_is_latency_plus_bits_over_rate_stretched_by_loss():
    assert clock.transfer_seconds(10_000, 10.0, 0.05, 0.0) == pytest.approx(0.05 + 0.008, abs=1e-12)
    assert clock.transfer_seconds(10_000, 1.0, 0.0, 0.5) == pytest.approx(0.16, abs=1e-12)


def test_bad_clock_settings_exit_2_with_one_line(capsys):
    assert cli.main(["simulate", "--set", "devices.clock=true", "--set", "run.engine=ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert "devices.clock needs run.engine = 'inprocess'" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def two_clients(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs of two clients with known devices: no timeout (twice), and a timeout just before the slow one."""
    tmp = tmp_path_factory.mktemp("clock")
    data = write_classification(tmp / "topics.jsonl", n=60)
    profiles = tmp / "devices.csv"
    profiles.write_text("client,slowdown,uplink_mbps,downlink_mbps,latency_ms\n" + "".join(
        f"{c},{s},{u},{d},{lat}\n" for c, (s, u, d, lat) in PROFILES.items()))

    def run(**extra: object) -> Path:
        sets = {"data.num_clients": 2, "federation.rounds": 1, "train.local_steps": STEPS, "model.max_length": 16,
                "devices.clock": True, "devices.step_seconds": STEP_SECONDS, "devices.profiles": str(profiles),
                **extra}
        return runner.simulate(config.load(None, tiny_overrides(data, tmp / "runs", **sets)))

    free = [run(), run()]
    rows = [json.loads(line) for line in (free[0] / CLIENTS_FILE).read_text().splitlines()]
    slow_finish = max(r["finish"] for r in rows)
    return {"free": free, "rows": rows, "timed": run(**{"federation.round_timeout": slow_finish - 1e-4})}


def expected_finish(client: int, bytes_down: int, bytes_up: int) -> float:
    """By hand: latency + bits / downlink, steps x step time x slowdown, latency + bits / uplink."""
    slowdown, up, down, latency = PROFILES[client]
    return (latency / 1000 + bytes_down * 8 / (down * 1e6) + STEPS * STEP_SECONDS * slowdown
            + latency / 1000 + bytes_up * 8 / (up * 1e6))


def test_two_clients_round_time_is_the_slowest_hand_computed_finish(two_clients):
    rows, metrics = two_clients["rows"], report.read_metrics(two_clients["free"][0])[0]
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    # the clock's bytes are the protocol's own counts of the serialized messages
    assert sum(r["bytes_up"] for r in rows) == metrics["bytes_up"] > 0
    assert sum(r["bytes_down"] for r in rows) == metrics["bytes_down"] > 0
    finish = {r["node"] - 1000: expected_finish(r["node"] - 1000, r["bytes_down"], r["bytes_up"]) for r in rows}
    for r in rows:
        assert r["finish"] == pytest.approx(finish[r["node"] - 1000], abs=2e-6)
    assert metrics["sim_time"] == metrics["sim_seconds"] == pytest.approx(max(finish.values()), abs=2e-6)
    assert finish[1] > finish[0] + 1  # the slow device decides the round


def test_a_client_is_dropped_by_the_simulated_timeout_exactly_when_it_finishes_later(two_clients):
    rows = [json.loads(line) for line in (two_clients["timed"] / CLIENTS_FILE).read_text().splitlines()]
    metrics = report.read_metrics(two_clients["timed"])[0]
    timeout = max(r["finish"] for r in two_clients["rows"]) - 1e-4
    status = {r["node"]: (r["status"], r["finish"]) for r in rows}
    assert status[1000][0] == "ok" and status[1000][1] < timeout
    assert status[1001][0] == "late" and status[1001][1] > timeout
    assert metrics["replies"] == 1 and metrics["dropped_nodes"] == {"1001": "no reply"}
    assert metrics["sim_seconds"] == pytest.approx(timeout, abs=1e-6)  # the server waited until the deadline


def test_the_same_seed_gives_the_same_event_log_and_metrics(two_clients):
    logs = [[json.loads(line) for line in (d / CLIENTS_FILE).read_text().splitlines()] for d in two_clients["free"]]
    assert clock.log_hash(logs[0]) == clock.log_hash(logs[1])
    keys = ("sim_time", "bytes_up", "bytes_down", "eval_accuracy", "eval_loss", "train_loss")
    a, b = (report.read_metrics(d)[0] for d in two_clients["free"])
    assert [a[k] for k in keys] == [b[k] for k in keys]


def test_summary_reports_simulated_time(two_clients):
    summary = (two_clients["free"][0] / "summary.md").read_text()
    assert "sim_time" in summary and "simulated time" in summary


def test_offline_and_dropped_out_clients_answer_with_their_reason(tmp_path):
    data = write_classification(tmp_path / "topics.jsonl", n=60)
    profiles = tmp_path / "devices.csv"
    profiles.write_text("client,availability,dropout\n1,0,0\n2,1,1\n")
    sets = {"data.num_clients": 3, "federation.rounds": 1, "train.local_steps": STEPS, "model.max_length": 16,
            "devices.clock": True, "devices.step_seconds": STEP_SECONDS, "devices.profiles": str(profiles)}
    run_dir = runner.simulate(config.load(None, tiny_overrides(data, tmp_path / "runs", **sets)))
    metrics = report.read_metrics(run_dir)[0]
    log = {r["node"]: r for r in (json.loads(line) for line in (run_dir / CLIENTS_FILE).read_text().splitlines())}
    assert metrics["replies"] == 1 and set(metrics["dropped_nodes"]) == {"1001", "1002"}
    assert "unavailable" in metrics["dropped_nodes"]["1001"] and "dropped out" in metrics["dropped_nodes"]["1002"]
    assert log[1001]["status"] == "unavailable" and log[1001]["finish"] == 0.0 and log[1001]["bytes_down"] == 0
    assert log[1002]["status"] == "dropout" and log[1002]["bytes_up"] == 0
    assert 0 < log[1002]["compute_s"] < STEPS * STEP_SECONDS  # it went part way through its work
    assert metrics["sim_time"] == pytest.approx(max(log[1000]["finish"], log[1002]["finish"]), abs=1e-6)


def test_secagg_stages_each_take_their_exact_bytes_and_only_the_masking_stage_trains(tmp_path):
    data = write_classification(tmp_path / "topics.jsonl", n=60)
    sets = {"data.num_clients": 3, "federation.rounds": 1, "train.local_steps": STEPS, "model.max_length": 16,
            "devices.clock": True, "devices.step_seconds": STEP_SECONDS,
            "privacy.secure_aggregation": "secaggplus"}
    run_dir = runner.simulate(config.load(None, tiny_overrides(data, tmp_path / "runs", **sets)))
    metrics = report.read_metrics(run_dir)[0]
    log = [json.loads(line) for line in (run_dir / CLIENTS_FILE).read_text().splitlines()]
    stages = list(dict.fromkeys(r["kind"] for r in log))
    assert stages == ["setup", "share_keys", "collect_masked_vectors", "unmask"]
    assert sum(r["bytes_up"] for r in log) == metrics["bytes_up"] and sum(r["bytes_down"] for r in log) == \
        metrics["bytes_down"]
    assert {r["kind"] for r in log if r["compute_s"]} == {"collect_masked_vectors"}
    assert {r["compute_s"] for r in log if r["compute_s"]} == {STEPS * STEP_SECONDS}
    ends = [max(r["finish"] for r in log if r["kind"] == s) for s in stages]  # each stage starts when the last ended
    assert all(min(r["start"] for r in log if r["kind"] == s) == pytest.approx(e, abs=1e-6)
               for s, e in zip(stages[1:], ends))
    assert metrics["sim_time"] == pytest.approx(ends[-1], abs=1e-6)


def test_time_to_target_in_the_sweep_row_and_the_curves(tmp_path):
    from fedpeft.simulation import sweep

    rows = [{"round": r, "replies": 2, "bytes_up": 100, "bytes_up_fp32": 400, "bytes_up_fp16": 200,
             "bytes_down": 50, "train_loss": 1.0, "eval_loss": 1.0 / r, "eval_accuracy": a, "sim_time": 10.0 * r}
            for r, a in ((1, 0.5), (2, 0.86), (3, 0.84), (4, 0.9))]
    assert report.time_to_target(rows, 0.85) == 20.0 and report.time_to_target(rows, 0.95) is None
    row = sweep.summarize("none", rows, tmp_path, target=0.85)
    assert row["time_to_target_s"] == 20.0 and row["sim_time_s"] == 40.0
    assert sweep.summarize("none", [{k: v for k, v in r.items() if k != "sim_time"} for r in rows], tmp_path,
                           target=0.85)["time_to_target_s"] is None  # no clock, no time
    report.plot_curves(rows, tmp_path / "curves.png")
    from PIL import Image

    assert Image.open(tmp_path / "curves.png").size[0] > 1200  # three panels: the third against simulated time


@pytest.mark.parametrize("mode", ["flops", "measured"])
def test_flops_and_measured_compute_times(tmp_path, mode):
    from fedpeft.runtime import RuntimeCache
    from fedpeft.simulation.clocked import ClockedGrid

    data = write_classification(tmp_path / "topics.jsonl", n=60)
    cfg = config.load(None, tiny_overrides(data, tmp_path / "runs", **{
        "data.num_clients": 2, "devices.clock": True, "devices.compute": mode, "devices.flops": 1e9,
        "devices.slowdown": "fixed:4"}))
    runtimes = RuntimeCache()
    grid = ClockedGrid(None, 2, {"run-dir": str(tmp_path)}, runtimes, cfg)  # type: ignore[arg-type]
    if mode == "measured":
        assert grid.compute_seconds("train", 0, 0.25) == 1.0 and grid.compute_seconds(None, 1, 0.5) == 2.0
        return
    params = sum(p.numel() for p in runtimes.get(cfg).model.parameters())
    step = 6 * params * cfg.train.batch_size * cfg.model.max_length / 1e9
    assert grid.compute_seconds("train", 0, 99.0) == pytest.approx(cfg.train.local_steps * step * 4, rel=1e-12)
    assert grid.compute_seconds(None, 0, 99.0) == 0.0  # a SecAgg+ key stage


def test_availability_traces_say_who_is_online_and_bad_rows_are_refused(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("client,start,end,on,off,phase\n0,10,20,,,\n0,30,35,,,\n1,,,4,2,1\n")
    t = clock.read_trace(trace, 3)
    assert [t.online(0, x) for x in (9.9, 10, 19.9, 20, 32)] == [True, False, False, True, False]
    assert [t.online(1, x) for x in (0.5, 1, 4.9, 5, 6.9, 7)] == [False, True, True, False, False, True]
    assert all(t.online(2, x) for x in (0, 1e6))  # no rows: always online
    assert t.offline_from(0, 0, 10) is None and t.offline_from(0, 0, 10.5) == 10 and t.offline_from(0, 12, 13) == 12
    assert t.offline_from(1, 1, 9) == 5 and t.next_online(1, 5, 9) == 7 and t.next_online(0, 10, 19) is None
    for body, words in (("client,start\n0,1\n", "line 2: give start and end"), ("client,when\n0,1\n", "columns"),
                        ("client,start,end\n3,0,1\n", "client must be in 0..2"),
                        ("client,on,off\n0,1,0\n", "both > 0"), ("client,start,end\n0,x,1\n", "not a number")):
        trace.write_text(body)
        with pytest.raises(ConfigError, match=words):
            clock.read_trace(trace, 3)
    with pytest.raises(ConfigError, match="set devices.clock = true"):
        config.load(None, [f"devices.availability_trace={trace}"])


def _traced_run(tmp_path: Path, trace: str, **extra: object) -> tuple[list[dict], list[dict]]:
    data = write_classification(tmp_path / "topics.jsonl", n=60)
    (tmp_path / "trace.csv").write_text(trace)
    sets = {"data.num_clients": 3, "federation.rounds": 2, "train.local_steps": STEPS, "model.max_length": 16,
            "devices.clock": True, "devices.step_seconds": STEP_SECONDS,
            "devices.availability_trace": str(tmp_path / "trace.csv"), **extra}
    run_dir = runner.simulate(config.load(None, tiny_overrides(data, tmp_path / "runs", **sets)))
    log = [json.loads(line) for line in (run_dir / CLIENTS_FILE).read_text().splitlines()]
    return report.read_metrics(run_dir), log


def test_a_client_offline_in_the_trace_is_not_sampled_and_its_reply_in_flight_is_lost(tmp_path):
    # client 0 is off all run; client 2 goes off at 0.5 s, in the middle of its 1 s of round-1 compute
    rows, log = _traced_run(tmp_path, "client,start,end\n0,0,1000\n2,0.5,0.6\n", **{"federation.clients_per_round": 2})
    assert 1000 not in {e["node"] for e in log}
    lost = next(e for e in log if e["node"] == 1002 and e["round"] == 1)
    assert lost["status"] == "offline" and lost["finish"] == 0.5 and lost["bytes_up"] == 0
    assert rows[0]["replies"] == 1
    assert rows[0]["dropped_nodes"] == {"1002": "failed: went offline (virtual clock trace)"}
    assert [e["status"] for e in log if e["round"] == 2] == ["ok", "ok"]  # back online after 0.6 s: sampled again


def test_the_server_waits_in_simulated_time_for_clients_the_trace_has_offline(tmp_path):
    rows, log = _traced_run(tmp_path, "client,start,end\n0,0,7\n", **{"federation.rounds": 1})
    assert [e["start"] for e in log] == [7.0, 7.0, 7.0]  # all three wanted: sampled when client 0 came back
    assert rows[0]["replies"] == 3 and rows[0]["sim_time"] > 7.0
