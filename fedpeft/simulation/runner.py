"""``fedpeft simulate``: create (or reopen) a run directory and run the scenario on an engine."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fedpeft import config
from fedpeft.config import Config
from fedpeft.errors import ConfigError

log = logging.getLogger(__name__)
CONFIG_FILE = "config.toml"


def new_run_dir(cfg: Config) -> Path:
    """``<output.dir>/<run.name>-<timestamp>`` (a numeric suffix keeps concurrent runs apart)."""
    base = Path(cfg.output.dir) / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def run_config(cfg: Config, run_dir: Path, resume: bool) -> dict[str, str | bool | int]:
    """The Flower run config that carries a fedpeft run to the ServerApp and ClientApps."""
    return {"fedpeft-config": cfg.to_toml(), "run-dir": str(run_dir.resolve()), "resume": resume,
            "simulation": True}  # simulations seed DP noise so that runs are reproducible


def prepare(cfg: Config | None = None, resume: Path | None = None) -> tuple[Config, Path]:
    """A new run directory with the resolved config, or the config of the run to resume."""
    if resume is not None:
        if not (resume / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume {resume}: not a run directory (no {CONFIG_FILE})")
        return config.load(resume / CONFIG_FILE), resume
    if cfg is None:
        raise ConfigError("no configuration given")
    run_dir = new_run_dir(cfg)
    (run_dir / CONFIG_FILE).write_text(cfg.to_toml())
    return cfg, run_dir


def execute(cfg: Config, run_dir: Path, resume: bool = False, engine: str | None = None) -> None:
    """Run (or continue) the scenario in ``run_dir`` on the chosen engine."""
    engine = engine or cfg.run.engine
    rc = run_config(cfg, run_dir, resume)
    if engine == "ray":
        from fedpeft.simulation.ray import run_ray

        run_ray(cfg, rc)
        return
    from fedpeft.clients.app import app as client_app
    from fedpeft.server.app import app as server_app
    from fedpeft.simulation.inprocess import run_inprocess

    run_inprocess(server_app, client_app, cfg.data.num_clients, rc)


def simulate(cfg: Config | None = None, resume: Path | None = None, engine: str | None = None) -> Path:
    """Run a simulation (or resume one from its run directory); returns the run directory."""
    cfg, run_dir = prepare(cfg, resume)
    execute(cfg, run_dir, resume is not None, engine)
    return run_dir
