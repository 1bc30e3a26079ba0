"""cosine_filter's backdoor defence: per-group outlier scores and a cross-round client reputation (hand-computed
outputs), its configuration, and a resumed run that continues the reputations exactly."""

import pytest
import torch
from safetensors.torch import load_file

from fedpeft import config, report
from fedpeft.errors import ConfigError
from fedpeft.server.aggregators import make_aggregator
from fedpeft.server.aggregators.reputation import group_of, low_outliers
from fedpeft.server.replies import ClientReply, RoundReplies
from fedpeft.simulation import runner
from fedpeft.simulation.inprocess import node_id

from conftest import interrupt_and_resume

LORA, HEAD = "enc.q.lora_A.default.weight", "head.weight"


def _fed(**kw: object):
    sets = ["federation.strategy=cosine_filter", "data.num_clients=5"]
    return config.load(None, sets + [f"federation.{k}={v}" for k, v in kw.items()]).federation


def _replies(updates: list[tuple[list[float], list[float]]]) -> RoundReplies:
    return RoundReplies(clients=[ClientReply(10 + i, 1.0, {"num-examples": 1.0},
                                             {LORA: torch.tensor(lora), HEAD: torch.tensor(head)})
                                 for i, (lora, head) in enumerate(updates)])


ZERO = {LORA: torch.zeros(3), HEAD: torch.zeros(2)}
# four honest clients and one whose LoRA part copies an honest one while its head points the other way; every
# update has norm sqrt(11), so the median-norm clip leaves them all as they are
PLANTED = [([3.0, 1.0, 0.0], [1.0, 0.0]), ([3.0, 0.0, 1.0], [0.0, 1.0]), ([1.0, 3.0, 0.0], [1.0, 0.0]),
           ([0.0, 3.0, 1.0], [0.0, 1.0]), ([3.0, 1.0, 0.0], [-0.6, -0.8])]


def test_score_groups_split_lora_factors_from_the_other_tensors():
    a, b = "m.layer.0.query.lora_A.default.weight", "m.layer.0.query.lora_B.default.weight"
    assert {group_of(k, "kind") for k in (a, b)} == {"lora"} and group_of("m.classifier.bias", "kind") == "other"
    assert group_of(a, "module") == group_of(b, "module") == "m.layer.0.query"
    assert group_of("m.classifier.weight", "module") == group_of("m.classifier.bias", "module") == "m.classifier"
    assert group_of(a, "whole") == group_of("m.classifier.bias", "whole") == "whole"


def test_low_outliers_are_below_the_median_by_more_than_z_robust_deviations():
    values = torch.tensor([0.20, 0.22, 0.18, 0.21, 0.19, 0.05], dtype=torch.float64)
    # median 0.195, MAD 0.015: 0.05 is (0.195 - 0.05) / (1.4826 * 0.015) = 6.5 deviations below
    assert low_outliers(values, 6.0).tolist() == [False] * 5 + [True]
    assert not low_outliers(values, 7.0).any() and not low_outliers(values, 0.0).any()
    assert not low_outliers(torch.tensor([0.3, 0.3, 0.3 - 1e-9], dtype=torch.float64), 2.0).any()  # rounding


def test_an_outlier_in_one_group_is_left_out_where_whole_update_scores_miss_it():
    whole = _replies(PLANTED)
    out = make_aggregator(_fed(outlier_z=2.5)).aggregate(whole, ZERO)
    # the whole-update cosines 0.84 0.62 0.70 0.43 0.72: none below the median 0.70 - 2.5 x 1.4826 x MAD 0.075
    assert whole.excluded == {}
    assert torch.allclose(out[HEAD], torch.tensor([1.4, 1.2]) / 5)
    grouped = _replies(PLANTED)
    out = make_aggregator(_fed(score_groups="kind", outlier_z=2.5)).aggregate(grouped, ZERO)
    assert list(grouped.excluded) == [14] and "in group 'other'" in grouped.excluded[14]
    # the mean of the four honest updates
    assert torch.allclose(out[LORA], torch.tensor([7.0, 7.0, 2.0]) / 4)
    assert torch.allclose(out[HEAD], torch.tensor([0.5, 0.5]))
    # its head's cosine with the others is -0.99 < min_cosine = 0, so without outlier_z it is left out too
    plain = _replies(PLANTED)
    make_aggregator(_fed(score_groups="kind")).aggregate(plain, ZERO)
    assert list(plain.excluded) == [14] and "< 0.0" in plain.excluded[14]


