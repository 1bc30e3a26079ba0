"""Experiment tracking: per-round metrics, sampled per-step client logs and audit verdicts sent to optional
sinks (TensorBoard event files, a local MLflow store (SQLite file), W&B in offline mode); docs/tracking.md.

Step logs come from the clients' own training loops: a client with ``tracking.step_every > 0`` adds
``step-<i>-loss``, ``step-<i>-lr`` and ``step-<i>-grad-norm`` for its sampled local steps to the metrics
record of its reply (plain numbers, so every engine and a deployment carry them, and the server checks them
like any metric). The server turns the valid ones into the round row's ``step_logs`` (client -> rows) and a
malformed log costs only that log, never the update. The server feeds every recorded row to a
:class:`Tracker`; sink packages are imported only when a sink is configured.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from fedpeft.config import Config, TrackingSection
from fedpeft.errors import ConfigError

log = logging.getLogger(__name__)
STEP_KEY = re.compile(r"^step-(\d+)-(loss|lr|grad-norm)$")
FIELDS = ("loss", "lr", "grad-norm")
PACKAGES = {"tensorboard": ("tensorboardX", "torch.utils.tensorboard"), "mlflow": ("mlflow",), "wandb": ("wandb",)}


# ---- the step log on the wire ------------------------------------------------------------------
def step_metrics(step_log: Iterable[tuple[int, float, float, float]]) -> dict[str, float]:
    """A client's sampled step log as reply metrics (``step-<i>-loss`` / ``-lr`` / ``-grad-norm``)."""
    out: dict[str, float] = {}
    for step, loss, lr, norm in step_log:
        out.update({f"step-{step}-loss": loss, f"step-{step}-lr": lr, f"step-{step}-grad-norm": norm})
    return out


def parse_step_log(metrics: Mapping[str, float], max_steps: int, max_loss: float) -> list[list[float]]:
    """The ``[step, loss, lr, grad_norm]`` rows of a reply's step keys, sorted by step; raises ValueError
    for a step outside ``[0, max_steps)``, a missing field, or a value out of range (loss in [0, max_loss],
    lr and norm finite and >= 0)."""
    steps: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        m = STEP_KEY.match(key)
        if m is None:
            continue
        step = int(m.group(1))
        if step >= max_steps:
            raise ValueError(f"{key}: step {step} >= the round's {max_steps} local steps")
        hi = max_loss if m.group(2) == "loss" else math.inf
        if not (math.isfinite(value) and 0.0 <= value <= hi):
            raise ValueError(f"{key} = {value!r} out of range [0, {hi}]")
        steps.setdefault(step, {})[m.group(2)] = float(value)
    rows = []
    for step in sorted(steps):
        if set(steps[step]) != set(FIELDS):
            raise ValueError(f"step {step} lacks {sorted(set(FIELDS) - set(steps[step]))}")
        rows.append([float(step), *(steps[step][f] for f in FIELDS)])
    return rows


def round_step_logs(clients: Iterable[Any], max_steps: int, max_loss: float, rnd: int) -> dict[str, list[list[float]]]:
    """``client label -> step rows`` of the round's valid replies (label: ``p<partition-id>`` where the
    client reports it, else ``node-<id>``); an invalid log is left out and logged, the update stays."""
    logs: dict[str, list[list[float]]] = {}
    for client in clients:
        metrics = client.metrics
        pid = metrics.get("partition-id")
        label = f"p{int(pid)}" if pid is not None else f"node-{client.node}"
        try:
            rows = parse_step_log(metrics, max_steps, max_loss)
        except ValueError as e:
            log.warning("round %d: node %s's step log is left out: %s", rnd, client.node, e)
            continue
        if rows:
            logs[label] = rows
    return logs


# ---- sinks -------------------------------------------------------------------------------------
class Sink(Protocol):
    def scalars(self, values: Mapping[str, float], step: int, axis: str) -> None: ...

    def close(self) -> None: ...


def check_available(cfg: TrackingSection) -> None:
    """Refuse a configured sink whose package is not installed (before any work)."""
    for sink in cfg.sinks:
        if not any(_importable(name) for name in PACKAGES[sink]):
            raise ConfigError(f"tracking.sinks = {cfg.sinks!r}: {sink!r} needs the {PACKAGES[sink][0]} package "
                              "(pip install '.[tracking]' in a checkout of fedpeft)")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


