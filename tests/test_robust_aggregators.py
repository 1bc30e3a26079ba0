"""Robust aggregators: hand-computed outputs with an outlier, zeros and ties, LoRA ΔW distances, refusals,
and a short end-to-end run of each on the tiny model."""

import math

import pytest
import torch
from safetensors.torch import load_file

from fedpeft import config, report
from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.runtime import get_runtime
from fedpeft.server.aggregators import AGGREGATORS, make_aggregator
from fedpeft.server.aggregators.cosine import leave_one_out_cosines
from fedpeft.server.aggregators.krum import gram_matrix, squared_distances
from fedpeft.server.replies import ClientReply, RoundReplies
from fedpeft.simulation import runner

ROBUST = ["median", "trimmed_mean", "norm_bounded", "sign_majority", "krum", "cosine_filter"]


def _fed(strategy, **kw):
    sets = [f"federation.strategy={strategy}", "data.num_clients=8"]
    return config.load(None, sets + [f"federation.{k}={v}" for k, v in kw.items()]).federation


def _replies(*deltas, weights=None):
    weights = weights or [1.0] * len(deltas)
    return RoundReplies(clients=[ClientReply(i, w, {"num-examples": w}, {k: torch.tensor(v) for k, v in d.items()})
                                 for i, (d, w) in enumerate(zip(deltas, weights))])


def _agg(strategy, *columns, **kw):
    """Aggregate client vectors ``columns`` (one list per client, key "w") from a zero global adapter."""
    agg = make_aggregator(_fed(strategy, **kw))
    return agg.aggregate(_replies(*({"w": c} for c in columns)), {"w": torch.zeros(len(columns[0]))})["w"]


# five clients; the last one is hostile at coordinates 0, 1 and 4; coordinate 2 is all zero (nobody sent it);
# coordinate 3 is sparse (two clients sent nothing); coordinate 4 has ties
CLIENTS = [[1.0, -1.0, 0.0, 0.0, 2.0],
           [2.0, -1.0, 0.0, 0.0, 2.0],
           [3.0, -1.0, 0.0, 2.0, 5.0],
           [4.0, -1.0, 0.0, 4.0, 5.0],
           [100.0, 50.0, 0.0, 6.0, 5.0]]


def test_median_is_the_coordinate_median_of_the_clients_that_sent_a_value():
    out = _agg("median", *CLIENTS)
    # coord 3: reporters 2, 4, 6 (r = 3 >= quorum 3): median 4 x r/n = 3/5
    assert torch.allclose(out, torch.tensor([3.0, -1.0, 0.0, 4.0 * 3 / 5, 5.0]))


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values_and_needs_a_quorum():
    out = _agg("median", [1.0, 0.0, 3.0], [2.0, 0.0, 0.0], [3.0, 7.0, 0.0], [40.0, 0.0, 0.0])
    # coord 0: (2 + 3) / 2; coord 1 and 2: one reporter < quorum min(2f + 1, n // 2 + 1) = 3
    assert torch.equal(out, torch.tensor([2.5, 0.0, 0.0]))
    ties = _agg("median", [1.0], [1.0], [2.0], [2.0], byzantine_clients=0)
    assert torch.equal(ties, torch.tensor([1.5]))


def test_trimmed_mean_drops_the_extremes_of_the_reported_values():
    out = _agg("trimmed_mean", *CLIENTS, trim_fraction=0.2)
    # k = floor(0.2 * 5) = 1 from each end; coord 3: r = 3, k = 0: mean(2, 4, 6) x 3/5; coord 4: mean(2, 5, 5)
    assert torch.allclose(out, torch.tensor([3.0, -1.0, 0.0, 4.0 * 3 / 5, 4.0]))
    assert torch.allclose(_agg("trimmed_mean", *CLIENTS, trim_fraction=0.0, byzantine_clients=0),
                          torch.tensor(CLIENTS).mean(dim=0))
    assert torch.allclose(_agg("trimmed_mean", *CLIENTS, trim_fraction=0.5), _agg("median", *CLIENTS))


