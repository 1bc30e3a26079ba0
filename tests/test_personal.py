"""Personalization (federation.personalization = "finetune"): each client fine-tunes the received adapter on its
own training data before evaluating it on its own held-out split; fairness metrics; global vs personal."""

from __future__ import annotations

import pytest

from fedpeft import report
from fedpeft.errors import ConfigError
from fedpeft.server import fed_eval
from fedpeft.simulation import runner

from conftest import interrupt_and_resume

# one topic per client: the global model must serve three single-class clients, a personal one only its own
PATHOLOGICAL = {"data.partition": "pathological", "data.classes_per_client": 1, "data.client_eval_fraction": 0.25,
                "federation.evaluation": "federated", "federation.rounds": 2, "train.local_steps": 4}
PERSONAL = {**PATHOLOGICAL, "federation.personalization": "finetune", "federation.personal_steps": 8}


def test_fairness_metrics_are_the_mean_and_worst_of_the_clients():
    counts = {1: {"num-examples": 10, "eval-weight": 10, "eval-loss-sum": 5.0, "eval-correct": 9},
              2: {"num-examples": 30, "eval-weight": 30, "eval-loss-sum": 30.0, "eval-correct": 15}}
    row = fed_eval.aggregate(counts, classification=True)
    assert row["accuracy"] == pytest.approx(24 / 40)  # example-weighted
    assert row["client_mean"] == pytest.approx((0.9 + 0.5) / 2)  # each client once
    assert row["worst"] == 0.5 and row["clients"] == {"1": 0.9, "2": 0.5}


def test_personalized_evaluation_beats_the_global_model_on_single_topic_clients_and_never_touches_training(tiny_cfg):
    personal_dir = runner.simulate(tiny_cfg(**PERSONAL))
    personal = report.read_metrics(personal_dir)
    plain = report.read_metrics(runner.simulate(tiny_cfg(**PATHOLOGICAL)))
    # the fine-tuned copies never leave the clients: training and the global model's evaluation are unchanged
    keys = ("train_loss", "bytes_up", "bytes_down", "fed_eval_loss", "fed_eval_accuracy", "fed_eval_clients")
    assert [[r[k] for k in keys] for r in personal] == [[r[k] for k in keys] for r in plain]
    last = personal[-1]
    assert last["fed_eval_model"] == "global" and last["personal_eval_model"] == "personal"
    assert set(last["personal_eval_clients"]) == set(last["fed_eval_clients"]) and len(last["fed_eval_clients"]) == 3
    assert last["personal_eval_worst"] == min(last["personal_eval_clients"].values())
    assert last["personal_eval_client_mean"] == pytest.approx(sum(last["personal_eval_clients"].values()) / 3)
    # a single-class client's own fine-tune fits its class: the personal model is better, worst client included
    assert last["personal_eval_client_mean"] > last["fed_eval_client_mean"]
    assert last["personal_eval_worst"] >= last["fed_eval_worst"]
    summary = (personal_dir / "summary.md").read_text()
    assert "federated evaluation (global model)" in summary and "personalized evaluation (personal model)" in summary


def test_share_a_is_evaluated_as_a_personal_model(tiny_cfg):
    rows = report.read_metrics(runner.simulate(tiny_cfg(**{**PATHOLOGICAL, "federation.rounds": 1,
                                                           "federation.lora_aggregation": "share_a"})))
    assert rows[-1]["fed_eval_model"] == "personal" and "personal_eval_accuracy" not in rows[-1]


def test_personalization_needs_federated_evaluation(tiny_cfg):
    with pytest.raises(ConfigError, match="federation.personalization = 'finetune'.*federation.evaluation"):
        tiny_cfg(**{"federation.personalization": "finetune"})


def test_personalized_run_resumes_exactly(tiny_cfg, monkeypatch):
    extra = {**PERSONAL, "federation.rounds": 2, "federation.clients_per_round": 2}
    keys = ("train_loss", "fed_eval_accuracy", "personal_eval_loss", "personal_eval_clients", "personal_eval_worst")
    full = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    resumed = report.read_metrics(interrupt_and_resume(tiny_cfg(**extra), 2, monkeypatch))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]