class TensorBoardSink:
    """Event files under ``directory`` (tensorboardX, or torch's writer where tensorboard is installed)."""

    def __init__(self, directory: Path) -> None:
        if _importable("tensorboardX"):
            from tensorboardX import SummaryWriter
        else:
            from torch.utils.tensorboard import SummaryWriter
        # the writers name their file by the second: a run resumed within the same second would overwrite the
        # first writer's events without a suffix of its own
        self.writer = SummaryWriter(str(directory), filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def scalars(self, values: Mapping[str, float], step: int, axis: str) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowSink:
    """One MLflow run in a local SQLite store (``directory/mlflow.db``; MLflow 3 keeps its plain-file store in
    maintenance mode); a resumed run continues the same MLflow run (its id is kept in ``directory/mlflow_run_id``)."""

    def __init__(self, directory: Path, project: str, name: str, params: Mapping[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=mlflow_uri(directory))
        id_file = directory / "mlflow_run_id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
        else:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            id_file.write_text(self.run_id)
            for key, value in params.items():
                self.client.log_param(self.run_id, key, str(value)[:500])

    def scalars(self, values: Mapping[str, float], step: int, axis: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key.replace("@", "_"), float(v), now, step) for key, v in values.items()]
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 500])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_uri(directory: Path) -> str:
    """The MLflow tracking URI of a tracking directory (``mlflow ui --backend-store-uri`` takes it)."""
    return f"sqlite:///{(directory / 'mlflow.db').resolve()}"


class WandbSink:
    """A W&B run in offline mode under ``directory`` (``wandb sync`` uploads it later); rounds and local
    steps are two x-axes (``round``, ``train_step``)."""

    def __init__(self, directory: Path, project: str, name: str, params: Mapping[str, Any]) -> None:
        import wandb

        id_file = directory / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(mode="offline", dir=str(directory), project=project, name=name, id=run_id,
                              resume="allow", config=dict(params))
        for axis in ("round", "train_step", "cell"):
            self.run.define_metric(axis)
        self.run.define_metric("client/*", step_metric="train_step")
        self.run.define_metric("audit/*", step_metric="cell")
        self.run.define_metric("round/*", step_metric="round")

    def scalars(self, values: Mapping[str, float], step: int, axis: str) -> None:
        self.run.log({**values, axis: step})

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """The configured sinks of one run (or audit); ``round`` logs a metrics row, ``cell`` an audit cell."""

    def __init__(self, cfg: TrackingSection, directory: Path, name: str, params: Mapping[str, Any],
                 local_steps: int = 1) -> None:
        check_available(cfg)
        self.local_steps = local_steps
        directory.mkdir(parents=True, exist_ok=True)
        self.sinks: list[Sink] = []
        for sink in cfg.sinks:
            if sink == "tensorboard":
                self.sinks.append(TensorBoardSink(directory / "tensorboard"))
            elif sink == "mlflow":
                self.sinks.append(MLflowSink(directory, cfg.project, name, params))
            else:
                self.sinks.append(WandbSink(directory, cfg.project, name, params))

    def _emit(self, values: Mapping[str, float], step: int, axis: str) -> None:
        for sink in self.sinks:
            sink.scalars(values, step, axis)

    def round(self, row: Mapping[str, Any]) -> None:
        """A round's numbers as ``round/<key>`` at step = round; step logs as ``client/<label>/<field>`` at
        step = (round - 1) * local steps + local step."""
        rnd = int(row["round"])
        self._emit({f"round/{k}": float(v) for k, v in numbers(row).items() if k != "round"}, rnd, "round")
        for label, rows in row.get("step_logs", {}).items():
            for step, *values in rows:
                global_step = (rnd - 1) * self.local_steps + int(step)
                self._emit({f"client/{label}/{f}": v for f, v in zip(("train_loss", "lr", "grad_norm"), values)},
                           global_step, "train_step")

    def cell(self, index: int, row: Mapping[str, Any]) -> None:
        """An audit cell's numbers (attack scores, verdict as 0 pass / 1 warn / 2 fail) as ``audit/<key>``."""
        values = {f"audit/{k}": float(v) for k, v in numbers(row).items()}
        if row.get("verdict") in VERDICTS:
            values["audit/verdict"] = float(VERDICTS[row["verdict"]])
        self._emit(values, index, "cell")

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


VERDICTS = {"pass": 0, "warn": 1, "fail": 2}


def for_run(cfg: Config, run_dir: Path, largest_partition: int) -> Tracker | None:
    """The run's tracker (None without sinks); writes to ``tracking.dir`` or ``run_dir/tracking``."""
    if not cfg.tracking.sinks:
        return None
    from fedpeft.training import num_local_steps

    return Tracker(cfg.tracking, Path(cfg.tracking.dir or run_dir / "tracking"), run_dir.name,
                   flat_params(cfg.to_dict()), num_local_steps(cfg.train, largest_partition))


def numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric scalars of a row (booleans and nested values left out)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_params(nested: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``section.key -> value`` of a configuration dict (what MLflow and W&B record as parameters)."""
    return {f"{s}.{k}": v for s, keys in nested.items() for k, v in keys.items()}