def test_a_client_left_out_once_counts_with_its_reduced_reputation_later_and_after_a_resume():
    agg = make_aggregator(_fed(score_groups="kind", outlier_z=2.5, reputation_decay=0.5, norm_bound=100.0))
    g = agg.aggregate(_replies(PLANTED), ZERO)
    state, t = agg.state_dict()
    assert {k: v.tolist() for k, v in state.items()} == {"reputation/14": [0.5]}
    later = [([0.0, 0.0, 0.0], [1.0, 0.0])] * 4 + [([0.0, 0.0, 0.0], [2.0, 0.0])]  # nobody is an outlier
    twin = make_aggregator(agg.cfg)
    twin.load_state_dict({k: v.clone() for k, v in state.items()}, t)
    a, b = agg.aggregate(_replies(later), g), twin.aggregate(_replies(later), g)
    # (4 x 1 + 0.5 x 2) / (4 + 0.5) added to the head's first element
    assert torch.allclose(a[HEAD] - g[HEAD], torch.tensor([10 / 9, 0.0]))
    assert torch.equal(a[HEAD], b[HEAD]) and agg.metrics["reputation_below_1"] == 1.0
    off = make_aggregator(_fed(score_groups="kind", outlier_z=2.5, norm_bound=100.0))  # reputation_decay = 1
    off.aggregate(_replies(PLANTED), ZERO)
    assert off.state_dict()[0] == {}
    assert torch.allclose(off.aggregate(_replies(later), g)[HEAD] - g[HEAD], torch.tensor([1.2, 0.0]))


def test_the_scoring_options_are_validated_and_only_for_cosine_filter():
    for key, value in (("score_groups", "layer"), ("outlier_z", -1), ("reputation_decay", 1.5)):
        with pytest.raises(ConfigError, match=f"federation.{key}"):
            config.load(None, ["federation.strategy=cosine_filter", f"federation.{key}={value!r}".replace("'", '"')])
    with pytest.raises(ConfigError, match="federation.reputation_decay = 0.5 is an option of .*cosine_filter"):
        config.load(None, ["federation.strategy=krum", "federation.reputation_decay=0.5"])
    with pytest.raises(ConfigError, match="secaggplus"):
        config.load(None, ["federation.strategy=cosine_filter", "federation.score_groups=\"kind\"",
                           "privacy.secure_aggregation=\"secaggplus\""])


def test_a_resumed_run_continues_the_reputations_exactly(tiny_cfg, monkeypatch):
    sets = {"federation.strategy": "cosine_filter", "federation.score_groups": "kind", "federation.outlier_z": 2.5,
            "federation.reputation_decay": 0.5, "data.num_clients": 4,
            "federation.rounds": 3, "train.local_steps": 2, "adversary.attack": "sign_flip",
            "adversary.clients": [1]}
    straight = runner.simulate(tiny_cfg(**sets))
    resumed = interrupt_and_resume(tiny_cfg(**sets), 3, monkeypatch)
    rows = report.read_metrics(straight)
    assert all(str(node_id(1)) in r["excluded_nodes"] for r in rows)  # the sign flipper, every round
    below = [r["reputation_below_1"] for r in rows]
    assert below == [r["reputation_below_1"] for r in report.read_metrics(resumed)] and below[0] == 0 < below[-1]
    a, b = (load_file(str(d / "checkpoint" / "global.safetensors")) for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
