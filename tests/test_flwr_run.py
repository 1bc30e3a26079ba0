"""`flwr run .` with Flower's own processes: the repository, submitted as a Flower App bundle to a live
SuperLink with two SuperNodes, trains a round of a packaged scenario into ``output.dir`` (docs/flower.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from fedpeft import config, report
from fedpeft.deploy import flower

from conftest import write_classification

ROOT = Path(__file__).resolve().parents[1]


def _start(args: list[str], home: Path, log: Path) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(args, env=flower.flower_env(home), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.mark.slow
def test_flwr_run_dot_trains_a_packaged_scenario_on_a_live_superlink(tmp_path: Path) -> None:
    port = flower.free_port()
    home = tmp_path / "flwr-home"  # the user's FLWR_HOME: the federation `local` is a SuperLink connection
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    data = write_classification(tmp_path / "topics.jsonl", n=120)
    procs: list[subprocess.Popen] = []
    try:
        link = _start([flower.flower_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                       str(port), "--disable-runtime-dependency-installation"], tmp_path / "home-link",
                      tmp_path / "superlink.log")
        procs.append(link)
        flower.wait_healthy(port, link, timeout=120)
        for i in range(2):
            procs.append(_start([flower.flower_bin("flower-supernode"), "--insecure", "--superlink",
                                 f"127.0.0.1:{port}", "--port", str(flower.free_port()), "--node-config",
                                 f"partition-id={i} num-partitions=2"], tmp_path / f"home-n{i}",
                                tmp_path / f"n{i}.log"))
        # `quickstart` by name (the bundle holds simulations/, not the package's link to it), made tiny
        run_config = (f'scenario="quickstart" model.name="tiny-bert" model.max_length=48 adapter.r=4 '
                      f'data.source="file" data.path="{data}" data.num_clients=2 data.partition="iid" '
                      f'train.local_steps=2 train.batch_size=8 federation.rounds=1 federation.round_timeout=300 '
                      f'run.threads=1 output.plots=false output.dir="{tmp_path / "runs"}"')
        out = subprocess.run([flower.flower_bin("flwr"), "run", ".", "local", "--run-config", run_config, "--stream"],
                             cwd=ROOT, env=flower.flower_env(home), capture_output=True, text=True, timeout=600)
        logs = out.stdout[-3000:] + out.stderr[-2000:]
        assert out.returncode == 0 and (tmp_path / "runs").is_dir(), logs  # the ServerApp's errors are streamed
        (run_dir,) = (tmp_path / "runs").iterdir()
        assert run_dir.name.startswith("quickstart-")
        (row,) = report.read_metrics(run_dir)
        assert row["round"] == 1 and row["replies"] == 2 and row["eval_accuracy"] is not None, logs
        cfg = config.load(run_dir / "config.toml")
        assert (cfg.model.name, cfg.data.num_clients, cfg.train.lr) == ("tiny-bert", 2, 1e-3)  # lr: the scenario's
        assert (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "summary.md").is_file()
        listed = subprocess.run([flower.flower_bin("flwr"), "ls", "local", "--format", "json"], cwd=tmp_path,
                                env=flower.flower_env(home), capture_output=True, text=True, timeout=120)
        runs = json.loads(listed.stdout[listed.stdout.index("{"):])["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], listed.stdout
    finally:
        _stop(procs)
