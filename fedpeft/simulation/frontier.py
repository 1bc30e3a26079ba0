"""``fedpeft frontier``: the privacy-utility-leakage frontier of a scenario, one federated run per grid cell.

The grid crosses four axes (``key=v1,v2`` like ``fedpeft audit --grid``; unset axes take :data:`DEFAULT_GRID`):

* ``mode``: ``none`` / ``local`` (DP-SGD per example) / ``client`` (DP-FedAvg, noise added by the server) /
  ``distributed`` (each client noises its share inside SecAgg+);
* ``epsilon``: the target epsilon of the whole run at ``privacy.delta`` (``inf`` = no noise; it pairs with
  ``mode=none`` only). Local DP derives its noise itself (``privacy.target_epsilon``); client-level and
  distributed DP get the server noise multiplier whose accountant epsilon after the run's rounds is the target
  (:func:`fedpeft.privacy.accounting.noise_for_epsilon`);
* ``codec``: an uplink codec (``none``, ``compeft:0.1``, ...) or ``int8-secure`` (SecAgg+ with the 8-bit integer
  uplink summed in the field, ``privacy.secagg_bits = 8``). Distributed DP always sums its own integer grid
  inside SecAgg+ and pairs with ``codec=none`` only;
* ``adapter``: ``lora`` (factor averaging) or ``ffa`` (FFA-LoRA, ``federation.lora_aggregation = "freeze_a"``).

Every cell trains with the scenario's settings, except where its privacy mode has settings of its own
(:func:`mode_settings`): local DP-SGD takes the measured DP-friendly group (larger, fewer noisy steps) unless
``privacy.dp_defaults`` is off, and ``MODE:section.key=value`` specs add or replace any mode's settings.

Each cell runs the scenario with the capture audit (:func:`fedpeft.audit.capture.audit_run`: the attack suite on
what the server observes in the last round: client 0's decoded update, or under SecAgg+ the unmasked mean of
the sum) and, for local and client-level DP, the one-run empirical epsilon audit of the same mechanism
(:mod:`fedpeft.audit.epsilon`). A combination the configuration refuses (e.g. a codec that cannot be summed
securely) is recorded as ``refused`` with the refusal's message. Each finished cell is appended to
``frontier.csv`` at once, so a killed sweep continues with :func:`run_frontier` ``(resume=DIR)``;
``frontier.md`` and ``frontier.png`` are rewritten after every cell.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedpeft import api, report
from fedpeft.config import Config, parse_override
from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.privacy.statement import EPSILON_KEYS
from fedpeft.rundir import new_run_dir

log = logging.getLogger(__name__)

AXES = ("mode", "epsilon", "codec", "adapter")
MODES = ("none", "local", "client", "distributed")
ADAPTERS = {"lora": "naive", "ffa": "freeze_a"}
SECURE_CODECS = {"int8-secure": 8}  #: codec name -> privacy.secagg_bits under SecAgg+
DEFAULT_GRID = {"mode": ["none", "local", "client", "distributed"], "epsilon": ["8", "inf"],
                "codec": ["none", "compeft:0.1", "int8-secure"], "adapter": ["lora"]}
COLUMNS = ["cell", *AXES, "status", "accuracy", "eval_loss", "epsilon_reported", "noise_multiplier", "verdict",
           "best_attack", "token_f1", "top_true", "attacked", "epsilon_lower_bound", "epsilon_audit",
           "bytes_up_per_round", "bytes_down_per_round", "rounds", "run_dir", "seconds"]
CSV_FILE, GRID_FILE = "frontier.csv", "grid.json"
CellCallback = Callable[[int, int, dict[str, Any]], None]


def parse_grid(specs: Sequence[str] = ()) -> dict[str, list[str]]:
    """``["mode=none,local", "epsilon=8"]`` on top of :data:`DEFAULT_GRID`; unknown axes and values fail."""
    grid = {k: list(v) for k, v in DEFAULT_GRID.items()}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or key not in AXES or not values.strip():
            raise ConfigError(f"frontier grid {spec!r}: expected 'axis=v1,v2' with axis one of {', '.join(AXES)}")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
    bad = {"mode": [m for m in grid["mode"] if m not in MODES],
           "adapter": [a for a in grid["adapter"] if a not in ADAPTERS]}
    for axis, wrong in bad.items():
        if wrong:
            valid = MODES if axis == "mode" else tuple(ADAPTERS)
            raise ConfigError(f"frontier grid {axis}: unknown {wrong}; valid: {', '.join(valid)}")
    for eps in grid["epsilon"]:
        if _epsilon(eps) <= 0:
            raise ConfigError(f"frontier grid epsilon: {eps!r} must be a positive number or inf")
    return grid


def _epsilon(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"frontier grid epsilon: {text!r} is not a number or inf") from None


def cells(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """The grid's meaningful cells: no DP exactly at epsilon inf, distributed DP with its own codec only."""
    out = []
    for mode in grid["mode"]:
        for eps in grid["epsilon"]:
            if (mode == "none") != math.isinf(_epsilon(eps)):
                continue
            for codec in grid["codec"]:
                if mode == "distributed" and codec != "none":
                    continue
                for adapter in grid["adapter"]:
                    out.append({"mode": mode, "epsilon": eps, "codec": codec, "adapter": adapter})
    if not out:
        raise ConfigError("the frontier grid has no cell: mode=none needs epsilon=inf, the DP modes a finite epsilon")
    return out


