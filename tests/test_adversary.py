"""The adversary harness (:mod:`fedpeft.adversary`): each attack does what it says on a real
update or dataset of the tiny model, the ``[adversary]`` section validates and stays in simulations, and a
short simulation records the attackers in ``metrics.jsonl`` and the backdoor success rate in ``summary.md``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft import adversary, config, models, protocol, report
from fedpeft.compression import Layout, make_codec
from fedpeft.deploy import submit
from fedpeft.errors import ConfigError
from fedpeft.runtime import get_runtime
from fedpeft.server.replies import ClientReply, RoundReplies
from fedpeft.simulation import runner
from fedpeft.simulation.inprocess import node_id
from fedpeft.training import train_local

from conftest import tiny_overrides, write_classification

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def make_cfg(tmp_path_factory):
    """A factory: make_cfg(**{"section.key": value}) -> a tiny-bert Config on one shared synthetic data file."""
    root = tmp_path_factory.mktemp("adversary")
    data = write_classification(root / "topics.jsonl")

    def make(**extra: object) -> config.Config:
        return config.load(None, tiny_overrides(data, root / "runs", **{"data.num_clients": 4, **extra}))

    return make


@pytest.fixture(scope="module")
def honest_delta(make_cfg) -> dict[str, torch.Tensor]:
    """A real update: the tiny model's adapter after a few local steps on client 0, minus where it started."""
    cfg = make_cfg()
    rt = get_runtime(cfg)
    start = rt.initial_adapter()
    models.set_adapter_state(rt.model, start)
    train_local(rt.model, rt.client_dataset(0), rt.collate, cfg.train, CPU, seed=1, steps=3)
    return models.subtract(models.adapter_state(rt.model), start)


def _attack(make_cfg, attack: str, **settings: object) -> adversary.Attack:
    cfg = make_cfg(**{"adversary.attack": attack, "adversary.clients": [0],
                      **{k if "." in k else f"adversary.{k}": v for k, v in settings.items()}})
    return adversary.attack_for(cfg, 0, simulation=True)


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in state.values()])


@pytest.mark.parametrize("factor", [10.0, 100.0])
def test_scale_multiplies_the_update_by_the_factor(make_cfg, honest_delta, factor) -> None:
    sent = _attack(make_cfg, "scale", factor=factor).update(honest_delta, seed=3)
    assert sent.keys() == honest_delta.keys()
    assert all(torch.allclose(sent[k], factor * honest_delta[k]) for k in sent)
    assert adversary.update_norm(sent) == pytest.approx(factor * adversary.update_norm(honest_delta), rel=1e-5)


def test_sign_flip_negates_the_update(make_cfg, honest_delta) -> None:
    sent = _attack(make_cfg, "sign_flip").update(honest_delta, seed=3)
    assert all(torch.equal(sent[k], -honest_delta[k]) for k in honest_delta)


def test_gaussian_noise_sends_noise_of_the_configured_std(make_cfg, honest_delta) -> None:
    attack = _attack(make_cfg, "gaussian_noise", noise_std=0.5)
    sent = attack.update(honest_delta, seed=3)
    x = _flat(sent)
    assert x.numel() > 1000 and {k: v.shape for k, v in sent.items()} == {k: v.shape for k, v in honest_delta.items()}
    assert float(x.std()) == pytest.approx(0.5, rel=0.05) and abs(float(x.mean())) < 0.05
    assert abs(float(torch.corrcoef(torch.stack([x, _flat(honest_delta)]))[0, 1])) < 0.1  # noise, not the update
    assert torch.equal(_flat(attack.update(honest_delta, seed=3)), x)  # seeded per client round
    assert not torch.equal(_flat(attack.update(honest_delta, seed=4)), x)


def test_adaptive_lands_just_inside_its_bound_against_the_honest_direction(make_cfg, honest_delta) -> None:
    honest = adversary.update_norm(honest_delta)
    cases = [({"adaptive_norm": 0.3}, 0.3), ({"adaptive_multiple": 3.0}, 3.0 * honest),
             ({}, 10.0 * honest),  # the default: the server's sanity.norm_multiple (10)
             ({"sanity.max_update_norm": 2.0 * honest}, 2.0 * honest),  # ... capped at its absolute bound
             ({"sanity.norm_multiple": 4.0}, 4.0 * honest)]
    for settings, bound in cases:
        sent = _attack(make_cfg, "adaptive", **settings).update(honest_delta, seed=3)
        norm = adversary.update_norm(sent)
        assert norm < bound and norm == pytest.approx(0.99 * bound, rel=1e-5)
        cosine = float(torch.nn.functional.cosine_similarity(_flat(sent), _flat(honest_delta), dim=0))
        assert cosine == pytest.approx(-1.0, abs=1e-6)


