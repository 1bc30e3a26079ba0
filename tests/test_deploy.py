"""Deployment: certificates, node keys, node-local data, and a real SuperLink + SuperNodes on loopback.

The integration test starts every process through the ``fedpeft`` CLI in its own session and kills
the process groups it made. TLS and SuperNode authentication are on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides, write_classification

from fedpeft import cli, config
from fedpeft.deploy import certs, flower, launch, submit
from fedpeft.errors import FedPeftError


def test_certs_and_node_key(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    paths = certs.make_certs("edge-server", tmp_path)
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "edge-server" in san.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert oct(paths.server_key.stat().st_mode & 0o777) == "0o600"
    key = certs.make_node_key(tmp_path)
    assert key.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert serialization.load_ssh_private_key(key.private.read_bytes(), None).key_size == 384
    with pytest.raises(FedPeftError, match="exists"):
        certs.make_node_key(tmp_path)


def test_cli_certs_and_node_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["certs", "--host", "fl.example.org", "--san", "10.0.0.5", "--out", str(tmp_path)]) == 0
    assert Path(json.loads(capsys.readouterr().out)["server_cert"]).is_file()
    assert cli.main(["node-key", "--out", str(tmp_path), "--name", "edge"]) == 0
    assert (tmp_path / "edge.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert cli.main(["node-key", "--out", str(tmp_path), "--name", "edge"]) == 2  # refuses to overwrite


def test_command_lines(tmp_path: Path) -> None:
    certs.make_certs("localhost", tmp_path)
    args = launch.superlink_args("127.0.0.1", 9999, tmp_path)
    assert "--enable-supernode-auth" in args and "--disable-runtime-dependency-installation" in args
    assert "--insecure" not in args
    with pytest.raises(FedPeftError, match="TLS"):
        launch.superlink_args(insecure=True)
    assert "--insecure" in launch.superlink_args(insecure=True, auth=False)
    data = write_classification(tmp_path / "d.jsonl", n=12)
    opts = launch.NodeOptions("h:9092", data=data, partition_id=1, ca=tmp_path / "ca.crt", warm=True)
    node = launch.node_args(opts)
    assert node[node.index("--node-config") + 1] == f'data-path="{data.resolve()}" partition-id=1'
    assert ["--isolation", "process"] == node[node.index("--isolation"):node.index("--isolation") + 2]
    with pytest.raises(FedPeftError, match="--data"):
        launch.node_args(launch.NodeOptions("h:9092"))


def test_node_local_data_file_is_the_whole_partition(tmp_path: Path) -> None:
    from fedpeft.runtime import Runtime

    cfg = config.load(None, tiny_overrides(write_classification(tmp_path / "all.jsonl"), tmp_path / "runs"))
    own = write_classification(tmp_path / "own.jsonl", n=30, seed=5)
    rt = Runtime(cfg, data_path=str(own))
    assert len(rt.partitions) == 1 and np.array_equal(rt.partitions[0], np.arange(30))
    assert len(rt.client_dataset(0)) == 30 and len(rt.eval_examples) == 0


# ---------------------------------------------------------------------------------- integration

def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "fedpeft.cli", *map(str, args)]


class Cluster:
    """Processes started by one test, each in its own session; :meth:`stop` kills their groups."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs = root, {}

    def start(self, name: str, args: list[str], home: Path) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(args, env=flower.flower_env(home), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        try:
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.procs[name].wait()

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name)


