"""The Flower ServerApp. Every engine and a real deployment run this same object.

The run configuration travels in the Flower run config: ``fedpeft-config`` (the resolved TOML text),
``run-dir`` (where metrics, checkpoints, the adapter and ``versions.json`` go) and ``resume`` (continue
from the checkpoint in ``run-dir``). Under ``flwr run .`` both are empty: the configuration comes from
``scenario`` and ``section.key`` entries (:func:`fedpeft.config.from_run_config`) and the run directory is
made under ``output.dir``. The runtime comes from the cache the engine put in the ``Context``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft import config, versions
from fedpeft.adversary import require_simulation
from fedpeft.rundir import new_run_dir
from fedpeft.runtime import runtimes_of
from fedpeft.server.announcing import announcing
from fedpeft.server.asynchronous import BufferedServer
from fedpeft.server.loop import FederatedServer, Observer
from fedpeft.server.polling import with_poll_interval


def make_app(observers: Sequence[Observer] = ()) -> ServerApp:
    """A ServerApp; ``observers`` see every decoded update (only where the app runs in this process)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        """Load the configuration from the run config and run the federated rounds."""
        cfg = config.from_run_config(context.run_config)
        simulation = bool(context.run_config.get("simulation", False))  # seeded DP noise, planted attackers
        require_simulation(cfg, simulation)  # no planted attackers deployed
        given = str(context.run_config.get("run-dir", ""))
        run_dir = Path(given) if given else new_run_dir(cfg.output.dir, cfg.run.name)  # empty: flwr run .
        run_dir.mkdir(parents=True, exist_ok=True)
        if not given:
            (run_dir / "config.toml").write_text(cfg.to_toml())
        versions.write_versions(run_dir)  # the server process's environment, rewritten on resume
        resume = bool(context.run_config.get("resume", False))
        server = BufferedServer if cfg.federation.buffer_size else FederatedServer  # FedBuff: asynchronous.py
        grid = with_poll_interval(grid, cfg.federation.poll_interval)  # a deployment: Flower's 3 s -> ours
        grid = announcing(grid, context.run_config)  # the Ray engine's step progress (fedpeft/progress.py)
        server(cfg, run_dir, resume=resume, observers=observers, runtimes=runtimes_of(context),
               simulation=simulation).run(grid)

    return server_app


app = make_app()
