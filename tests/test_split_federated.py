"""SplitFed end to end: `fedpeft simulate` with a [split] section, in process and against a real
`fedpeft split-server` process over gRPC that is killed and restarted mid-round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedpeft import report
from fedpeft.deploy.flower import free_port
from fedpeft.runtime import get_runtime
from fedpeft.simulation import runner
from fedpeft.split.plugin import split_of

SPLIT = {"split.enabled": True, "model.tiny_layers": 4, "split.front_layers": 1, "split.back_layers": 1,
         "federation.rounds": 2}


def test_splitfed_simulation_trains_and_reports_split_bytes(tiny_cfg):
    cfg = tiny_cfg(**SPLIT)
    run_dir = runner.simulate(cfg)
    rows = report.read_metrics(run_dir)
    assert all(r["replies"] == 3 and r["dropped"] == 0 for r in rows)
    rt = get_runtime(cfg)
    client_keys = set(split_of(rt).model.client_parameters())
    assert set(rt.layout.names) == client_keys and not client_keys & set(split_of(rt).model.server_parameters())
    for r in rows:  # only the client side travels in Flower messages; activations go through the body
        assert r["bytes_up"] < r["fl_adapter_bytes_fp32"] and r["split_bytes_up"] > 0 and r["split_bytes_down"] > 0
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] * 1.2
    summary = (run_dir / "summary.md").read_text()
    assert "split learning (front 1, back 1" in summary and "split_bytes_up" in summary
    assert (run_dir / "adapter" / "adapter_config.json").exists()  # client side + in-process body, peft format


def _start_server(scenario: Path, port: int, state: Path, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.cli", "split-server", str(scenario), "--port", str(port),
                             "--state-dir", str(state), "--save-every", "1"],
                            stdout=subprocess.PIPE, stderr=open(log, "ab"), start_new_session=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = proc.stdout.readline()  # the JSON ready line (blocks until the body is built and serving)
    assert json.loads(line)["split_server"].endswith(f":{port}"), line
    return proc


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.mark.slow
def test_split_server_process_killed_mid_round_and_clients_recover(tiny_cfg, tmp_path):
    port = free_port()
    cfg = tiny_cfg(**{**SPLIT, "federation.rounds": 1, "data.num_clients": 2, "train.local_steps": 30,
                      "split.address": f"127.0.0.1:{port}"})
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(cfg.to_toml())
    state, log = tmp_path / "split-state", tmp_path / "split-server.log"
    procs = [_start_server(scenario, port, state, log)]
    try:
        result: dict = {}
        sim = threading.Thread(target=lambda: result.setdefault("run", runner.simulate(cfg)), daemon=True)
        sim.start()
        deadline = time.time() + 120
        while not any(state.glob("**/*.safetensors")) and time.time() < deadline:  # a backward step was served
            time.sleep(0.05)
        assert any(state.glob("**/*.safetensors")), "the split server never saved a step"
        _kill(procs[0])                                   # mid-round: clients are between steps
        procs.append(_start_server(scenario, port, state, log))
        sim.join(timeout=300)
        assert not sim.is_alive() and "run" in result, "the federated round did not finish"
        rows = report.read_metrics(result["run"])
        assert rows[0]["replies"] == 2 and rows[0]["dropped"] == 0
        stats = split_of(get_runtime(cfg)).service.stats
        assert stats.reconnects >= 1                      # the clients really lost and regained the server
        assert rows[0]["train_loss"] is not None and rows[0]["split_bytes_up"] > 0
    finally:
        for p in procs:
            _kill(p)


def test_splitfed_resume_continues_exactly(tiny_cfg, monkeypatch):
    """The in-process body's adapters and optimizer are checkpointed with the run."""
    from conftest import interrupt_and_resume
    keys = ("train_loss", "eval_loss", "bytes_up", "split_bytes_up")
    full = report.read_metrics(runner.simulate(tiny_cfg(**{**SPLIT, "federation.rounds": 3})))
    resumed = report.read_metrics(interrupt_and_resume(tiny_cfg(**{**SPLIT, "federation.rounds": 3}), 3, monkeypatch))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]
