"""Leakage metrics on known inputs (no models)."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.attacks.metrics import (
    exposure,
    positional_accuracy,
    ranking_score,
    rouge_l,
    rouge_n,
    sequence_metrics,
    summarize,
    token_prf,
)


def test_rouge_on_known_strings() -> None:
    ref = "the cat sat on the mat".split()
    cand = "the cat was on the mat".split()
    # unigrams: 5 of 6 overlap (the x2, cat, on, mat) -> P = R = 5/6
    assert rouge_n(cand, ref, 1) == pytest.approx(5 / 6)
    # bigrams: (the cat) (on the) (the mat) of 5 -> 3/5
    assert rouge_n(cand, ref, 2) == pytest.approx(3 / 5)
    # LCS: the cat on the mat = 5
    assert rouge_l(cand, ref) == pytest.approx(5 / 6)
    assert rouge_n(ref, ref, 2) == 1.0 and rouge_l(ref, ref) == 1.0
    assert rouge_n([], ref, 1) == 0.0 and rouge_l(ref, []) == 0.0


def test_rouge_l_unequal_lengths() -> None:
    # LCS("abcde", "ace") = 3: P = 3/3, R = 3/5 -> F = 2*1*0.6/1.6
    assert rouge_l(list("ace"), list("abcde")) == pytest.approx(0.75)


def test_rouge_n_clips_repeated_ngrams() -> None:
    assert rouge_n(["a"] * 4, ["a", "b"], 1) == pytest.approx(2 * 0.25 * 0.5 / 0.75)


def test_token_f1_edge_cases() -> None:
    assert token_prf([], [])["f1"] == 1.0
    assert token_prf([1], [])["f1"] == 0.0
    assert token_prf([], [1])["f1"] == 0.0
    assert token_prf([1, 2], [3, 4])["f1"] == 0.0
    half = token_prf([1, 2, 2, 2], [1, 3])  # sets: {1,2} vs {1,3}
    assert half["precision"] == 0.5 and half["recall"] == 0.5 and half["f1"] == 0.5
    assert token_prf([1, 2, 3], [1, 2, 3])["f1"] == 1.0


def test_positional_accuracy_and_sequence_metrics() -> None:
    truth = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert positional_accuracy([(0, 5), (1, 6), (2, 8)], truth) == pytest.approx(2 / 6)
    m = sequence_metrics([[8, 9, 10], [5, 6, 0]], truth)
    assert m["exact"] == 0.5 and m["rouge1"] == pytest.approx((2 / 3 + 1) / 2)


def test_padding_is_left_out_of_every_metric() -> None:
    from fedpeft.attacks import AttackResult

    truth = torch.tensor([[5, 6, 7, 2], [8, 9, 0, 0]])  # second row: two padding positions
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert sequence_metrics([[5, 6, 7, 2], [8, 9]], truth, mask)["exact"] == 1.0
    assert sequence_metrics([[5, 6, 7, 2], [8, 9, 0, 0]], truth, mask)["exact"] == 0.5  # padding is not text
    assert sequence_metrics([[5, 6, 7, 2], [8, 9, 0, 0]], truth)["exact"] == 1.0  # no mask: rows as given
    assert positional_accuracy([(0, 8), (1, 9)], truth, mask) == pytest.approx(2 / 6)
    row = summarize(AttackResult("x", bag=[2, 5, 6, 7, 8, 9], sequences=[[8, 9]]), truth, mask)
    assert row["token_f1"] == 1.0 and row["exact"] == 0.5


def test_ranking_chance_baseline_matches_random_scores() -> None:
    truth = list(range(10))
    vals = [ranking_score(torch.rand(200, generator=torch.Generator().manual_seed(s)), truth)["top_true"]
            for s in range(300)]
    assert sum(vals) / len(vals) == pytest.approx(10 / 200, abs=0.01)


def test_exposure() -> None:
    assert exposure(1, 1024) == pytest.approx(10.0)
    assert exposure(1024, 1024) == pytest.approx(0.0)
    assert exposure(32, 1024) == pytest.approx(5.0)
    assert math.isfinite(exposure(0, 1))