@pytest.mark.slow
def test_real_deployment_tls_auth_compeft_and_a_node_failure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    t0 = time.time()
    pki = certs.make_certs("localhost", tmp_path / "certs")
    keys = {n: certs.make_node_key(tmp_path / "keys", name=n) for n in ("a", "b", "intruder")}
    server_data = write_classification(tmp_path / "all.jsonl", n=120)
    node_data = {n: write_classification(tmp_path / f"{n}.jsonl", n=48, seed=i + 1) for i, n in enumerate("ab")}
    port = flower.free_port()
    address = f"127.0.0.1:{port}"
    cluster = Cluster(tmp_path)
    try:
        link = cluster.start("superlink", _cli("superlink", "--host", "127.0.0.1", "--port", port, "--certs",
                                               tmp_path / "certs"), tmp_path / "home-link")
        flower.wait_healthy(port, link, ca=pki.ca_cert)
        cli_home = tmp_path / "home-cli"
        submit.connect(cli_home, address, pki.ca_cert)
        for n in "ab":
            submit.register_node(cli_home, keys[n].public)

        def node(name: str, *extra: object) -> subprocess.Popen:
            return cluster.start(name, _cli("node", "--superlink", address, "--ca", pki.ca_cert, "--key",
                                            keys[name].private, "--port", flower.free_port(), *extra),
                                 tmp_path / f"home-{name}")

        intruder = node("intruder", "--data", server_data, "--max-wait", 30)
        node("a", "--data", node_data["a"], "--partition-id", 0, "--warm")
        node("b", "--data", node_data["b"], "--partition-id", 1)

        sets = tiny_overrides(server_data, tmp_path / "runs", **{
            "data.num_clients": 2, "federation.rounds": 2, "federation.min_clients": 1,
            "federation.round_timeout": 30.0, "federation.node_wait_timeout": 30.0,
            "compression.uplink": "compeft:0.2", "run.threads": 1})
        out = subprocess.run(_cli("run", "--superlink", address, "--ca", pki.ca_cert, "--flwr-home", cli_home,
                                  *[a for s in sets for a in ("--set", s)]),
                             capture_output=True, text=True, timeout=120, env=flower.flower_env(cli_home))
        assert out.returncode == 0, out.stderr
        submitted = json.loads(out.stdout.strip().splitlines()[-1])
        run_id, run_dir = int(submitted["run_id"]), Path(submitted["run_dir"])

        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):  # round 1 done -> round 2 is starting
            assert time.time() - t0 < 150, cluster.log("superlink") + cluster.log("b")
            time.sleep(0.2)
        cluster.kill("b")
        status = submit.wait(cli_home, run_id, timeout=120)
        assert status == "finished:completed", submit.logs(cli_home, run_id)

        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
        assert rows[0]["replies"] == 2, ("no replies in round 1: if the superlink log says 'Invalid destination node "
                                         "ID', server/loop.py _sample turned 64-bit node ids into floats")
        assert rows[1]["replies"] == 1 and rows[1]["dropped"] == 1
        assert rows[0]["bytes_up"] < rows[0]["bytes_up_fp32"] / 3  # compeft:0.2 on the wire (tiny adapter)
        assert rows[1]["eval_accuracy"] is not None

        assert cli.main(["status", str(run_id), "--flwr-home", str(cli_home)]) == 0
        assert json.loads(capsys.readouterr().out)[0]["status"] == "finished:completed"
        assert cli.main(["logs", str(run_id), "--flwr-home", str(cli_home)]) == 0
        assert capsys.readouterr().out.strip()

        from peft import PeftModel

        from fedpeft import models

        cfg = config.load(run_dir / "config.toml")
        base = models.load_base_model(cfg.model, num_labels=3, seed=0)
        model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
        assert any("lora" in name for name, _ in model.named_parameters())

        assert intruder.wait(timeout=60) != 0  # flwr_exit maps Flower's code 305 to exit status 1
        assert "Exit Code: 305" in cluster.log("intruder"), cluster.log("intruder")
    finally:
        cluster.stop()


@pytest.mark.slow
def test_superlink_restart_then_resume_continues_the_run(tmp_path: Path) -> None:
    pki = certs.make_certs("localhost", tmp_path / "certs")
    data = write_classification(tmp_path / "all.jsonl", n=120)
    port = flower.free_port()
    address = f"127.0.0.1:{port}"
    cluster = Cluster(tmp_path)

    def superlink(tag: str) -> None:
        proc = cluster.start(f"superlink{tag}", _cli("superlink", "--host", "127.0.0.1", "--port", port, "--certs",
                                                     tmp_path / "certs", "--database", tmp_path / "state.db"),
                             tmp_path / "home-link")
        flower.wait_healthy(port, proc, ca=pki.ca_cert)

    try:
        superlink("1")
        home = tmp_path / "home-cli"
        submit.connect(home, address, pki.ca_cert)
        for i in range(2):
            key = certs.make_node_key(tmp_path / "keys", name=f"n{i}")
            submit.register_node(home, key.public)
            cluster.start(f"n{i}", _cli("node", "--superlink", address, "--ca", pki.ca_cert, "--key", key.private,
                                        "--port", flower.free_port(), "--partition-id", i),
                          tmp_path / f"home-n{i}")
        cfg = config.load(None, tiny_overrides(data, tmp_path / "runs", **{
            "data.num_clients": 2, "federation.rounds": 3, "federation.round_timeout": 60.0, "run.threads": 1}))
        _, run_dir = submit.submit(home, cfg)
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.exists() and metrics.read_text().strip()):
            assert time.time() < deadline, cluster.log("superlink1")
            time.sleep(0.2)
        cluster.kill("superlink1")  # the ServerApp dies with it, after the round-1 checkpoint
        superlink("2")  # same database: the nodes stay registered and reconnect by themselves
        out = subprocess.run(_cli("run", "--resume", run_dir, "--flwr-home", home, "--wait"), capture_output=True,
                             text=True, timeout=240, env=flower.flower_env(home))
        assert out.returncode == 0, out.stdout + out.stderr
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2, 3] and all(r["replies"] == 2 for r in rows)
        assert (run_dir / "adapter").is_dir()
    finally:
        cluster.stop()
