"""FedBuff on a real deployment: a SuperLink and three SuperNodes on loopback (real processes, warm executors), one
of them slow because it holds far more data (train.local_epochs = 1: 250 local steps against 2). The server keeps
three messages in flight through Flower's Message API and applies an update whenever two replies are in, without
waiting for the slow node, whose update arrives later, down-weighted by its staleness."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_deploy import _cli, _plain_superlink

from fedpeft.deploy import flower
from fedpeft.simulation.clock import CLIENTS_FILE

from conftest import tiny_overrides, write_classification

SIZES = (16, 16, 2000)  # examples per node: partition 2 trains 250 steps of 8, the others 2
UPDATES = 10  # the slow reply came back after 5 updates at load 15


@pytest.mark.slow
def test_fedbuff_on_a_real_deployment_does_not_wait_for_the_slow_node(tmp_path: Path) -> None:
    with _plain_superlink(tmp_path) as (cluster, _, port):
        for i, n in enumerate(SIZES):
            own = write_classification(tmp_path / f"own{i}.jsonl", n=n, seed=i + 1)
            cluster.start(f"n{i}", _cli("node", "--superlink", f"127.0.0.1:{port}", "--insecure", "--port",
                                        flower.free_port(), "--partition-id", i, "--data", own, "--warm"),
                          tmp_path / f"home-n{i}")
        home = tmp_path / "home-cli"
        sets = tiny_overrides(write_classification(tmp_path / "all.jsonl", n=120), tmp_path / "runs", **{
            "data.num_clients": 3, "federation.rounds": UPDATES, "federation.buffer_size": 2,
            "federation.concurrency": 3, "federation.min_clients": 1, "federation.round_timeout": 240.0,
            "federation.node_wait_timeout": 120.0, "train.local_steps": 0, "train.local_epochs": 1.0,
            "model.max_length": 32, "run.threads": 1})
        out = subprocess.run(_cli("run", "--superlink", f"127.0.0.1:{port}", "--insecure", "--flwr-home", home,
                                  "--wait", *[a for s in sets for a in ("--set", s)]),
                             capture_output=True, text=True, timeout=600, env=flower.flower_env(home))
        logs = "".join(cluster.log(f"n{i}") for i in range(3))
        assert out.returncode == 0, out.stdout + out.stderr + logs
    run_dir = Path(json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("{")))["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, UPDATES + 1)) and all(r["replies"] == 2 for r in rows)
    # (node, partition, staleness) of every applied update, by the partition each node reports
    applied = [[tuple(b) for b in r["buffered"]] for r in rows]
    node_of = {p: node for entries in applied for node, p, _ in entries}
    # the first update did not wait for node 2 (a fast node may fill both of its slots: it was sent the next
    # version as soon as it replied, and FedBuff takes whichever two replies arrive first)
    assert len(applied[0]) == 2 and 2 not in [p for _, p, _ in applied[0]], applied
    slow = [(rnd, tau) for rnd, entries in enumerate(applied, 1) for _, p, tau in entries if p == 2]
    assert slow and all(tau >= 1 for _, tau in slow), applied  # it arrived later, trained from an older version
    assert rows[slow[0][0] - 1]["staleness_max"] >= 1
    flights = [json.loads(line) for line in (run_dir / CLIENTS_FILE).read_text().splitlines()]
    per_node = {p: sum(f["node"] == node for f in flights) for p, node in node_of.items()}
    assert per_node[2] < per_node[0] and per_node[2] < per_node[1], (per_node, flights)
    assert all(f["status"] == "ok" for f in flights)
