"""End to end: the in-process engine runs the real ServerApp/ClientApp on a tiny model."""

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from flwr.app import Message

from fedpeft import config, export, protocol, report
from fedpeft.clients.app import app as client_app
from fedpeft.errors import FedPeftError
from fedpeft.runtime import get_runtime
from fedpeft.simulation import runner

from conftest import interrupt_and_resume


def _rows(run_dir: Path) -> list[dict]:
    return report.read_metrics(run_dir)


def test_simulate_learns_and_writes_a_complete_run_directory(tiny_cfg):
    cfg = tiny_cfg(**{"output.plots": True})
    run_dir = runner.simulate(cfg)
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[-1]["eval_accuracy"] > 0.55  # 3 balanced topics: chance is 1/3
    assert all(r["replies"] == 3 and r["dropped"] == 0 for r in rows)
    for name in ("config.toml", "metrics.jsonl", "summary.md", "curves.png", "adapter/adapter_config.json",
                 "checkpoint/global.safetensors", "checkpoint/server.json"):
        assert (run_dir / name).exists(), name
    assert config.load(run_dir / "config.toml") == cfg
    assert "eval_accuracy" in (run_dir / "summary.md").read_text()
    env = json.loads((run_dir / "versions.json").read_text())
    installed = {p["name"]: p["installed"] for p in env["packages"]}
    assert installed["transformers"] == transformers.__version__ and installed["peft"] == peft.__version__
    assert env["device"]["device"] == "cpu"

    # the saved adapter reloads (in the architecture's layout, see fedpeft/export.py) and reproduces the final
    # evaluation
    rt = get_runtime(cfg)
    _, loaded = export.load_run_model(run_dir)
    from fedpeft.training import evaluate
    metrics = evaluate(loaded, rt.eval_dataset, rt.collate, 64, torch.device("cpu"), "classification")
    assert metrics["eval_accuracy"] == pytest.approx(rows[-1]["eval_accuracy"])
    assert metrics["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-5)


def test_same_config_and_seed_give_the_same_metrics(tiny_cfg):
    keys = ("train_loss", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down")
    a = _rows(runner.simulate(tiny_cfg(**{"federation.rounds": 2})))
    b = _rows(runner.simulate(tiny_cfg(**{"federation.rounds": 2})))
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


def test_interrupted_then_resumed_run_matches_an_uninterrupted_one(tiny_cfg, monkeypatch):
    extra = {"federation.rounds": 4, "federation.clients_per_round": 2, "federation.strategy": "fedadam",
             "federation.server_lr": 0.05, "compression.uplink": "compeft:0.2"}
    keys = ("sampled", "train_loss", "eval_loss", "eval_accuracy", "bytes_up")
    full = _rows(runner.simulate(tiny_cfg(**extra)))
    assert all(r["replies"] == 2 for r in full)

    resumed = _rows(interrupt_and_resume(tiny_cfg(**extra), 3, monkeypatch))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]


@pytest.mark.parametrize("adapter", ["lora", "prompt", "prefix", "ia3"])
def test_each_adapter_type_runs_a_federated_round(tiny_cfg, adapter):
    rows = _rows(runner.simulate(tiny_cfg(**{"adapter.type": adapter, "federation.rounds": 1})))
    assert rows[0]["replies"] == 3 and rows[0]["dropped"] == 0 and rows[0]["eval_loss"] > 0


def test_causal_lm_instruction_tuning_round(qa_data, tmp_path):
    from conftest import tiny_overrides
    cfg = config.load(None, tiny_overrides(qa_data, tmp_path / "runs", **{
        "model.name": "tiny-gpt2", "model.task": "causal_lm", "federation.rounds": 2}))
    rows = _rows(runner.simulate(cfg))
    assert all(r["replies"] == 3 for r in rows)
    assert rows[-1]["eval_perplexity"] < rows[0]["eval_perplexity"] * 1.5
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


@pytest.mark.parametrize("strategy", ["fedprox", "fedavgm", "fedyogi", "fedadagrad"])
def test_strategies_run(tiny_cfg, strategy):
    rows = _rows(runner.simulate(tiny_cfg(**{"federation.strategy": strategy, "federation.rounds": 1,
                                             "federation.server_lr": 0.1})))
    assert rows[0]["replies"] == 3


def test_reported_bytes_equal_the_serialized_records(tiny_cfg, monkeypatch):
    """bytes_up == what Flower's object push sends for each reply, and those bytes alone rebuild it."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, push_objects

    from fedpeft.compression import Layout, make_codec

    replies: list[Message] = []
    original = client_app.__call__

    def capture(self, message, context):
        reply = original(message, context)
        replies.append(reply)
        return reply

    monkeypatch.setattr(type(client_app), "__call__", capture)
    cfg = tiny_cfg(**{"federation.rounds": 1, "compression.uplink": "compeft:0.1"})
    row = _rows(runner.simulate(cfg))[0]
    assert len(replies) == 3
    pushed_total = 0
    for reply in replies:
        pushed: dict[str, bytes] = {}
        push_objects(get_all_nested_objects(reply.content), pushed.__setitem__, keep_objects=True)
        pushed_total += sum(len(b) for b in pushed.values())
        rebuilt = inflate_object_from_contents(reply.content.object_id, dict(pushed))
        layout = Layout.from_state(get_runtime(cfg).initial_adapter())
        codec = make_codec("compeft:0.1")
        a = codec.decode(protocol.parse_reply(rebuilt)[0], layout)
        b = codec.decode(protocol.parse_reply(reply.content)[0], layout)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert row["bytes_up"] == pushed_total
    assert row["bytes_up"] < row["bytes_up_fp32"]  # tiny adapter: Flower's ~2 kB per-reply overhead dominates


def test_lossy_downlink_sends_deltas_to_synced_clients_and_full_state_to_others(tiny_cfg):
    extra = {"federation.rounds": 4, "data.num_clients": 4, "federation.clients_per_round": 2,
             "compression.downlink": "compeft:0.2", "compression.uplink": "compeft:0.2"}
    rows = _rows(runner.simulate(tiny_cfg(**extra)))
    assert all(r["replies"] == 2 and r["dropped"] == 0 for r in rows)
    exact = _rows(runner.simulate(tiny_cfg(**{**extra, "compression.downlink": "none"})))
    # a synced client receives a sparse delta, so some rounds send fewer bytes down than the exact downlink
    assert min(r["bytes_down"] for r in rows[1:]) < min(r["bytes_down"] for r in exact[1:])
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] * 1.2


def test_resume_with_lossy_codecs_both_ways(tiny_cfg, monkeypatch):
    extra = {"federation.rounds": 3, "data.num_clients": 3, "federation.clients_per_round": 2,
             "compression.downlink": "compeft:0.3", "compression.uplink": "compeft:0.2"}
    keys = ("train_loss", "eval_loss", "bytes_up", "bytes_down")
    full = _rows(runner.simulate(tiny_cfg(**extra)))
    run_dir = interrupt_and_resume(tiny_cfg(**extra), 3, monkeypatch)
    assert [[r[k] for k in keys] for r in _rows(run_dir)] == [[r[k] for k in keys] for r in full]
    assert all(r["dropped"] == 0 for r in full)


def test_a_run_in_which_no_update_was_applied_fails_with_the_clients_error(tiny_cfg, cls_data, tmp_path,
                                                                             monkeypatch, capsys):
    from fedpeft import cli

    from conftest import tiny_overrides

    def call(self, message, context):
        raise RuntimeError("rank 4 of this client != rank 8 of the split server")  # every client, every round

    monkeypatch.setattr(type(client_app), "__call__", call)
    with pytest.raises(FedPeftError, match=r"no client update was applied in rounds 1-2, the global adapter is "
                                           r"unchanged: 0 valid update\(s\) < federation.min_clients = 1 \(2x, e.g. "
                                           r"failed: RuntimeError: rank 4 of this client != rank 8 of the split "
                                           r"server\)"):
        runner.simulate(tiny_cfg(**{"federation.rounds": 2}))
    sets = tiny_overrides(cls_data, tmp_path / "cli-runs", **{"federation.rounds": 1})
    assert cli.main(["simulate", *[a for s in sets for a in ("--set", s)]]) == 2  # non-zero, with the cause
    assert "no client update was applied in rounds 1-1" in capsys.readouterr().err


def test_a_missing_data_file_fails_before_a_run_directory_is_made(tiny_cfg, cls_data, tmp_path):
    from fedpeft.errors import DataError

    cfg = tiny_cfg()
    cls_data.unlink()
    with pytest.raises(DataError, match=f"data file not found: {cls_data}"):
        runner.simulate(cfg)
    assert not (tmp_path / "runs").exists()
