"""Federated evaluation: clients evaluate the global adapter on their own held-out split; the server adds up counts."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from fedpeft import config, models, protocol, report
from fedpeft.clients import app as client_app
from fedpeft.errors import ConfigError, PayloadError
from fedpeft.partition import client_eval_split
from fedpeft.runtime import get_runtime
from fedpeft.server import checkpoint
from fedpeft.simulation import runner
from fedpeft.simulation.inprocess import NODE_ID_BASE
from fedpeft.training import evaluate, evaluate_counts

from conftest import interrupt_and_resume, tiny_overrides, write_classification

FED = {"data.client_eval_fraction": 0.25, "federation.evaluation": "federated", "federation.rounds": 2}


def test_client_eval_split_is_seeded_disjoint_and_leaves_defaults_alone(tiny_cfg):
    plain = get_runtime(tiny_cfg())
    before = [p.copy() for p in plain.partitions]
    assert all(len(e) == 0 for e in plain.client_eval_partitions)  # default 0.0: partitions unchanged
    rt = get_runtime(tiny_cfg(**FED))
    for whole, train, held in zip(before, rt.partitions, rt.client_eval_partitions):
        assert len(held) == round(0.25 * len(whole)) and len(train) == len(whole) - len(held)
        assert not set(train) & set(held) and sorted([*train, *held]) == sorted(whole)
    again = get_runtime(tiny_cfg(**FED, **{"run.name": "again"}))  # another config: a rebuilt runtime
    assert all(np.array_equal(a, b) for a, b in zip(again.client_eval_partitions, rt.client_eval_partitions))


@pytest.mark.parametrize("size, held", [(0, 0), (1, 0), (2, 1), (3, 1), (40, 10)])
def test_client_eval_split_keeps_one_example_on_each_side(size, held):
    idx = np.arange(100, 100 + size)
    train, test = client_eval_split(idx, 0.25, seed=0, partition_id=1)
    assert len(test) == held and len(train) == size - held and sorted([*train, *test]) == list(idx)
    assert list(train) == sorted(train)  # the partition's order is kept
    other, _ = client_eval_split(idx, 0.25, seed=0, partition_id=2)
    assert size < 40 or not np.array_equal(other, train)  # each client draws its own split


def test_federated_evaluation_matches_an_independent_computation(tiny_cfg):
    trained: dict[int, float] = {}
    cfg = tiny_cfg(**FED, **{"data.partition": "quantity"})  # unequal clients: weighting matters
    run_dir = runner.simulate(cfg, observers=[lambda u: trained.__setitem__(u.node, u.metrics["num-examples"])])
    rows = report.read_metrics(run_dir)
    assert all("eval_loss" not in r for r in rows)  # "federated": no server-side evaluation
    assert all(r["fed_eval_replies"] == 3 and "fed_eval_dropped" not in r for r in rows)

    rt = get_runtime(cfg)
    # training used only each client's train part
    assert trained == {NODE_ID_BASE + pid: len(p) for pid, p in enumerate(rt.partitions)}
    # each client's split evaluated directly on the final global adapter, then weighted by its size
    final = checkpoint.load(run_dir / "checkpoint").tensors["global"]
    models.set_adapter_state(rt.model, rt.full_state(final))
    per = {str(NODE_ID_BASE + pid): evaluate(rt.model, rt.client_eval_dataset(pid), rt.collate, 4, rt.device,
                                             "classification") for pid in range(3)}
    sizes = {str(NODE_ID_BASE + pid): len(e) for pid, e in enumerate(rt.client_eval_partitions)}
    total = sum(sizes.values())
    assert len(set(sizes.values())) > 1
    last = rows[-1]
    assert last["fed_eval_examples"] == total
    assert last["fed_eval_loss"] == pytest.approx(sum(per[n]["eval_loss"] * sizes[n] for n in per) / total, rel=1e-5)
    assert last["fed_eval_accuracy"] == pytest.approx(
        sum(per[n]["eval_accuracy"] * sizes[n] for n in per) / total, rel=1e-9)
    assert last["fed_eval_clients"] == pytest.approx({n: m["eval_accuracy"] for n, m in per.items()})
    assert last["fed_eval_worst"] == min(last["fed_eval_clients"].values())
    summary = (run_dir / "summary.md").read_text()
    assert "fed_eval_accuracy" in summary and "per-client accuracy" in summary


def test_a_malformed_evaluate_reply_is_dropped_and_the_run_goes_on(tiny_cfg, monkeypatch, caplog):
    honest = client_app._local_eval
    calls = []

    def second_node_lies(rt, dataset, cfg):  # nodes are asked in order: every second of three claims too much
        counts = honest(rt, dataset, cfg)
        calls.append(1)
        return {**counts, "correct": counts["examples"] + 5} if len(calls) % 3 == 2 else counts

    monkeypatch.setattr(client_app, "_local_eval", second_node_lies)
    rows = report.read_metrics(runner.simulate(tiny_cfg(**FED)))
    liar = str(NODE_ID_BASE + 1)
    for r in rows:
        assert r["replies"] == 3 and r["fed_eval_replies"] == 2
        assert set(r["fed_eval_dropped"]) == {liar}
        assert "eval-correct" in r["fed_eval_dropped"][liar] and liar not in r["fed_eval_clients"]
    assert "evaluation of node 1001 dropped" in caplog.text


def _reply(**metrics: float) -> RecordDict:
    return RecordDict({protocol.METRICS: MetricRecord(metrics)})


GOOD = {"num-examples": 4.0, "eval-weight": 4.0, "eval-loss-sum": 2.0, "eval-correct": 3.0}


@pytest.mark.parametrize("content", [
    _reply(**{**GOOD, "eval-correct": 5.0}),  # more correct than examples
    _reply(**{**GOOD, "num-examples": 2.5, "eval-weight": 2.5}),  # not whole
    _reply(**{**GOOD, "eval-loss-sum": -1.0}),
    _reply(**{**GOOD, "eval-loss-sum": float("nan")}),
    _reply(**{**GOOD, "num-examples": 0.0, "eval-weight": 0.0, "eval-correct": 0.0}),
    _reply(**{k: v for k, v in GOOD.items() if k != "eval-correct"}),  # classification needs the correct count
    _reply(**GOOD, extra=1.0),
    _reply(**{**GOOD, "eval-weight": 7.0}),  # classification weighs by examples
    RecordDict({protocol.METRICS: MetricRecord(GOOD), "update": MetricRecord({})}),
])
def test_malformed_evaluate_replies_are_refused(content):
    with pytest.raises(PayloadError):
        protocol.parse_evaluate_reply(content, classification=True)


def test_a_well_formed_evaluate_reply_parses():
    assert protocol.parse_evaluate_reply(_reply(**GOOD), classification=True) == GOOD
    lm = {k: v for k, v in GOOD.items() if k != "eval-correct"} | {"eval-weight": 11.0}
    assert protocol.parse_evaluate_reply(_reply(**lm), classification=False) == lm


@pytest.mark.parametrize("extra, needle", [
    ({"federation.evaluation": "federated"}, "needs data.client_eval_fraction > 0"),
    ({**FED, "privacy.mode": "client"}, "privacy.release_client_metrics = true"),
    ({**FED, "privacy.secure_aggregation": "secaggplus", "federation.clients_per_round": 3}, "release_client_metrics"),
    ({**FED, "adversary.attack": "backdoor", "adversary.fraction": 0.34}, "use federation.evaluation = 'both'"),
    ({**FED, "federation.evaluation": "both", "split.enabled": True, "model.tiny_layers": 3},
     "split.enabled is not supported"),
])
def test_impossible_combinations_are_refused(tiny_cfg, extra, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        tiny_cfg(**extra)


def test_released_client_metrics_allow_federated_evaluation_under_dp(tiny_cfg):
    cfg = tiny_cfg(**FED, **{"privacy.mode": "client", "privacy.release_client_metrics": True})
    assert cfg.federation.evaluation == "federated"


def test_both_keeps_server_evaluation_and_resume_is_exact(tiny_cfg, monkeypatch):
    torch.manual_seed(0)
    extra = {**FED, "federation.evaluation": "both", "federation.rounds": 3, "federation.clients_per_round": 2}
    keys = ("train_loss", "eval_loss", "fed_eval_loss", "fed_eval_accuracy", "fed_eval_clients", "fed_eval_worst")
    full = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    assert all(r.get(k) is not None for r in full for k in keys if k != "train_loss")
    resumed = report.read_metrics(interrupt_and_resume(tiny_cfg(**extra), 3, monkeypatch))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]


def test_causal_lm_federated_evaluation_is_token_weighted(qa_data, tmp_path):
    cfg = config.load(None, tiny_overrides(qa_data, tmp_path / "runs", **{**FED,
        "model.name": "tiny-gpt2", "model.task": "causal_lm", "federation.rounds": 1, "data.partition": "quantity"}))
    run_dir = runner.simulate(cfg)
    last = report.read_metrics(run_dir)[-1]
    rt = get_runtime(cfg)
    models.set_adapter_state(rt.model, rt.full_state(checkpoint.load(run_dir / "checkpoint").tensors["global"]))
    counts = [evaluate_counts(rt.model, rt.client_eval_dataset(pid), rt.collate, 4, rt.device, "causal_lm")
              for pid in range(3)]
    assert last["fed_eval_loss"] == pytest.approx(sum(c["loss_sum"] for c in counts) / sum(c["weight"] for c in counts),
                                                  rel=1e-5)
    assert last["fed_eval_perplexity"] == pytest.approx(math.exp(last["fed_eval_loss"]))
    assert "fed_eval_accuracy" not in last
    assert last["fed_eval_worst"] == max(last["fed_eval_clients"].values())


def test_the_privacy_statement_names_the_released_evaluation_metrics(tiny_cfg):
    from fedpeft.privacy.statement import guarantee_lines

    released = {"privacy.mode": "client", "privacy.release_client_metrics": True}
    with_fed = "\n".join(guarantee_lines(tiny_cfg(**FED, **released), []))
    without = "\n".join(guarantee_lines(tiny_cfg(**released), []))
    assert "fed_eval_clients" in with_fed and "fed_eval_clients" not in without


def test_a_deployed_nodes_own_file_is_split_the_same_way(tiny_cfg, tmp_path):
    from fedpeft.runtime import Runtime

    own = write_classification(tmp_path / "own.jsonl", n=40, seed=5)
    rt = Runtime(tiny_cfg(**FED), data_path=str(own))
    train, held = client_eval_split(np.arange(40), 0.25, seed=rt.cfg.run.seed, partition_id=0)
    assert np.array_equal(rt.partitions[0], train) and np.array_equal(rt.client_eval_partitions[0], held)
    assert len(rt.client_dataset(0)) == 30 and len(rt.client_eval_dataset(0)) == 10


@pytest.mark.parametrize("lie", ["inflated", "loss"])
def test_a_node_cannot_outweigh_the_others_in_federated_evaluation(tiny_cfg, monkeypatch, lie):
    """One node of three claimed 999,999 examples, none correct: the round's fed_eval_accuracy was that node's
    (5.7e-8 in an outside check). Now its claim is weighed as its held-out split (its own accuracy kept as it
    reported it), and a mean loss above sanity.max_loss drops the reply."""
    honest = client_app._local_eval
    calls = []

    def second_node_lies(rt, dataset, cfg):
        counts = honest(rt, dataset, cfg)
        calls.append(1)
        if len(calls) % 3 != 2:
            return counts
        if lie == "inflated":
            return {"examples": 999_999, "weight": 999_999, "loss_sum": 0.5 * 999_999, "correct": 0}
        return {**counts, "loss_sum": 1e300}

    monkeypatch.setattr(client_app, "_local_eval", second_node_lies)
    cfg = tiny_cfg(**FED)
    rows = report.read_metrics(runner.simulate(cfg))
    sizes = [len(p) for p in get_runtime(cfg).client_eval_partitions]
    liar = str(NODE_ID_BASE + 1)
    for r in rows:
        if lie == "inflated":
            assert r["fed_eval_replies"] == 3 and r["fed_eval_clients"][liar] == 0.0
            assert r["fed_eval_examples"] == sum(sizes)  # the liar counts as its own split, not 999,999
            honest_acc = [v for n, v in r["fed_eval_clients"].items() if n != liar]
            assert r["fed_eval_accuracy"] == pytest.approx(
                sum(a * sizes[int(n) - NODE_ID_BASE] for n, a in r["fed_eval_clients"].items()) / sum(sizes))
            assert r["fed_eval_accuracy"] >= min(honest_acc) * (sum(sizes) - sizes[1]) / sum(sizes)
        else:
            assert r["fed_eval_replies"] == 2 and "max_loss" in r["fed_eval_dropped"][liar]
            assert math.isfinite(r["fed_eval_loss"])
