"""Experiment tracking: the [tracking] section, clients' sampled step logs (on the wire and in metrics.jsonl),
TensorBoard event files read back record by record, MLflow / W&B where their packages are installed."""

import importlib.util
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedpeft import config, report, tracking
from fedpeft.errors import ConfigError
from fedpeft.simulation import runner

from conftest import interrupt_and_resume, tiny_overrides


def read_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every event file under ``directory``, parsed from the TFRecord framing
    (length, crc, data, crc) with TensorBoard's Event protobuf."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    files = sorted(directory.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {directory}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_the_section_refuses_unknown_sinks_and_private_step_logs():
    with pytest.raises(ConfigError, match="tracking.sinks .* from: tensorboard, mlflow, wandb"):
        config.load(None, ["tracking.sinks=['tensorboard', 'comet']"])
    with pytest.raises(ConfigError, match="each sink once"):
        config.load(None, ["tracking.sinks=['mlflow', 'mlflow']"])
    with pytest.raises(ConfigError, match="tracking.step_every > 0 .* privacy.release_client_metrics"):
        config.load(None, ["tracking.step_every=5", "privacy.mode=local", "privacy.target_epsilon=8"])
    config.load(None, ["tracking.step_every=5", "privacy.mode=local", "privacy.target_epsilon=8",
                       "privacy.release_client_metrics=true"])


def test_a_sink_whose_package_is_missing_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(tracking, "_importable", lambda name: False)
    with pytest.raises(ConfigError, match="'mlflow' needs the mlflow package"):
        tracking.check_available(config.load(None, ["tracking.sinks=['mlflow']"]).tracking)


def test_step_log_round_trips_and_malformed_logs_are_refused():
    log = [(0, 2.5, 1e-3, 0.7), (4, 2.0, 5e-4, 0.3)]
    metrics = {"num-examples": 10.0, **tracking.step_metrics(log)}
    assert tracking.parse_step_log(metrics, max_steps=5, max_loss=100.0) == [[float(s), *v] for s, *v in log]
    for bad, why in [({"step-5-loss": 1.0, "step-5-lr": 0.1, "step-5-grad-norm": 1.0}, ">= the round's 5"),
                     ({"step-1-loss": 1.0, "step-1-lr": 0.1}, "lacks \\['grad-norm'\\]"),
                     ({"step-1-loss": math.nan, "step-1-lr": 0.1, "step-1-grad-norm": 1.0}, "out of range"),
                     ({"step-1-loss": 1e9, "step-1-lr": 0.1, "step-1-grad-norm": 1.0}, "out of range"),
                     ({"step-1-loss": 1.0, "step-1-lr": -0.1, "step-1-grad-norm": 1.0}, "out of range")]:
        with pytest.raises(ValueError, match=why):
            tracking.parse_step_log(bad, max_steps=5, max_loss=100.0)
    clients = [SimpleNamespace(node=7, metrics={"partition-id": 1.0, **tracking.step_metrics(log)}),
               SimpleNamespace(node=8, metrics={"step-0-loss": 1.0}), SimpleNamespace(node=9, metrics={})]
    assert tracking.round_step_logs(clients, 5, 100.0, rnd=1) == {"p1": [[float(s), *v] for s, *v in log]}


def test_train_local_logs_sampled_steps_with_the_schedule_and_the_unclipped_norm(tiny_cfg, one_thread):
    from fedpeft.runtime import Runtime
    from fedpeft.training import train_local

    cfg = tiny_cfg(**{"train.warmup_steps": 4, "train.max_grad_norm": 1e-4, "train.local_steps": 7})
    rt = Runtime(cfg)
    every = train_local(rt.model, rt.client_dataset(0), rt.collate, cfg.train, rt.device, seed=1, step_every=1)
    assert [s for s, *_ in every.step_log] == list(range(7))
    assert sum(loss for _, loss, _, _ in every.step_log) / 7 == pytest.approx(every.loss, rel=1e-6)
    lrs = [lr for _, _, lr, _ in every.step_log]  # linear warmup over 4 steps, then constant
    assert lrs == pytest.approx([cfg.train.lr * (s + 1) / 5 for s in range(4)] + [cfg.train.lr] * 3)
    assert min(norm for *_, norm in every.step_log) > 1e-4  # taken before clipping to max_grad_norm
    sampled = train_local(rt.model, rt.client_dataset(0), rt.collate, cfg.train, rt.device, seed=1, step_every=3)
    assert [s for s, *_ in sampled.step_log] == [0, 3, 6]
    assert train_local(rt.model, rt.client_dataset(0), rt.collate, cfg.train, rt.device, seed=1).step_log == []


