"""``fedpeft run`` / ``status`` / ``logs`` / ``register-node``: talk to a SuperLink through ``flwr``.

The connection (address, CA certificate) is written as ``[superlink.fedpeft]`` into
``$FLWR_HOME/config.toml``; ``flwr run`` then submits the thin Flower App with the run config
``{fedpeft-config, run-dir, resume, workers, simulation, label-names}``. The ServerApp runs on the SuperLink host,
so ``run-dir`` is a path on that host (submit from there, or use a path that exists there).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fedpeft import sources
from fedpeft.adversary import require_simulation
from fedpeft.config import Config
from fedpeft.deploy import flower
from fedpeft.errors import FedPeftError
from fedpeft.simulation import runner

log = logging.getLogger(__name__)


def connect(home: Path, superlink: str | None, ca: Path | None = None, insecure: bool = False) -> None:
    """Write (or keep) the ``fedpeft`` connection in ``home``; ``superlink=None`` reuses the stored one."""
    if superlink is None:
        if not (home / "config.toml").is_file():
            raise FedPeftError(f"no SuperLink connection in {home}; give --superlink HOST:PORT")
        return
    if ca is None and not insecure:
        raise FedPeftError("give --ca CA.crt (the SuperLink's CA certificate), or --insecure for a plain-HTTP link")
    if ca is not None and not Path(ca).is_file():
        raise FedPeftError(f"--ca {ca}: no such file")
    flower.write_connection(home, superlink, None if insecure else Path(ca))  # type: ignore[arg-type]


def scenario_label_names(cfg: Config) -> list[str] | None:
    """The scenario's classification label names, in the order the server numbers them (None if unknown).

    Nodes number the labels of their own data files by these (see :func:`fedpeft.clients.label_names`).
    Read from the scenario data where the run is submitted (the server); if it is not readable there,
    nodes fall back to numbering their own labels, with a warning.
    """
    if cfg.model.task != "classification":
        return None
    try:
        return list(sources.load_examples(cfg.data, cfg.model.task, seed=cfg.run.seed).label_names)
    except (FedPeftError, OSError) as ex:
        log.warning("cannot read the scenario's labels here (%s); each node will number its own labels, which "
                    "only agrees with the server if every node has exactly the scenario's label set", ex)
        return None


def run_config(cfg: Config, run_dir: Path, resume: bool) -> dict[str, str | bool | int]:
    """The run config of a real deployment: one worker per node, unseeded DP noise, the scenario's labels."""
    require_simulation(cfg, simulation=False)  # the adversary harness is refused before anything is submitted
    names = scenario_label_names(cfg)
    return {**runner.run_config(cfg, run_dir, resume), "workers": 1, "simulation": False,
            "label-names": json.dumps(names) if names is not None else ""}


def submit(home: Path, cfg: Config | None = None, resume: Path | None = None) -> tuple[int, Path]:
    """Submit a new run of ``cfg`` (or continue the run in ``resume``); returns (run id, run dir)."""
    cfg, run_dir = runner.prepare(cfg, resume, local=False)  # the ServerApp and nodes check their own hardware
    if cfg.federation.round_timeout == 0:
        log.warning("federation.round_timeout = 0: a node that dies mid-round stalls the run forever; "
                    "set a finite timeout for deployments")
    run_id = flower.run_app(home, flower.app_dir(home / "app"), run_config(cfg, run_dir, resume is not None))
    log.info("submitted run %d (run directory %s)", run_id, run_dir)
    return run_id, run_dir


def register_node(home: Path, public_key: Path, name: str | None = None) -> dict:
    """``flwr supernode register``: allow the node holding the private half of ``public_key``."""
    if not Path(public_key).is_file():
        raise FedPeftError(f"{public_key}: no such public key file")
    args = ["supernode", "register", str(Path(public_key).resolve()), flower.CONNECTION]
    if name:
        args += ["--name", name]
    return flower.flwr(home, *args)


def status(home: Path, run_id: int | None = None) -> list[dict]:
    """The runs the SuperLink knows (or one run), as ``flwr ls`` reports them."""
    args = ["ls", flower.CONNECTION] + (["--run-id", str(run_id)] if run_id is not None else [])
    return list(flower.flwr(home, *args).get("runs", []))


def wait(home: Path, run_id: int, timeout: float | None = None) -> str:
    """Block until the run finishes; returns its final status (``finished:completed`` on success)."""
    return flower.wait_run(home, run_id, timeout=timeout)


def logs(home: Path, run_id: int, timeout: float = 60.0) -> str:
    """The ServerApp log of a run (``flwr log RUN_ID --show``)."""
    return flower.run_log(home, run_id, timeout)
