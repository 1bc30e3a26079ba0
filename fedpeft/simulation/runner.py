"""``fedpeft simulate``: create (or reopen) a run directory and run the scenario on a registered engine."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft import config, report
from fedpeft.config import Config
from fedpeft.errors import ConfigError, DataError
from fedpeft.registry import Registry
from fedpeft.rundir import new_run_dir

if TYPE_CHECKING:
    from fedpeft.progress import StepProgress
    from fedpeft.server.loop import Observer

log = logging.getLogger(__name__)
CONFIG_FILE = "config.toml"


Engine = Callable[[Config, dict, Sequence["Observer"], "StepProgress | None"], None]
ENGINES: Registry[Engine] = Registry("engine")


@ENGINES.register("inprocess")
def _inprocess(cfg: Config, rc: dict, observers: Sequence[Observer], progress: StepProgress | None) -> None:
    """Every client in this process, one after another (deterministic; observers and step progress allowed)."""
    from fedpeft.clients.app import app as client_app
    from fedpeft.server.app import app, make_app
    from fedpeft.simulation.inprocess import run_inprocess

    run_inprocess(make_app(observers) if observers else app, client_app, cfg.data.num_clients, rc, progress=progress)


@ENGINES.register("ray")
def _ray(cfg: Config, rc: dict, observers: Sequence[Observer], progress: StepProgress | None) -> None:
    """Flower's Ray simulation behind a local SuperLink (clients in parallel actors; their steps reach
    ``progress`` through the run directory)."""
    from fedpeft.simulation.ray import run_ray

    run_ray(cfg, rc, progress)


def run_config(cfg: Config, run_dir: Path, resume: bool) -> dict[str, str | bool | int]:
    """The Flower run config that carries a fedpeft run to the ServerApp and ClientApps."""
    return {"fedpeft-config": cfg.to_toml(), "run-dir": str(run_dir.resolve()), "resume": resume,
            "simulation": True}  # simulations seed DP noise so that runs are reproducible


def prepare(cfg: Config | None = None, resume: Path | None = None, local: bool = True) -> tuple[Config, Path]:
    """A new run directory with the resolved config, or the config of the run to resume.

    A resume recovers and verifies the checkpoint here, before any engine starts, so a corrupt or
    inconsistent one fails at once with a message naming the file. ``local``: the run executes on this machine (a
    simulation), so what its hardware cannot do (fp16 on a CPU, QLoRA without CUDA) is refused now; a deployment's
    ServerApp and nodes check their own hardware when they build the model, so submitting one from a CPU-only machine
    to GPU nodes is not refused here (and loads no torch).
    """
    if resume is not None:
        from fedpeft.server import checkpoint  # torch: only when resuming

        if not (resume / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume {resume}: not a run directory (no {CONFIG_FILE})")
        cfg = config.load(resume / CONFIG_FILE)
        checkpoint.recover(resume / "checkpoint", resume / report.METRICS_FILE, cfg)
        return cfg, resume
    if cfg is None:
        raise ConfigError("no configuration given")
    if cfg.data.source == "file" and not Path(cfg.data.path).expanduser().is_file():  # before the run directory
        raise DataError(f"data file not found: {cfg.data.path} (data.path)")
    if local:
        from fedpeft.precision import check_hardware  # dtype / QLoRA / device_map this machine cannot run
        from fedpeft.training import select_device

        check_hardware(cfg.model, select_device(cfg.run.device))
    run_dir = new_run_dir(cfg.output.dir, cfg.run.name)
    (run_dir / CONFIG_FILE).write_text(cfg.to_toml())
    return cfg, run_dir


def execute(cfg: Config, run_dir: Path, resume: bool = False, engine: str | None = None,
            observers: Sequence[Observer] = (), progress: StepProgress | None = None) -> None:
    """Run (or continue) the scenario in ``run_dir`` on the chosen engine.

    ``observers`` (in-process engine only) see every update the server decodes, e.g. for an audit;
    ``progress`` follows the clients' local steps (in-process and Ray engines).
    """
    engine = engine or cfg.run.engine
    rc = run_config(cfg, run_dir, resume)
    if observers and engine != "inprocess":
        raise ConfigError(f"observing the decoded updates needs run.engine = 'inprocess', not {engine!r}")
    ENGINES.get(engine)(cfg, rc, observers, progress)


def simulate(cfg: Config | None = None, resume: Path | None = None, engine: str | None = None,
             observers: Sequence[Observer] = ()) -> Path:
    """Run a simulation (or resume one from its run directory); returns the run directory."""
    cfg, run_dir = prepare(cfg, resume)
    execute(cfg, run_dir, resume is not None, engine, observers)
    return run_dir
