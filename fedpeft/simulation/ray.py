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
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft.config import Config
from fedpeft.deploy import flower
from fedpeft.errors import FedPeftError, error_line
from fedpeft.progress import PROGRESS_FILE, PROGRESS_KEY, ParallelProgress, following_events

if TYPE_CHECKING:
    from fedpeft.progress import StepProgress

log = logging.getLogger(__name__)


def run_ray(cfg: Config, run_config: dict, progress: StepProgress | None = None) -> None:
    """Run the scenario on Flower's Ray backend; returns when the run has finished.

    ``progress``: its display shows the actors' local steps (:class:`~fedpeft.progress.ParallelProgress`, fed
    through ``RUN/progress.jsonl``)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise FedPeftError("the ray engine needs Flower's simulation extra: pip install 'fedpeft[ray]'") from None
    check_resources(cfg)
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
        events = Path(run_config["run-dir"]) / PROGRESS_FILE
        shown = nullcontext() if progress is None else following_events(events, ParallelProgress.like(progress))
        with shown:
            extra = {} if progress is None else {PROGRESS_KEY: str(events)}
            run_id = flower.run_app(home, flower.app_dir(home / "app"),
                                    {**run_config, **extra, "workers": workers}, fed_cfg)
            status = flower.wait_run(home, run_id)
        log_file = Path(run_config["run-dir"]) / "flower.log"
        run_log = _keep_logs(home, run_id, log_file)
        if status != "finished:completed":
            tail = "\n".join(run_log.strip().splitlines()[-25:])
            raise FedPeftError(f"Ray simulation run {run_id} ended as {status!r}: {error_line(tail)}\n(the "
                               f"run's log is kept in {log_file}; it ends with:)\n{tail}")
    finally:
        procs.stop()
        flower.cleanup(home)


def check_resources(cfg: Config, cpus: int | None = None, gpus: int | None = None) -> None:
    """Refuse, before anything starts, a per-client request this machine cannot meet (Ray would otherwise
    wait forever or fail deep inside its scheduler). ``cpus``/``gpus`` default to what this machine has."""
    import torch

    fed = cfg.federation
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if fed.ray_num_gpus > 0 and gpus == 0:
        raise FedPeftError(f"federation.ray_num_gpus = {fed.ray_num_gpus:g} asks for a share of a GPU per client, "
                           "but this machine has no CUDA GPU; set federation.ray_num_gpus = 0")
    if fed.ray_num_gpus > gpus:
        raise FedPeftError(f"federation.ray_num_gpus = {fed.ray_num_gpus:g} per client, but this machine has "
                           f"{gpus} GPU(s); at most {gpus}")
    if fed.ray_num_cpus > cpus:
        raise FedPeftError(f"federation.ray_num_cpus = {fed.ray_num_cpus:g} per client, but this machine has "
                           f"{cpus} CPU(s); at most {cpus}")


def _keep_logs(home: Path, run_id: int, dest: Path) -> str:
    """Write the run's own log (ServerApp, Ray, ClientApps) and the SuperLink's to ``dest``; returns the former.

    The private ``FLWR_HOME`` is deleted when the engine stops, so without this copy the cause of
    a failed run would be gone with it.
    """
    try:
        run_log = flower.run_log(home, run_id)
    except FedPeftError as e:
        run_log = f"(the run's log could not be read: {e})\n"
    link_log = home / "superlink.log"
    link = link_log.read_text(errors="replace") if link_log.exists() else ""
    dest.write_text(f"# run {run_id}\n{run_log}\n# flower-superlink\n{link}")
    return run_log
