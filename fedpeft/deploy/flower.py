"""Drive Flower's own processes: a SuperLink on a free loopback port, ``flwr run``, the run's status.

Shared by the Ray simulation engine and the deployment commands. Each use gets a private
``FLWR_HOME`` (connections are configured there, never in a pyproject), and the processes it starts
run in their own process group so they can be torn down completely.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import tomli_w

from fedpeft.errors import FedPeftError

CONNECTION = "fedpeft"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower processes: private FLWR_HOME, no telemetry or update checks."""
    env = dict(os.environ)
    # Flower's processes start each other by name (flower-superexec, flwr-serverapp, ...)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1")})
    return env


def flower_bin(name: str) -> str:
    """Path of a Flower console script installed beside this Python."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def app_dir(dest: Path) -> Path:
    """Copy the thin Flower App (a pyproject.toml only) to ``dest`` and return it."""
    dest.mkdir(parents=True, exist_ok=True)
    src = files("fedpeft.deploy").joinpath("flwrapp/pyproject.toml")
    (dest / "pyproject.toml").write_text(src.read_text())
    return dest


@dataclass
class FlowerProcesses:
    """Processes started for one use; :meth:`stop` kills their process groups."""

    home: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.home / f"{log_name}.log", "ab")
        proc = subprocess.Popen(args, env=flower_env(self.home), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.home / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def wait_healthy(port: int, proc: subprocess.Popen | None, timeout: float = 60.0, ca: Path | None = None,
                 host: str = "127.0.0.1") -> None:
    """Wait until the SuperLink answers on /health (HTTPS verified against ``ca`` if given)."""
    deadline = time.time() + timeout
    ctx = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    url = f"{'https' if ca is not None else 'http'}://{host}:{port}/health"
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FedPeftError(f"flower-superlink exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise FedPeftError(f"flower-superlink did not become healthy on port {port} within {timeout:.0f} s")


def write_connection(home: Path, address: str, root_certificates: Path | None = None) -> None:
    """Write the SuperLink connection ``fedpeft`` into ``$FLWR_HOME/config.toml``."""
    conn: dict = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(root_certificates.resolve())
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


def flwr(home: Path, *args: str, timeout: float = 120.0) -> dict:
    """Run a ``flwr`` CLI command with ``--format json`` and return its parsed output."""
    cmd = [flower_bin("flwr"), *args, "--format", "json"]
    res = subprocess.run(cmd, env=flower_env(home), capture_output=True, text=True, timeout=timeout)
    out = res.stdout.strip()
    try:
        parsed = json.loads(out[out.index("{"):]) if "{" in out else {}
    except ValueError:
        parsed = {}
    if res.returncode != 0 or not parsed.get("success", True):
        raise FedPeftError(f"`flwr {' '.join(args[:1])}` failed: {parsed.get('error-message') or out or res.stderr}")
    return parsed


def run_app(home: Path, app: Path, run_config: dict, federation_config: str | None = None) -> int:
    """Submit the app with ``run_config`` (written to a TOML file); returns the run id."""
    rc_file = home / "run-config.toml"
    rc_file.write_text(tomli_w.dumps(run_config))
    args = ["run", str(app), CONNECTION, "--run-config", str(rc_file)]
    if federation_config:
        args += ["--federation-config", federation_config]
    return int(flwr(home, *args)["run-id"])


def run_log(home: Path, run_id: int, timeout: float = 60.0) -> str:
    """Everything the run's processes logged to the SuperLink, as ``flwr log --show`` prints it."""
    cmd = [flower_bin("flwr"), "log", str(run_id), CONNECTION, "--show"]
    try:
        res = subprocess.run(cmd, env=flower_env(home), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FedPeftError(f"`flwr log {run_id}` did not answer within {timeout:.0f} s") from None
    if res.returncode != 0:
        raise FedPeftError(f"`flwr log {run_id}` failed: {(res.stderr or res.stdout).strip()[-500:]}")
    return res.stdout


@contextlib.contextmanager
def control_client(home: Path) -> Iterator[Any]:
    """Flower's Control API client for the connection configured in ``home``, in this process: a ``flwr ls``
    process costs about a second of CPU, which a poll every 2 s would take from the run it waits for."""
    import click
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection

    before = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(home)  # where Flower reads the connection, its certificates and tokens
    client = None
    try:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # Flower prints "Using SuperLink: ..." there
                client = init_http_client_from_connection(read_superlink_connection(CONNECTION))
        except click.ClickException as e:
            raise FedPeftError(f"no SuperLink connection in {home}: {e.format_message()}") from None
        yield client
    finally:
        if client is not None:
            client.close()
        if before is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = before


def run_status(client: Any, run_id: int) -> str:
    """The run's status as ``flwr ls`` prints it (``running``, ``finished:completed``, ...)."""
    import click
    from flwr.cli.utils import flwr_cli_exc_handler
    from flwr.proto.control_pb2 import ListRunsRequest

    try:
        with flwr_cli_exc_handler():
            runs = list(client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict.values())
    except click.ClickException as e:
        raise FedPeftError(f"the SuperLink's run list failed: {e.format_message()}") from None
    if not runs:
        return ""
    status = runs[0].status
    return f"{status.status}:{status.sub_status}" if status.sub_status else str(status.status)


def wait_run(home: Path, run_id: int, poll: float = 2.0, timeout: float | None = None) -> str:
    """Poll the SuperLink until the run finishes; returns its final status (e.g. finished:completed)."""
    deadline = None if timeout is None else time.time() + timeout
    with control_client(home) as client:
        while True:
            status = run_status(client, run_id)
            if status.startswith("finished"):
                return status
            if deadline is not None and time.time() > deadline:
                raise FedPeftError(f"run {run_id} did not finish within {timeout:.0f} s (status {status!r})")
            time.sleep(poll)


def cleanup(home: Path) -> None:
    """Remove a private FLWR_HOME."""
    shutil.rmtree(home, ignore_errors=True)