def test_trimmed_mean_trims_at_least_byzantine_clients_per_side():
    """Found by an outside review: at 4 clients floor(0.2 x 4) = 0, so trimmed_mean was a plain mean and one
    sign-flipped update at -100 against three at +1 gave -24.25. It trims byzantine_clients (default 1) at least."""
    four = ([1.0], [1.0], [1.0], [-100.0])
    assert torch.equal(_agg("trimmed_mean", *four), torch.tensor([1.0]))  # drops -100 and one +1
    assert torch.equal(_agg("trimmed_mean", *four, byzantine_clients=0), torch.tensor([-24.25]))


def test_norm_bounded_mean_clips_to_the_median_norm_or_the_configured_bound():
    clients = [[3.0, 4.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [300.0, 400.0]]  # norms 5, 1, 1, 2, 500
    # median norm 2: [3, 4] -> [1.2, 1.6], [300, 400] -> [1.2, 1.6]
    assert torch.allclose(_agg("norm_bounded", *clients), torch.tensor([3.4, 6.2]) / 5)
    assert torch.allclose(_agg("norm_bounded", *clients, norm_bound=1.0), torch.tensor([2.2, 3.6]) / 5)


def test_sign_majority_votes_signs_with_the_median_client_magnitude():
    clients = [[1.0, -1.0, 0.0, 0.0, 1.0],
               [2.0, 0.0, -2.0, 0.0, -2.0],
               [3.0, -3.0, 0.0, 0.0, 0.0],
               [0.0, -1.0, 1.0, 0.0, 0.0],
               [-100.0, 100.0, 100.0, 0.0, 0.0]]
    # per-client mean non-zero magnitudes 1, 2, 3, 1, 100 -> M = 2; net votes 2, -2, 1, 0, 0 (a tie)
    assert torch.allclose(_agg("sign_majority", *clients), torch.tensor([2.0, -2.0, 1.0, 0.0, 0.0]) * 2 / 5)


def test_sign_majority_equals_the_mean_of_ternary_updates_with_a_common_scale():
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randint(-1, 2, (50,), generator=g) * 0.3).tolist() for _ in range(5)]
    assert torch.allclose(_agg("sign_majority", *clients), torch.tensor(clients).mean(dim=0), atol=1e-6)


KRUM = [[1.0, 0.0], [1.1, 0.0], [0.9, 0.0], [1.0, 0.1], [10.0, 10.0]]


@pytest.mark.parametrize("multi, expected", [(1, [1.0, 0.0]), (2, [1.05, 0.0]), (0, [1.0, 0.025])])
def test_krum_selects_the_updates_closest_to_their_neighbours(multi, expected):
    # f = 1: scores over n - f - 2 = 2 nearest: client 0 has 0.02, clients 1-3 tie at 0.03 (lowest index first)
    out = _agg("krum", *KRUM, multi_krum=multi)
    assert torch.allclose(out, torch.tensor(expected))


def test_krum_records_the_updates_it_left_out():
    replies = _replies(*({"w": c} for c in KRUM))
    make_aggregator(_fed("krum", multi_krum=0)).aggregate(replies, {"w": torch.zeros(2)})
    assert list(replies.excluded) == [4] and "not among the 4 best-scored of 5" in replies.excluded[4]


def test_leave_one_out_cosines_match_a_direct_computation():
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(6, 40, generator=g, dtype=torch.float64) + torch.linspace(0, 1, 40, dtype=torch.float64)
    got = leave_one_out_cosines(xs @ xs.T)
    for i in range(6):
        rest = xs.sum(dim=0) - xs[i]
        assert got[i].item() == pytest.approx(torch.nn.functional.cosine_similarity(xs[i], rest, dim=0).item())
    glob = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    deltas = [{"a": x[:6].reshape(2, 3).float(), "b": x[6:10].float()} for x in xs]
    flat = torch.stack([torch.cat([d["a"].reshape(-1), d["b"]]) for d in deltas]).double()
    assert torch.allclose(gram_matrix(deltas, glob), flat @ flat.T)


