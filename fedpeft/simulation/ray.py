"""The Ray engine: Flower's Simulation Engine behind a SuperLink we start ourselves.

Never the built-in ``:local:`` connection (it runs ``uv sync`` on the app's dependencies, which
installed GBs of CUDA torch when tried): a ``flower-superlink --simulation
--disable-runtime-dependency-installation`` on a free loopback port with a private ``FLWR_HOME``.
Each virtual client is a Ray actor with ``federation.ray_num_cpus`` CPUs and
``federation.ray_num_gpus`` of a GPU; the ServerApp and ClientApp are the same objects the
in-process engine runs. Note: Ray itself listens on all interfaces.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from fedpeft.config import Config
from fedpeft.deploy import flower
from fedpeft.errors import FedPeftError

log = logging.getLogger(__name__)


def run_ray(cfg: Config, run_config: dict) -> None:
    """Run the scenario on Flower's Ray backend; returns when the run has finished."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise FedPeftError("the ray engine needs Flower's simulation extra: pip install 'fedpeft[ray]'") from None
    home = Path(tempfile.mkdtemp(prefix="fedpeft-flwr-"))
    procs = flower.FlowerProcesses(home)
    try:
        port = flower.free_port()
        link = procs.start([flower.flower_bin("flower-superlink"), "--simulation", "--insecure",
                            "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                            "--port", str(port)], "superlink")
        flower.wait_healthy(port, link)
        flower.write_connection(home, f"127.0.0.1:{port}")
        fed = cfg.federation
        workers = max(1, int((os.cpu_count() or 1) // max(fed.ray_num_cpus, 1e-9)))
        cpus = int(fed.ray_num_cpus) if float(fed.ray_num_cpus).is_integer() else fed.ray_num_cpus
        gpus = int(fed.ray_num_gpus) if float(fed.ray_num_gpus).is_integer() else fed.ray_num_gpus
        fed_cfg = (f"num-supernodes={cfg.data.num_clients} client-resources-num-cpus={cpus} "
                   f"client-resources-num-gpus={gpus}")
        run_id = flower.run_app(home, flower.app_dir(home / "app"), {**run_config, "workers": workers}, fed_cfg)
        status = flower.wait_run(home, run_id)
        log_file = _keep_logs(home, run_id, Path(run_config["run-dir"]))
        if status != "finished:completed":
            raise FedPeftError(f"Ray simulation run {run_id} ended as {status!r}; the run's log "
                               f"(all of it in {log_file}) ends with:\n" + _tail(log_file))
    finally:
        procs.stop()
        flower.cleanup(home)


def _keep_logs(home: Path, run_id: int, run_dir: Path) -> Path:
    """Copy the run's own log (ServerApp, Ray, ClientApps) and the SuperLink's into ``run_dir``.

    The private ``FLWR_HOME`` is deleted when the engine stops, so without this copy the cause of
    a failed run would be gone with it.
    """
    dest = run_dir / "flower.log"
    try:
        run_log = flower.run_log(home, run_id)
    except FedPeftError as e:
        run_log = f"(the run's log could not be read: {e})\n"
    link_log = home / "superlink.log"
    link = link_log.read_text(errors="replace") if link_log.exists() else ""
    dest.write_text(f"# run {run_id}\n{run_log}\n# flower-superlink\n{link}")
    return dest


def _tail(log_file: Path, lines: int = 25) -> str:
    """The last lines of the run's own part of ``log_file`` (before the SuperLink's access log)."""
    text = log_file.read_text(errors="replace").split("\n# flower-superlink\n")[0]
    return "\n".join(text.strip().splitlines()[-lines:])