def test_tensorboard_event_files_hold_every_round_and_the_clients_step_logs(cls_data, tmp_path, one_thread):
    sets = tiny_overrides(cls_data, tmp_path / "runs", **{"federation.rounds": 2, "tracking.sinks": ["tensorboard"],
                                                          "tracking.step_every": 4})
    run_dir = runner.simulate(config.load(None, sets))
    rows = report.read_metrics(run_dir)
    scalars = read_scalars(run_dir / "tracking" / "tensorboard")
    for row in rows:
        for key in ("eval_accuracy", "train_loss", "bytes_up", "bytes_down"):
            assert scalars[f"round/{key}"][row["round"]] == pytest.approx(row[key], rel=1e-6)
    assert set(rows[0]["step_logs"]) == {"p0", "p1", "p2"}  # 3 clients, every one sampled
    for row in rows:
        for label, steps in row["step_logs"].items():
            assert [s for s, *_ in steps] == [0, 4, 8, 9]  # every 4th of 10 local steps, and the last
            for step, loss, lr, norm in steps:
                global_step = (row["round"] - 1) * 10 + int(step)
                assert scalars[f"client/{label}/train_loss"][global_step] == pytest.approx(loss, rel=1e-6)
                assert scalars[f"client/{label}/lr"][global_step] == pytest.approx(lr, rel=1e-6)
                assert scalars[f"client/{label}/grad_norm"][global_step] == pytest.approx(norm, rel=1e-6)
                assert norm > 0


def test_a_resumed_run_continues_its_tracking(cls_data, tmp_path, monkeypatch, one_thread):
    """The resumed process writes a second event file beside the first, even when it starts within the same
    second (the writer names its file by the second: the clock is frozen here to make that certain)."""
    import tensorboardX.event_file_writer as efw

    monkeypatch.setattr(efw, "time", SimpleNamespace(time=lambda: 1_700_000_000.0))
    cfg = config.load(None, tiny_overrides(cls_data, tmp_path / "runs", **{"tracking.sinks": ["tensorboard"]}))
    run_dir = interrupt_and_resume(cfg, crash_round=2, monkeypatch=monkeypatch)
    scalars = read_scalars(run_dir / "tracking" / "tensorboard")
    assert sorted(scalars["round/eval_accuracy"]) == [1, 2, 3]
    assert len(list((run_dir / "tracking" / "tensorboard").glob("events.out.tfevents.*"))) == 2


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_local_store_holds_the_rounds_and_step_logs(cls_data, tmp_path, one_thread):
    from mlflow.tracking import MlflowClient

    sets = tiny_overrides(cls_data, tmp_path / "runs", **{"federation.rounds": 2, "tracking.sinks": ["mlflow"],
                                                          "tracking.step_every": 5})
    run_dir = runner.simulate(config.load(None, sets))
    client = MlflowClient(tracking_uri=tracking.mlflow_uri(run_dir / "tracking"))
    run_id = (run_dir / "tracking" / "mlflow_run_id").read_text()
    rows = report.read_metrics(run_dir)
    history = {m.step: m.value for m in client.get_metric_history(run_id, "round/eval_accuracy")}
    assert history == pytest.approx({r["round"]: r["eval_accuracy"] for r in rows})
    losses = client.get_metric_history(run_id, "client/p0/train_loss")
    assert sorted(m.step for m in losses) == [0, 5, 9, 10, 15, 19]
    assert client.get_run(run_id).data.params["federation.rounds"] == "2"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_run_is_written(cls_data, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("WANDB_SILENT", "true")
    sets = tiny_overrides(cls_data, tmp_path / "runs", **{"federation.rounds": 1, "tracking.sinks": ["wandb"]})
    run_dir = runner.simulate(config.load(None, sets))
    assert list((run_dir / "tracking").rglob("run-*.wandb")), "no offline W&B run file"



def test_audit_cells_are_tracked_with_their_verdicts(tmp_path):
    from fedpeft.config import TrackingSection

    tracker = tracking.Tracker(TrackingSection(sinks=["tensorboard"]), tmp_path, "audit", {})
    tracker.cell(0, {"verdict": "fail", "token_f1": 0.9, "epsilon": math.inf, "codec": "none", "rank": 8})
    tracker.cell(1, {"verdict": "pass", "token_f1": 0.1, "epsilon": 2.0, "codec": "int8", "rank": 8})
    tracker.close()
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["audit/verdict"] == {0: 2.0, 1: 0.0}
    assert scalars["audit/token_f1"] == pytest.approx({0: 0.9, 1: 0.1})
    assert scalars["audit/epsilon"] == {1: 2.0}  # no DP (infinite epsilon) is left out, not plotted as inf
