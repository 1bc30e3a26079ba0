"""Gradient-inversion attacks on tiny models: the issue's leakage targets, held as tests.

Victims: tiny-llama (d=128, LoRA r=16 on q/k/v unless stated), 16-token byte-level sequences of
random words, global adapter in a "later round" state (B ≠ 0) unless stated. Padded batches: independent
victims built with plain transformers + peft (``plain_victims.py``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from plain_victims import classifier_victim, padded_victim

from fedpeft.attacks import ATTACKS, AttackResult, NotApplicable, Observation, run_attack
from fedpeft.attacks.metrics import ranking_score, summarize, token_prf
from fedpeft.audit.victim import make_victim

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is faster


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def _attack(attack: str, seeds: range, params: dict | None = None, **victim: object) -> list[dict[str, float]]:
    out = []
    for seed in seeds:
        obs, truth = make_victim(seed=seed, **victim)  # type: ignore[arg-type]
        out.append(summarize(run_attack(attack, obs, **(params or {})), truth.input_ids))
    return out


def test_observation_carries_no_ground_truth() -> None:
    names = {f.name for f in dataclasses.fields(Observation)}
    assert not names & {"input_ids", "labels", "truth", "tokens"}


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_span_recovers_the_bag_within_the_rank_budget(batch_size: int) -> None:
    rows = _attack("span", range(2), batch_size=batch_size)
    assert _mean(rows, "token_f1") >= 0.95


def test_span_on_gpt2_learned_positions() -> None:
    (row,) = _attack("span", range(1), model="tiny-gpt2", batch_size=1)
    assert row["token_f1"] >= 0.95
    assert row["positional_accuracy"] >= 0.9  # 15/16: the last token of a causal LM is invisible


def test_first_round_single_step_da_is_zero_and_span_is_at_chance() -> None:
    obs, truth = make_victim(first_round=True, batch_size=2, seed=0)
    a_names = [n for n in obs.update if ".lora_A." in n]
    assert a_names and all(float(obs.update[n].abs().max()) == 0.0 for n in a_names)
    result = run_attack("span", obs, channel="A")
    assert summarize(result, truth.input_ids)["token_f1"] < 0.1


def test_first_round_db_channel_leaks_only_below_rank() -> None:
    below = _attack("span", range(2), {"channel": "B"}, first_round=True, batch_size=1, r=16)  # ~11 tokens < r
    above = _attack("span", range(2), {"channel": "B"}, first_round=True, batch_size=4, r=8)  # ~18 tokens >= r
    assert _mean(below, "token_f1") >= 0.8
    assert _mean(above, "token_f1") < 0.1


def test_multi_step_delta_leaks_even_in_the_first_round() -> None:
    rows = _attack("span", range(1), first_round=True, batch_size=2, steps=5, lr=0.1)
    assert rows[0]["token_f1"] >= 0.95


def test_stacking_rounds_makes_an_over_budget_check_exact() -> None:
    one = _attack("span", range(2), batch_size=2, r=4)  # ~15 distinct tokens > 3 modules x r=4
    two = _attack("span", range(2), batch_size=2, r=4, rounds=2)
    assert _mean(one, "token_f1") < 0.8
    assert _mean(two, "token_f1") >= 0.95


def test_span_decode_recovers_exact_sequences_float64() -> None:
    rows = _attack("span_decode", range(2), batch_size=1, float64=True)
    rows += _attack("span_decode", range(1, 3), batch_size=2, float64=True)
    assert _mean(rows, "exact") >= 0.95


@pytest.mark.parametrize("arch, batch_size, dtype, seeds, victim", [
    ("llama", 1, "float64", (0, 1), {}), ("llama", 2, "float64", (0, 1), {}), ("llama", 4, "float64", (0, 1), {}),
    ("llama", 4, "float64", (0, 1), {"eos": False}), ("gpt2", 4, "float64", (0, 1), {}),
    ("llama", 4, "float32", (2, 9), {}),  # seeds where a repeated last token sits at residual ~0.04
    ("llama", 4, "float32", (0, 1), {"text": "words"}),  # WordPiece: [CLS] the ... [SEP], shared prefixes
    ("llama", 4, "float32", (0, 1), {"text": "words", "sgd_lr": 0.01}),  # float32 SGD step: true inputs at ~1e-3
])
def test_span_decode_recovers_padded_batches_exactly(arch: str, batch_size: int, dtype: str, seeds: tuple[int, ...],
                                                     victim: dict) -> None:
    """Independent victims (plain transformers + peft): sentences of different lengths, right-padded,
    attention mask 0 and label -100 on padding. Each sentence comes back with its own length (in
    float32 a repeat of a sentence's last visible token lies near the span: it must not extend it)."""
    rows = []
    for seed in seeds:
        obs, ids, mask = padded_victim(batch_size, seed, arch=arch, dtype=getattr(torch, dtype), **victim)
        result = run_attack("span_decode", obs)
        assert sorted(map(len, result.sequences)) == sorted(mask.sum(1).tolist())
        rows.append(summarize(result, ids, mask))
    assert _mean(rows, "exact") >= 0.9
    assert _mean(rows, "token_f1") >= 0.9


def test_noise_multiplier_point_one_brings_every_attack_to_chance() -> None:
    victim = {"batch_size": 1, "noise_multiplier": 0.1}
    for attack, params, seeds in [("span", {}, range(4)), ("subspace_opt", {}, range(4)),
                                  ("grad_match", {"iterations": 40}, range(2))]:
        rows = _attack(attack, seeds, params, **victim)
        chance = _mean(rows, "chance_top_true")
        assert _mean(rows, "token_f1") < 3 * chance, attack
        assert _mean(rows, "top_true") < 3 * chance, attack


@pytest.mark.parametrize("victim, params", [
    ({"noise_multiplier": 1e-3}, {"iterations": 60}),
    ({"codec": "compeft:0.1"}, {"iterations": 60, "candidates": "span"}),
])
def test_grad_match_beats_chance_tenfold_where_the_exact_attack_fails(victim: dict, params: dict) -> None:
    exact = _attack("span", range(2), batch_size=1, **victim)
    assert _mean(exact, "token_f1") < 0.1  # the exact bag is empty: nothing separates
    rows = _attack("grad_match", range(2), params, batch_size=1, **victim)
    chance = _mean(rows, "chance_top_true")
    assert _mean(rows, "top_true") >= 10 * chance
    assert _mean(rows, "token_f1") >= 10 * chance


def test_subspace_ranking_survives_ternary_compression_and_adam() -> None:
    for victim in ({"codec": "compeft:0.1"}, {"steps": 3, "optimizer": "adam", "lr": 1e-3}):
        rows = _attack("subspace_opt", range(2), batch_size=2, **victim)
        assert _mean(rows, "top_true") >= 5 * _mean(rows, "chance_top_true"), victim


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_registered_attack_runs_on_the_tiny_model(name: str) -> None:
    adam = {"steps": 3, "optimizer": "adam", "lr": 1e-3} if name in ("sign_span", "unroll") else {}  # Adam clients
    obs, truth = make_victim(batch_size=1, seed=0, r=8, **adam)
    if name == "sign_span":
        with pytest.raises(NotApplicable):
            run_attack(name, make_victim(batch_size=1, seed=0, r=8)[0])  # plain SGD: span's case
    if name == "smashed":  # attacks split-learning activations, not adapter updates (tests/test_attacks_smashed.py)
        with pytest.raises(NotApplicable):
            run_attack(name, obs)
        return
    params = {"iterations": 3} if name == "grad_match" else {"replays": 100} if name == "unroll" else {}
    result = run_attack(name, obs, **params)
    assert isinstance(result, AttackResult) and result.attack == name and result.seconds > 0
    summarize(result, truth.input_ids)
    if result.token_scores is not None:
        assert result.token_scores.shape == (truth.vocab_size,)


@pytest.mark.parametrize("adapter", ["prompt", "prefix"])
def test_attacks_on_soft_prompts_run_or_say_not_applicable(adapter: str) -> None:
    obs, truth = make_victim(adapter=adapter, batch_size=1, seed=0)
    for name in ATTACKS.names():
        try:
            result = run_attack(name, obs, iterations=3)
        except NotApplicable:
            assert name in ("span", "span_decode", "subspace_opt", "sign_span", "smashed", "unroll")
            continue
        assert isinstance(result, AttackResult)
    rows = summarize(run_attack("grad_match", obs, iterations=40), truth.input_ids)
    assert rows["top_true"] > rows["chance_top_true"]


def test_idlg_recovers_labels_from_a_trained_head() -> None:
    obs, truth = make_victim(task="classification", batch_size=1, seed=3)
    result = run_attack("label_and_canary", obs)
    assert result.labels == truth.labels.tolist()
    assert "feature" in result.extra
    obs, truth = make_victim(task="classification", batch_size=4, seed=3)
    assert sorted(run_attack("label_and_canary", obs).labels) == sorted(truth.labels.tolist())


def test_planted_canary_is_exposed_and_a_fake_one_is_not() -> None:
    obs, truth = make_victim(batch_size=1, seed=0)
    canary = truth.input_ids[0, :8].tolist()
    alphabet = sorted(set(range(65, 95)) | set(canary))
    fake = [a for a in alphabet if a not in canary][:1] * 8
    reports = run_attack("label_and_canary", obs, canaries=[canary, fake], alphabet=alphabet).extra["canaries"]
    assert reports[0]["exposure"] >= 0.8 * reports[0]["max_exposure"]
    assert reports[1]["exposure"] < 2.0


def test_ranking_score_of_a_perfect_and_a_random_ranking() -> None:
    scores = torch.zeros(100)
    scores[[3, 7, 9]] = 1.0
    perfect = ranking_score(scores, [3, 7, 9, 9])
    assert perfect["top_true"] == 1.0 and perfect["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert perfect["chance_top_true"] == pytest.approx(0.03)
    assert token_prf([], [1])["f1"] == 0.0


def test_observation_from_a_federated_round_delta() -> None:
    from fedpeft import config

    obs, truth = make_victim(batch_size=2, seed=0, steps=3, lr=0.05)
    train = dataclasses.replace(config.TrainSection(), local_steps=3, lr=0.05, optimizer="sgd", batch_size=2)
    fed = Observation.from_round(obs.model, obs.global_state, obs.update, train, num_examples=2, seq_len=16)
    assert fed.kind == "delta" and fed.token_bound == 32
    assert summarize(run_attack("span", fed), truth.input_ids)["token_f1"] >= 0.95


def test_evaluate_runs_every_attack_and_marks_inapplicable_ones() -> None:
    from fedpeft.attacks.metrics import evaluate

    obs, truth = make_victim(adapter="prompt", batch_size=1, seed=0)
    rows = evaluate(obs, truth.input_ids, params={"grad_match": {"iterations": 3}})
    assert set(rows) == set(ATTACKS.names())
    assert rows["span"] == {"applicable": 0.0} and rows["grad_match"]["applicable"] == 1.0


def test_span_decode_refuses_a_bidirectional_encoder_but_decodes_a_causal_classifier() -> None:
    encoder, _ = classifier_victim("bert", seed=0)
    with pytest.raises(NotApplicable, match="bidirectional"):
        run_attack("span_decode", encoder)
    assert "cands:0" not in encoder.shared_values()  # refused before the per-vocabulary forward passes
    assert run_attack("span", encoder).bag  # the token-local first block is still read
    decoder, ids = classifier_victim("gpt2", seed=0)
    assert ids[0].tolist() in run_attack("span_decode", decoder).sequences


def test_shared_values_pass_to_another_observation_without_recomputing() -> None:
    obs, ids, _ = padded_victim(1, seed=0)
    first = run_attack("span", obs)
    assert set(obs.shared_values()) == {"cands:0"}  # the working model depends on the adapter: not shared
    other, _, _ = padded_victim(1, seed=0)
    other.adopt(obs.shared_values())
    assert other.memo("cands:0", lambda: pytest.fail("recomputed")) is obs.shared_values()["cands:0"]
    assert run_attack("span", other).bag == first.bag and len(first.bag) >= 4 and set(first.bag) <= set(ids[0].tolist())


def test_canary_rank_counts_ties_as_average_rank() -> None:
    from fedpeft.attacks.label_and_canary import canary_rank
    from fedpeft.attacks.metrics import exposure

    alphabet = list(range(10))
    rank, space = canary_rank([3, 4, 5], torch.zeros(50), alphabet, samples=2000, seed=0)
    assert space == 1000 and abs(rank - 500.5) <= 1  # flat scores: the middle, not rank 1
    assert exposure(rank, space) == pytest.approx(1.0, abs=0.01)
    peaked = torch.zeros(50)
    peaked[3] = 1.0
    assert canary_rank([3, 3, 3], peaked, alphabet, samples=2000, seed=0)[0] == 1  # the unique top sequence
    rank = canary_rank([6, 6, 6], peaked, alphabet, samples=2000, seed=0)[0]
    assert abs(rank - (271 + 365)) < 40  # below the 271 sequences with a 3, middle of the 729 tied ones


def test_grad_match_lm_prior_runs_and_changes_the_optimisation() -> None:
    obs, truth = make_victim(batch_size=1, seed=0, r=8)
    plain = run_attack("grad_match", obs, iterations=6)
    again = run_attack("grad_match", obs, iterations=6, lm_weight=0.0)
    prior = run_attack("grad_match", obs, iterations=6, lm_weight=1.0)
    base = run_attack("grad_match", obs, iterations=6, lm_weight=1.0, lm_model="base")
    assert torch.equal(plain.token_scores, again.token_scores)  # off by default, deterministic
    assert not torch.equal(plain.token_scores, prior.token_scores)
    assert not torch.equal(prior.token_scores, base.token_scores)  # base model ≠ model with the global adapter
    assert prior.extra["lm_weight"] == 1.0 and "positional_accuracy" in summarize(prior, truth.input_ids)
    cls_obs, _ = make_victim(task="classification", batch_size=1, seed=0)
    with pytest.raises(ValueError, match="causal LM"):
        run_attack("grad_match", cls_obs, iterations=1, lm_weight=0.1)