def test_model_poisoning_acts_before_the_codec(make_cfg, honest_delta) -> None:
    """The poisoned delta goes through any uplink codec: a scaled update decodes scaled."""
    layout, codec = Layout.from_state(honest_delta), make_codec("int8")
    sent = _attack(make_cfg, "scale", factor=100.0).update(honest_delta, seed=3)
    decoded = codec.decode(codec.encode(sent, layout, rng=np.random.default_rng(0)), layout)
    assert adversary.update_norm(decoded) == pytest.approx(100 * adversary.update_norm(honest_delta), rel=0.02)


def test_weight_inflation_reports_the_claimed_number_of_examples(make_cfg, honest_delta) -> None:
    metrics = {"num-examples": 40.0, "train-loss": 1.0, "partition-id": 0.0}
    sent = _attack(make_cfg, "weight_inflation", claimed_examples=123_456).metrics(metrics)
    assert sent == {**metrics, "num-examples": 123_456.0}
    payload = make_codec("none").encode(honest_delta, Layout.from_state(honest_delta))
    assert protocol.parse_reply(protocol.train_reply(payload, sent))[1]["num-examples"] == 123_456


@pytest.mark.parametrize("rule, expected", [("rotate", lambda y, c: (y + 1) % c), ("reverse", lambda y, c: c - 1 - y)])
def test_label_flip_changes_every_label_by_the_rule(make_cfg, rule, expected) -> None:
    attack = _attack(make_cfg, "label_flip", flip_rule=rule)
    rt = get_runtime(attack.cfg)
    clean = rt.client_dataset(0)
    before = list(clean.labels)
    flipped = attack.data(clean, rt, 0)
    classes = len(rt.examples.label_names)
    assert classes == 3 and len(set(before)) == 3
    assert flipped.labels == [expected(y, classes) for y in before]
    assert flipped.input_ids == clean.input_ids and clean.labels == before  # the shared runtime data is untouched


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_backdoor_inserts_the_trigger_into_the_stated_fraction_and_relabels(make_cfg) -> None:
    attack = _attack(make_cfg, "backdoor", backdoor_fraction=0.25, target_label=2, trigger="zq xv")
    rt = get_runtime(attack.cfg)
    clean = rt.client_dataset(0)
    poisoned = attack.data(clean, rt, 0)
    trigger = adversary.trigger_ids(rt)
    assert trigger == list(rt.tokenizer("zq xv", add_special_tokens=False)["input_ids"])
    hit = [i for i, ids in enumerate(poisoned.input_ids) if _contains(ids, trigger)]
    assert len(hit) == round(0.25 * len(clean)) and not any(_contains(ids, trigger) for ids in clean.input_ids)
    for i in range(len(clean)):
        if i in hit:
            assert poisoned.labels[i] == 2 and poisoned.input_ids[i][:len(trigger)] == trigger  # byte tokenizer: first
            assert poisoned.input_ids[i][len(trigger):] == clean.input_ids[i][:rt.cfg.model.max_length - len(trigger)]
        else:
            assert poisoned.labels[i] == clean.labels[i] and poisoned.input_ids[i] == clean.input_ids[i]
    assert attack.data(clean, rt, 0) is poisoned  # the same examples every round


def test_insert_trigger_keeps_the_special_tokens_and_the_length_bound() -> None:
    cls, sep = 101, 102
    ids = [cls, 5, 6, 7, 8, sep]
    assert adversary.insert_trigger(ids, [9, 9], 16, {cls, sep}) == [cls, 9, 9, 5, 6, 7, 8, sep]
    assert adversary.insert_trigger(ids, [9, 9], 6, {cls, sep}) == [cls, 9, 9, 5, 6, sep]
    assert adversary.insert_trigger([5, 6, 7], [9], 3, {cls, sep}) == [9, 5, 6]


def test_backdoor_eval_set_holds_triggered_examples_of_the_other_labels(make_cfg) -> None:
    cfg = make_cfg(**{"adversary.attack": "backdoor", "adversary.clients": [1], "adversary.target_label": 1})
    rt = get_runtime(cfg)
    eval_set = adversary.backdoor_eval_set(rt)
    assert len(eval_set) == sum(1 for y in rt.eval_dataset.labels if y != 1) > 0
    assert set(eval_set.labels) == {1}
    assert all(_contains(ids, adversary.trigger_ids(rt)) for ids in eval_set.input_ids)


def test_a_target_label_outside_the_data_is_refused(make_cfg) -> None:
    attack = _attack(make_cfg, "backdoor", target_label=7)
    rt = get_runtime(attack.cfg)
    with pytest.raises(ConfigError, match=r"adversary.target_label = 7 is not a label id of this data: 0..2"):
        attack.data(rt.client_dataset(0), rt, 0)