def test_cosine_filter_leaves_out_flipped_updates_and_clips_the_rest():
    g = torch.Generator().manual_seed(0)
    task = torch.ones(50)
    honest = [task + 0.8 * torch.randn(50, generator=g) for _ in range(7)]
    honest[0] = 30 * honest[0]  # an honest-looking direction, far too long: clipped, not dropped
    flipped = [-h for h in honest[1:3]]  # the sign-flip attack on two honest updates
    replies = _replies(*({"w": v.tolist()} for v in honest + flipped))
    out = make_aggregator(_fed("cosine_filter")).aggregate(replies, {"w": torch.zeros(50)})["w"]
    assert sorted(replies.excluded) == [7, 8] and "cosine" in replies.excluded[7]
    norms = torch.stack([v.norm() for v in honest + flipped])
    bound = norms.sort().values[(len(norms) - 1) // 2:len(norms) // 2 + 1].mean()
    want = torch.stack([v * min(1.0, float(bound / v.norm())) for v in honest]).mean(dim=0)
    assert torch.allclose(out, want, atol=1e-5)
    fedavg = make_aggregator(_fed("fedavg")).aggregate(_replies(*({"w": v.tolist()} for v in honest + flipped)),
                                                       {"w": torch.zeros(50)})["w"]
    cos = torch.nn.functional.cosine_similarity
    assert cos(out, task, dim=0) > 0.95 and cos(out, task, dim=0) > cos(fedavg, task, dim=0)
    strict = _replies(*({"w": v.tolist()} for v in honest + flipped))
    make_aggregator(_fed("cosine_filter", min_cosine=0.99)).aggregate(strict, {"w": torch.zeros(50)})
    assert len(strict.excluded) == 9  # nothing agrees that well: every update left out, the step is 0


def test_krum_distances_in_delta_w_space_are_those_of_the_changes_to_b_times_a():
    g = torch.Generator().manual_seed(1)
    a, b = "m.lora_A.default.weight", "m.lora_B.default.weight"
    glob = {a: torch.randn(2, 5, generator=g), b: torch.randn(4, 2, generator=g), "head": torch.randn(3, generator=g)}
    deltas = [{k: torch.randn(v.shape, generator=g) for k, v in glob.items()} for _ in range(3)]

    def dw(d):
        return ((glob[b] + d[b]) @ (glob[a] + d[a]) - glob[b] @ glob[a]).reshape(-1)

    def flat(d, keys):
        return torch.cat([d[k].reshape(-1) for k in keys])

    w = squared_distances(deltas, glob, "delta_w")
    f = squared_distances(deltas, glob, "factors")
    for i in range(3):
        for j in range(3):
            head = (deltas[i]["head"] - deltas[j]["head"]).square().sum()
            want_w = (dw(deltas[i]) - dw(deltas[j])).square().sum() + head
            want_f = (flat(deltas[i], glob) - flat(deltas[j], glob)).square().sum()
            assert w[i, j].item() == pytest.approx(want_w.item(), rel=1e-4, abs=1e-4)
            assert f[i, j].item() == pytest.approx(want_f.item(), rel=1e-4, abs=1e-4)


def test_krum_in_delta_w_space_is_blind_to_a_change_of_a_alone_while_b_is_zero():
    # global B = 0 (LoRA's init): a huge dA with dB = 0 leaves B·A unchanged, so in ΔW space that update sits at
    # the centre of the honest ones and is selected; in factor space (the default) it is the outlier
    g = torch.Generator().manual_seed(0)
    a, b = "m.lora_A.default.weight", "m.lora_B.default.weight"
    glob = {a: torch.randn(2, 6, generator=g), b: torch.zeros(5, 2)}
    deltas = [{a: 0.1 * torch.randn(2, 6, generator=g), b: 0.1 * torch.randn(5, 2, generator=g)} for _ in range(5)]
    deltas.append({a: torch.full((2, 6), 50.0), b: torch.zeros(5, 2)})
    replies = RoundReplies(clients=[ClientReply(i, 1.0, {"num-examples": 1.0}, d) for i, d in enumerate(deltas)])
    assert _fed("krum").krum_space == "factors"
    by_factors = make_aggregator(_fed("krum")).aggregate(replies, glob)
    by_delta_w = make_aggregator(_fed("krum", krum_space="delta_w")).aggregate(replies, glob)
    assert by_factors[a].abs().max() < 5 and torch.equal(by_delta_w[a], glob[a] + 50.0)


def _noise_round(strategy, seed=0, t=0, **kw):
    """One round of 4 clients along the same unit direction (norms 1, 2, 3, 100) over D elements: the noise-free
    norm-bounded mean is 2 / sqrt(D) per element (median norm 2.5 clips to 1, 2, 2.5, 2.5)."""
    direction = torch.ones(D) / D ** 0.5
    agg = make_aggregator(_fed(strategy, **kw))
    agg.seed, agg.t = seed, t
    out = agg.aggregate(_replies(*({"w": (c * direction).tolist()} for c in (1.0, 2.0, 3.0, 100.0))),
                        {"w": torch.zeros(D)})["w"]
    return out, direction


D = 40_000


def test_robust_noise_has_std_robust_noise_times_the_clip_bound_over_n():
    out, direction = _noise_round("norm_bounded", robust_noise=0.4)
    noise = out - 2.0 * direction
    # sigma = 0.4 x 2.5 / 4 = 0.25; the sample std of 40,000 draws is within 2 % (relative error ~ 0.35 %)
    assert abs(float(noise.std()) / 0.25 - 1) < 0.02 and abs(float(noise.mean())) < 0.01
    fixed, _ = _noise_round("norm_bounded", robust_noise=0.4, norm_bound=1.0)  # bound 1: mean 1, sigma 0.1
    assert abs(float((fixed - direction).std()) / 0.1 - 1) < 0.02


def test_robust_noise_of_a_rule_that_does_not_clip_scales_with_the_median_norm():
    out, direction = _noise_round("median", robust_noise=0.4, byzantine_clients=0)
    assert abs(float((out - 2.5 * direction).std()) / 0.25 - 1) < 0.02  # the median of (1, 2, 3, 100) is 2.5


def test_robust_noise_is_seeded_by_the_run_seed_and_the_step_count():
    a, _ = _noise_round("norm_bounded", seed=0, t=1, robust_noise=0.4)
    assert torch.equal(a, _noise_round("norm_bounded", seed=0, t=1, robust_noise=0.4)[0])  # a resumed round
    assert not torch.allclose(a, _noise_round("norm_bounded", seed=1, t=1, robust_noise=0.4)[0])
    assert not torch.allclose(a, _noise_round("norm_bounded", seed=0, t=2, robust_noise=0.4)[0])


def test_sign_threshold_reverses_the_step_where_the_signs_do_not_agree():
    clients = [[1.0, 1.0, 1.0, -1.0, 0.0],
               [1.0, 1.0, -1.0, -1.0, 0.0],
               [1.0, 1.0, 1.0, 0.0, 0.0],
               [1.0, -1.0, 1.0, 0.0, 2.0],
               [1.0, -1.0, -3.0, 0.0, 3.0]]
    # net sign votes 5, 1, 1, -2 (two abstain), 2 (three abstain); a bound of 100 clips nothing
    mean = torch.tensor([5.0, 1.0, -1.0, -2.0, 5.0]) / 5
    assert torch.allclose(_agg("norm_bounded", *clients, norm_bound=100.0), mean)
    assert torch.allclose(_agg("norm_bounded", *clients, norm_bound=100.0, sign_threshold=2),
                          mean * torch.tensor([1, -1, -1, 1, 1]))
    agg = make_aggregator(_fed("norm_bounded", norm_bound=100.0, sign_threshold=3))
    out = agg.aggregate(_replies(*({"w": c} for c in clients)), {"w": torch.zeros(5)})["w"]
    assert torch.allclose(out, mean * torch.tensor([1, -1, -1, -1, -1])) and agg.metrics["sign_reversed"] == 4 / 5


def test_backdoor_defences_are_refused_with_a_strategy_that_is_not_robust():
    for key in ("robust_noise=0.1", "sign_threshold=2"):
        name = key.split("=")[0]
        with pytest.raises(ConfigError, match=f"federation.{name} = .* acts on a robust aggregate, but federation."
                                              "strategy = 'fedavg' is not robust: use one of .*norm_bounded"):
            config.load(None, [f"federation.{key}", "data.num_clients=4"])
    with pytest.raises(ConfigError, match="federation.sign_threshold = 5 exceeds the 4 clients per round"):
        config.load(None, ["federation.strategy=norm_bounded", "federation.sign_threshold=5", "data.num_clients=4"])
    config.load(None, ["federation.strategy=krum", "federation.robust_noise=0.1", "federation.sign_threshold=4",
                       "data.num_clients=5"])


@pytest.mark.parametrize("name", ROBUST)
def test_all_zero_and_identical_updates_are_handled(name):
    zeros = _agg(name, *([[0.0, 0.0, 0.0]] * 5))
    assert torch.equal(zeros, torch.zeros(3))
    same = _agg(name, *([[0.5, -0.5, 0.0]] * 5))
    assert torch.allclose(same, torch.tensor([0.5, -0.5, 0.0]))


@pytest.mark.parametrize("name", ROBUST)
def test_robust_steps_use_server_lr_and_ignore_claimed_weights(name):
    agg = make_aggregator(_fed(name, server_lr=0.5))
    honest = {"w": [0.2, -0.2]}
    replies = _replies(honest, honest, honest, honest, {"w": [90.0, -90.0]}, weights=[1, 1, 1, 1, 1e9])
    out = agg.aggregate(replies, {"w": torch.ones(2)})["w"]
    assert torch.allclose(out, torch.ones(2) + 0.5 * torch.tensor([0.2, -0.2]))
    assert agg.t == 1


@pytest.mark.parametrize("name", ROBUST)
def test_robust_strategies_refuse_secure_aggregation_and_client_level_dp(name):
    agg_cls = AGGREGATORS.get(name)
    assert agg_cls.needs_individual_updates and not agg_cls.supports_client_dp
    base = [f"federation.strategy={name}", "data.num_clients=6"]
    with pytest.raises(ConfigError, match="privacy.secure_aggregation = 'secaggplus' shows the server only their sum"):
        config.load(None, [*base, "privacy.secure_aggregation=secaggplus"])
    for mode in ("client", "both"):
        with pytest.raises(ConfigError, match=f"federation.strategy = '{name}' does not apply client-level DP"):
            config.load(None, [*base, f"privacy.mode={mode}"])
    config.load(None, [*base, "privacy.mode=local"])  # DP-SGD on the clients composes with any aggregator
    secure = RoundReplies(clients=_replies({"w": [0.0]}).clients, secure_mean={"w": torch.tensor([0.5])})
    with pytest.raises(FedPeftError, match="only the sum"):
        make_aggregator(_fed(name)).aggregate(secure, {"w": torch.zeros(1)})


def test_krum_needs_2f_plus_3_clients_and_at_most_n_minus_f_selected():
    with pytest.raises(ConfigError, match="at least 2f \\+ 3 = 5 clients per round \\(got 4\\)"):
        config.load(None, ["federation.strategy=krum", "data.num_clients=4"])
    config.load(None, ["federation.strategy=krum", "data.num_clients=4", "federation.byzantine_clients=0"])
    with pytest.raises(ConfigError, match="federation.multi_krum = 5 exceeds the n - f = 4"):
        config.load(None, ["federation.strategy=krum", "data.num_clients=5", "federation.multi_krum=5"])
    with pytest.raises(ConfigError, match="federation.trim_fraction"):
        config.load(None, ["federation.trim_fraction=0.6"])


DEFENDED = {"federation.robust_noise": 0.5, "federation.sign_threshold": 2}


@pytest.mark.parametrize("strategy, uplink, extra", [("median", "none", {}), ("trimmed_mean", "topk:0.2", {}),
                                                     ("norm_bounded", "int8", {}), ("sign_majority", "compeft:0.2", {}),
                                                     ("krum", "fp16", {}), ("cosine_filter", "compeft:0.2", {}),
                                                     ("norm_bounded", "none", DEFENDED)])
def test_each_robust_strategy_runs_end_to_end(tiny_cfg, strategy, uplink, extra):
    cfg = tiny_cfg(**{"federation.strategy": strategy, "compression.uplink": uplink, "data.num_clients": 4,
                      "federation.rounds": 2, "train.local_steps": 3,
                      "federation.byzantine_clients": 0 if strategy == "krum" else 1, **extra})
    run_dir = runner.simulate(cfg)
    rows = report.read_metrics(run_dir)
    assert [r["replies"] for r in rows] == [4, 4] and all(math.isfinite(r["eval_loss"]) for r in rows)
    if extra:  # the defences report what they did every round
        assert all(0 <= r["sign_reversed"] <= 1 and r["robust_noise_std"] > 0 for r in rows)
    final = load_file(str(run_dir / "checkpoint" / "global.safetensors"))
    initial = get_runtime(cfg).initial_adapter()
    assert all(torch.isfinite(v).all() for v in final.values())
    assert any(not torch.equal(final[k], initial[k]) for k in initial)