def cell_key(cell: dict[str, str]) -> str:
    """``mode/epsilon/codec/adapter``: a cell's name in frontier.csv (resume matches on it)."""
    return "/".join(str(cell[a]) for a in AXES)


def mode_settings(cfg: Config, specs: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Each privacy mode's ``section.key`` settings on top of the scenario's shared ones.

    The shared ``[train]`` is the non-DP cells' (DP-SGD with it loses most of its utility: docs/privacy.md), so
    local DP-SGD takes the measured DP-friendly group (:data:`fedpeft.privacy.tuning.DP_DEFAULTS`' first: batch 64
    x 4 steps at lr 2e-2 in chunks of 16) while ``privacy.dp_defaults`` is on. ``specs`` (``MODE:section.key=value``)
    add or replace settings; each mode's are validated here, before any cell runs, on that mode's cell without a
    codec (an error there that the cell without the settings does not have names the setting)."""
    from fedpeft.privacy.tuning import DP_DEFAULTS

    out: dict[str, dict[str, Any]] = {m: {} for m in MODES}
    if cfg.privacy.dp_defaults:
        out["local"] = {f"{section}.{key}": v for (section, key), v in DP_DEFAULTS[0].values.items()}
    for spec in specs:
        mode, sep, setting = spec.partition(":")
        if not sep or mode.strip() not in MODES:
            raise ConfigError(f"frontier mode setting {spec!r}: expected MODE:section.key=value with MODE one of "
                              f"{', '.join(MODES)}, e.g. local:train.lr=0.02")
        section, key, value = parse_override(setting)
        out[mode.strip()][f"{section}.{key}"] = value
    settings = {m: v for m, v in out.items() if v}
    for mode, values in settings.items():  # on the mode's most permissive cell: no codec, plain LoRA
        probe = cell_overrides({"mode": mode, "epsilon": "inf" if mode == "none" else "8", "codec": "none",
                                "adapter": "lora"})
        try:
            api.resolve_config(cfg, {**values, **probe})
        except ConfigError as e:
            try:
                api.resolve_config(cfg, probe)
            except ConfigError:
                continue  # the scenario refuses this mode anyway: each of its cells records why
            raise ConfigError(f"frontier settings of mode {mode}: {e}") from None
    return settings


def cell_overrides(cell: dict[str, str]) -> dict[str, Any]:
    """The ``section.key`` overrides that turn the scenario into this cell."""
    out: dict[str, Any] = {"privacy.mode": cell["mode"], "federation.lora_aggregation": ADAPTERS[cell["adapter"]],
                           "privacy.secure_aggregation": "none", "privacy.secagg_bits": 0}
    if cell["mode"] != "none":  # each mode's noise for this epsilon over the cell's own rounds (privacy.tuning)
        out["privacy.target_epsilon"] = _epsilon(cell["epsilon"])
    if cell["mode"] == "distributed":
        out["privacy.secure_aggregation"] = "secaggplus"
    if cell["codec"] in SECURE_CODECS:
        out.update({"compression.uplink": "none", "privacy.secure_aggregation": "secaggplus",
                    "privacy.secagg_bits": SECURE_CODECS[cell["codec"]]})
    else:
        out["compression.uplink"] = cell["codec"]
    return out


def cell_config(cfg: Config, cell: dict[str, str], out_dir: Path,
                settings: dict[str, dict[str, Any]] | None = None) -> Config:
    """The validated config of one cell (its runs under ``out_dir/cells``): the scenario, its mode's
    ``settings`` (:func:`mode_settings`), the cell's axes; ConfigError where it is refused."""
    overrides = {**(settings or {}).get(cell["mode"], {}), **cell_overrides(cell)}
    overrides.update({"output.dir": str(out_dir / "cells"), "run.engine": "inprocess",
                      "run.name": f"{cfg.run.name}-{cell_key(cell).replace('/', '-').replace(':', '')}"})
    return api.resolve_config(cfg, overrides)


def _per_round(metrics: list[dict[str, Any]], key: str) -> float | None:
    values = [m[key] for m in metrics if m.get(key) is not None]
    return sum(values) / len(values) if values else None


def _reported_epsilon(mode: str, metrics: list[dict[str, Any]]) -> float | None:
    """The run's accountant epsilon after its last round: inf without DP; None where the clients keep it (local
    DP-SGD without ``privacy.release_client_metrics``: each client's noise is derived for the target)."""
    if mode == "none":
        return math.inf
    key = EPSILON_KEYS[mode]
    values = [m[key] for m in metrics if m.get(key) is not None]
    return max(values) if values else None


def _attacks(run_dir: Path) -> dict[str, Any]:
    """The worst verdict over the observed updates of a captured run (fail > warn > pass > n/a: no attack
    applied) and its best F1; ``attacked``: the updates some attack applied to."""
    with open(run_dir / "audit.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {"verdict": "n/a", "best_attack": "-", "token_f1": None, "top_true": None, "attacked": 0}
    order = {"fail": 2, "warn": 1, "pass": 0}
    worst = max(rows, key=lambda r: (order.get(r["verdict"], -1), float(r["token_f1"] or 0)))
    return {"verdict": worst["verdict"], "best_attack": worst["best_attack"], "token_f1": float(worst["token_f1"]),
            "top_true": float(worst["top_true"]), "attacked": sum(r["verdict"] != "n/a" for r in rows)}


def _epsilon_audit(cfg: Config, canaries: int) -> dict[str, Any]:
    """The empirical lower bound of the cell's mechanism where one applies (local / client-level DP)."""
    from fedpeft.audit import epsilon as eps_audit

    if canaries <= 0 or cfg.privacy.mode not in ("local", "client"):
        return {"epsilon_lower_bound": None, "epsilon_audit": "n/a"}
    if cfg.privacy.mode == "local":  # one full-batch step at the target: the strongest example-level audit
        result = eps_audit.audit_local_dpsgd(cfg, canaries, steps=1, seed=cfg.run.seed)
    else:
        result = eps_audit.audit_client_level(cfg, canaries, seed=cfg.run.seed)
    return {"epsilon_lower_bound": result.bound.epsilon_lower_bound,
            "epsilon_audit": f"{result.verdict} (claim {result.claimed_epsilon:.3g})"}


def run_cell(cfg: Config, cell: dict[str, str], out_dir: Path, canaries: int = 1000,
             settings: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train, attack and audit one cell (with its mode's ``settings``); its frontier.csv row (``status`` =
    ``done``, ``refused: why`` when the combination cannot run, or ``failed: why`` when its run stopped with an
    error: the sweep goes on, and a resumed sweep runs that cell again)."""
    from fedpeft.audit import capture

    start = time.perf_counter()
    row: dict[str, Any] = {"cell": cell_key(cell), **cell}
    try:
        cell_cfg = cell_config(cfg, cell, out_dir, settings)
        capture.check(cell_cfg)
    except FedPeftError as e:
        log.info("frontier cell %s refused: %s", row["cell"], e)
        return {**row, "status": f"refused: {e}", "seconds": round(time.perf_counter() - start, 1)}
    try:
        # client 0's update of the last round, or with client sampling the lowest partition that took part
        run_dir = capture.audit_run(cell_cfg, rounds=[cell_cfg.federation.rounds], clients=[0], fallback=True)
    except FedPeftError as e:
        log.error("frontier cell %s failed: %s", row["cell"], e)
        return {**row, "status": f"failed: {e}", "seconds": round(time.perf_counter() - start, 1)}
    metrics = report.read_metrics(run_dir)
    evals = [m for m in metrics if m.get("eval_accuracy") is not None or m.get("eval_perplexity") is not None]
    last = evals[-1] if evals else {}
    row.update({"status": "done", "accuracy": last.get("eval_accuracy", last.get("eval_perplexity")),
                "eval_loss": last.get("eval_loss"), "epsilon_reported": _reported_epsilon(cell["mode"], metrics),
                "noise_multiplier": cell_cfg.privacy.server_noise_multiplier if cell["mode"] in
                ("client", "distributed") else None,
                **_attacks(run_dir), **_epsilon_audit(cell_cfg, canaries),
                "bytes_up_per_round": _per_round(metrics, "bytes_up"),
                "bytes_down_per_round": _per_round(metrics, "bytes_down"), "rounds": len(metrics),
                "run_dir": str(run_dir.relative_to(out_dir))})
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def read_rows(out_dir: Path) -> list[dict[str, Any]]:
    """The finished cells of a frontier directory (frontier.csv), numbers parsed back; a cell that was run again
    after a failure appears once, with its last row."""
    path = out_dir / CSV_FILE
    if not path.exists():
        return []
    with open(path, newline="") as f:
        last = {r["cell"]: {k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)}
    return list(last.values())


def failed(row: dict[str, Any]) -> bool:
    """Whether a frontier.csv row is a cell whose run stopped with an error (status ``failed: why``): the report
    lists it with its reason, a resumed sweep runs it again, and ``fedpeft frontier`` exits 1."""
    return str(row["status"]).startswith("failed")


def _settled(out_dir: Path) -> set[str]:
    """Cells that a resumed sweep does not run again: done or refused (a failed cell is run again)."""
    return {r["cell"] for r in read_rows(out_dir) if not failed(r)}


def _parse(text: str) -> Any:
    if text == "":
        return None
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        return text


def _append(out_dir: Path, row: dict[str, Any]) -> None:
    path = out_dir / CSV_FILE
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def prepare(cfg: Config | None, grid_specs: Sequence[str] = (), resume: Path | None = None,
            canaries: int = 1000, mode_specs: Sequence[str] = ()) -> tuple[Config, Path, list[dict[str, str]], int]:
    """A new frontier directory (or the one to resume) with its config, grid, per-mode settings
    (:func:`mode_settings` of ``mode_specs``) and canaries; the cells to run. Everything is validated here,
    before any cell starts."""
    if resume is not None:
        resume = Path(resume)
        if not (resume / GRID_FILE).is_file():
            raise ConfigError(f"{resume} is not a frontier directory (no {GRID_FILE})")
        cfg = api.resolve_config(resume / "config.toml")
        saved = _saved(resume)
        return cfg, resume, cells(saved["grid"]), int(saved["canaries"])
    cfg = api.resolve_config(cfg)
    grid = parse_grid(grid_specs)
    todo = cells(grid)
    settings = mode_settings(cfg, mode_specs)
    out = new_run_dir(cfg.output.dir, f"{cfg.run.name}-frontier")
    (out / "config.toml").write_text(cfg.to_toml())
    (out / GRID_FILE).write_text(json.dumps({"grid": grid, "canaries": canaries, "settings": settings}, indent=1))
    return cfg, out, todo, canaries


def run_frontier(cfg: Config | None = None, grid_specs: Sequence[str] = (), resume: Path | None = None,
                 canaries: int = 1000, on_cell: CellCallback | None = None,
                 on_start: CellCallback | None = None, mode_specs: Sequence[str] = ()) -> Path:
    """Run every cell not yet in ``frontier.csv`` and write frontier.md / frontier.png; returns the directory.
    ``mode_specs``: per-mode settings ``MODE:section.key=value`` (:func:`mode_settings`).

    ``on_start(i, total, cell)`` / ``on_cell(i, total, row)`` are called around each cell (progress display).
    """
    from fedpeft.simulation import frontier_report

    cfg, out, todo, canaries = prepare(cfg, grid_specs, resume, canaries, mode_specs)
    settings: dict[str, dict[str, Any]] = _saved(out).get("settings", {})  # none in an older directory
    done = _settled(out)
    for i, cell in enumerate(todo):
        if cell_key(cell) in done:
            continue
        if on_start:
            on_start(i, len(todo), {"cell": cell_key(cell), **cell})
        row = run_cell(cfg, cell, out, canaries, settings)
        gc.collect()  # a cell's attack tables (GBs on MiniLM) sit in reference cycles: without this, cells pile up
        _append(out, row)
        frontier_report.write(out, cfg, read_rows(out), settings)
        if on_cell:
            on_cell(i, len(todo), row)
    frontier_report.write(out, cfg, read_rows(out), settings)
    return out


def _saved(out_dir: Path) -> dict[str, Any]:
    """A frontier directory's grid.json: its grid, canaries and per-mode settings."""
    return dict(json.loads((out_dir / GRID_FILE).read_text()))


def remaining(out_dir: Path) -> int:
    """Cells of a frontier directory that a resume would run: not yet in its frontier.csv, or failed there."""
    done = _settled(out_dir)
    return sum(cell_key(c) not in done for c in cells(_saved(out_dir)["grid"]))