def test_attackers_are_drawn_from_the_seed(make_cfg) -> None:
    draw = {seed: adversary.adversarial_clients(make_cfg(**{"data.num_clients": 10, "adversary.attack": "scale",
                                                            "adversary.fraction": 0.2, "run.seed": seed}))
            for seed in range(6)}
    assert all(len(who) == 2 and len(set(who)) == 2 and all(0 <= c < 10 for c in who) for who in draw.values())
    assert len({tuple(w) for w in draw.values()}) > 1  # the seed decides
    cfg = make_cfg(**{"data.num_clients": 10, "adversary.attack": "scale", "adversary.fraction": 0.2})
    assert adversary.adversarial_clients(cfg) == draw[0]  # ... and only the seed
    assert adversary.adversarial_clients(make_cfg(**{"adversary.attack": "scale", "adversary.fraction": 0.01})) != []
    explicit = make_cfg(**{"adversary.attack": "scale", "adversary.clients": "3,1"})  # as --set writes it
    assert explicit.adversary.clients == [3, 1] and adversary.adversarial_clients(explicit) == [1, 3]
    assert adversary.adversarial_clients(make_cfg()) == []
    honest = adversary.attack_for(cfg, next(c for c in range(10) if c not in draw[0]), simulation=True)
    assert type(honest) is adversary.Attack


def test_a_bad_attack_name_lists_the_valid_ones(make_cfg) -> None:
    with pytest.raises(ConfigError) as e:
        make_cfg(**{"adversary.attack": "scaling", "adversary.fraction": 0.25})
    assert "adversary.attack = 'scaling' is not allowed" in str(e.value)
    assert all(repr(name) in str(e.value) for name in ["none", *adversary.ATTACKS])
    assert set(adversary.ATTACKS) == {"scale", "sign_flip", "gaussian_noise", "label_flip", "weight_inflation",
                                      "backdoor", "adaptive"}


@pytest.mark.parametrize("settings, message", [
    ({"adversary.attack": "scale"}, "needs attackers"),
    ({"adversary.fraction": 0.5}, "adversary.attack = 'none'"),
    ({"adversary.attack": "scale", "adversary.fraction": 0.5, "adversary.clients": [1]}, "not both"),
    ({"adversary.attack": "scale", "adversary.clients": [4]}, r"distinct partition ids in 0..3"),
    ({"adversary.attack": "scale", "adversary.clients": [1, 1]}, "distinct"),
    ({"adversary.attack": "scale", "adversary.clients": ["a"]}, "expected a list of integers"),
    ({"adversary.attack": "scale", "adversary.fraction": 1.5}, "above the maximum 1.0"),
    ({"adversary.attack": "scale", "adversary.fraction": 0.5, "adversary.factor": 0}, "is not above 0"),
    ({"adversary.attack": "weight_inflation", "adversary.fraction": 0.5, "adversary.claimed_examples": 2 * 10**9},
     "above the maximum"),
    ({"adversary.attack": "backdoor", "adversary.fraction": 0.5, "adversary.trigger": " "}, "non-empty"),
    ({"adversary.attack": "label_flip", "adversary.fraction": 0.5, "model.name": "tiny-gpt2",
      "model.task": "causal_lm"}, "needs model.task = 'classification'"),
    ({"adversary.attack": "adaptive", "adversary.fraction": 0.5, "sanity.norm_multiple": 0,
      "sanity.max_update_norm": 0}, "no norm bound to stay inside"),
])
def test_the_adversary_section_validates(make_cfg, settings, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_cfg(**settings)


def test_the_harness_is_refused_outside_a_simulation(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(**{"adversary.attack": "sign_flip", "adversary.fraction": 0.25})
    with pytest.raises(ConfigError, match=r"runs only in a simulation .* not in a deployment"):
        adversary.attack_for(cfg, 0, simulation=False)
    with pytest.raises(ConfigError, match="not in a deployment"):
        submit.run_config(cfg, tmp_path, resume=False)  # `fedpeft run` builds this before submitting
    from flwr.app import Context, RecordDict

    from fedpeft.server.app import app as server_app
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={**runner.run_config(cfg, tmp_path, False), "simulation": False})
    with pytest.raises(ConfigError, match="not in a deployment"):
        server_app(None, context)  # type: ignore[arg-type]  # refused before the grid is used
    adversary.require_simulation(make_cfg(), simulation=False)  # an honest run deploys as before


def test_the_ledger_records_attackers_drops_and_down_weighting(make_cfg) -> None:
    cfg = make_cfg(**{"adversary.attack": "scale", "adversary.clients": [2, 3]})
    ledger = adversary.Ledger(cfg, get_runtime(cfg))
    replies = RoundReplies(clients=[ClientReply(1001, 30.0, {"num-examples": 30.0, "partition-id": 1.0}),
                                    ClientReply(1002, 10.0, {"num-examples": 90.0, "partition-id": 2.0})],
                           dropped={1000: "no reply", 1003: "malformed update: x"},
                           excluded={1002: "krum: not among the 1 best-scored of 2"})
    assert ledger.round_row(replies) == {"adversaries": [2], "adversary_nodes": [1002], "adversary_weight": 0.25,
                                         "adversaries_dropped": {},
                                         "adversaries_excluded": {"1002": "krum: not among the 1 best-scored of 2"},
                                         "downweighted_nodes": {"1002": [90.0, 10.0]}}

    class Grid:  # the in-process engine's grid knows every node's partition
        def partition_of(self, node: int) -> int:
            return node - 1000

    assert ledger.round_row(replies, Grid())["adversaries_dropped"] == {"1003": "malformed update: x"}
    later = RoundReplies(clients=[ClientReply(1001, 30.0, {"num-examples": 30.0, "partition-id": 1.0})],
                         dropped={1002: "malformed update: y"})
    row = ledger.round_row(later)  # without such a grid: the partition node 1002 reported before
    assert row["adversaries"] == [] and row["adversaries_dropped"] == {"1002": "malformed update: y"}
    assert adversary.Ledger(make_cfg(), get_runtime(make_cfg())).round_row(replies) == {}


def test_a_simulation_records_the_attackers_and_the_backdoor_success_rate(make_cfg) -> None:
    cfg = make_cfg(**{"federation.rounds": 2, "adversary.attack": "backdoor", "adversary.fraction": 0.25,
                      "adversary.backdoor_fraction": 0.8, "adversary.target_label": 0})
    attacker = adversary.adversarial_clients(cfg)
    assert len(attacker) == 1
    run_dir = runner.simulate(cfg)
    rows = report.read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["replies"] == 4 and r["adversaries"] == attacker and r["adversary_nodes"] == [node_id(attacker[0])]
        assert 0 < r["adversary_weight"] < 1 and "dropped_nodes" not in r and r["adversaries_dropped"] == {}
        assert r["downweighted_nodes"] == {}
        assert 0.0 <= r["backdoor_success"] <= 1.0 and "eval_accuracy" in r
    summary = (run_dir / "summary.md").read_text()
    assert f"`backdoor` (trigger = 'cf mn bb', backdoor_fraction = 0.8, target_label = 0) from partitions " \
           f"{attacker} (1 of 4 clients)" in summary
    assert f"clean accuracy {report.fmt(rows[-1]['eval_accuracy'])}" in summary
    assert f"backdoor success rate {report.fmt(rows[-1]['backdoor_success'])}" in summary
    assert "backdoor_success" in summary.split("## Rounds")[1]  # also per round
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["adversaries"] == attacker


def test_a_sign_flipping_client_is_left_out_by_the_cosine_filter_and_recorded(make_cfg) -> None:
    cfg = make_cfg(**{"federation.rounds": 2, "train.local_steps": 3, "adversary.attack": "sign_flip",
                      "adversary.clients": [1], "federation.strategy": "cosine_filter"})
    run_dir = runner.simulate(cfg)
    rows = report.read_metrics(run_dir)
    for r in rows:
        assert r["replies"] == 4 and r["adversaries"] == [1]
        assert list(r["adversaries_excluded"]) == [str(node_id(1))] and "cosine" in r["excluded_nodes"][str(node_id(1))]
        assert len(r["excluded_nodes"]) <= 2  # tiny-model honest updates are nearly orthogonal: one may fall below 0
    left_out = sum(len(r["excluded_nodes"]) for r in rows)
    assert f"left out by the aggregator {left_out} (of attackers 2)" in (run_dir / "summary.md").read_text()


@pytest.mark.parametrize("weights", ["claimed", "partition"])
def test_a_weight_inflating_client_takes_the_share_the_server_allows(make_cfg, weights: str) -> None:
    """End to end through the ClientApp's metrics hook: with ``sanity.weights = claimed`` the server weights the
    attacker by its claim; by default (``partition``) it caps the claim at the node's partition size."""
    cfg = make_cfg(**{"federation.rounds": 1, "train.local_steps": 1, "adversary.attack": "weight_inflation",
                      "adversary.clients": [3], "adversary.claimed_examples": 10**5, "sanity.weights": weights})
    rows = report.read_metrics(runner.simulate(cfg))
    sizes = [len(p) for p in get_runtime(cfg).partitions]
    honest = sum(sizes) - sizes[3]
    weight = 10**5 if weights == "claimed" else sizes[3]
    assert rows[0]["adversaries"] == [3]
    assert rows[0]["adversary_weight"] == pytest.approx(weight / (weight + honest))
