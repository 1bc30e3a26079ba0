"""Dropout-aware span attacks on independent victims (plain transformers + peft, ``plain_victims.py``): a
later-round client trains one SGD step on one sentence with dropout 0.1 on, the server knows the rate.

The exact subspace test finds nothing there (a dropped-out input is not in the span of the clean
candidates); the statistical test and the joint choice of the sentence read it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from plain_victims import dropout_victim, wordpiece

from fedpeft.attacks import run_attack
from fedpeft.attacks.metrics import summarize, token_prf
from fedpeft.attacks.observation import config_dropout
from fedpeft.attacks.span import dropout_cut, joint_sequence
from fedpeft.attacks.span_decode import last_tokens, next_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def _unaware(obs):  # the same observation without the dropout rate: the exact test
    return dataclasses.replace(obs, dropout=0.0, _cache={}, _shared=set())


@pytest.mark.parametrize("seed", [0, 1])
def test_span_reads_an_encoder_sentence_through_dropout(seed: int) -> None:
    obs, ids = dropout_victim("bert", seed)
    assert config_dropout(obs.model) == pytest.approx(obs.dropout) and obs.dropout == pytest.approx(0.1)
    result = run_attack("span", obs)
    assert result.sequences == ids.tolist()
    assert token_prf(run_attack("span", _unaware(obs)).bag, ids[0].tolist())["f1"] < 0.2


@pytest.mark.parametrize("seed", [0, 1])
def test_span_decode_reads_a_causal_sentence_through_dropout(seed: int) -> None:
    obs, ids = dropout_victim("gpt2", seed)
    result = run_attack("span_decode", obs)
    assert result.sequences == ids.tolist()  # the invisible last token from the label channel
    assert summarize(result, ids)["token_f1"] >= 0.9  # every visible token in the bag
    assert token_prf(run_attack("span", _unaware(obs)).bag, ids[0].tolist())["f1"] < 0.2


@pytest.mark.parametrize(("sentence", "cut", "seed"), [
    ("The old man walked slowly to the station every morning.", 0, 0),  # last token [SEP]
    ("My brother bought a new bicycle last week.", 2, 3),  # cut before ". [SEP]": last token "week"
])
def test_the_label_channel_reads_the_last_token_through_dropout_on_a_large_vocabulary(sentence: str, cut: int,
                                                                                      seed: int) -> None:
    """GPT-2 over the 30,522-token WordPiece vocabulary with dropout 0.1, the prefix known: matched away from
    the directions the server's own dropout masks move the known part along, the last token is read; matched
    on the eval-mode gradient alone it ranked 561st / 87th on these two victims and is missed."""
    ids = torch.tensor([wordpiece()(sentence)["input_ids"]])
    obs, ids = dropout_victim("gpt2", seed, r=16, vocab=len(wordpiece()), ids=ids[:, :ids.shape[1] - cut])
    prefix, last = ids[0, :-1].tolist(), int(ids[0, -1])
    rng = torch.get_rng_state()
    assert last_tokens(obs, [prefix]) == [last]
    assert torch.equal(torch.get_rng_state(), rng) and not obs.working_model().training
    assert last_tokens(obs, [prefix], noise_samples=0) != [last]


@pytest.mark.parametrize(("sentence", "seed"), [("My brother bought a new bicycle last week.", 3),
                                              ("She found a small black cat under the table.", 1)])
def test_the_label_channel_reads_the_token_before_the_last_into_a_short_list(sentence: str, seed: int) -> None:
    """The token one place before the last (".", before [SEP]), the prefix known and the last label's term left
    as interference: in the label channel's short list of 8 through dropout; matched on the eval-mode gradient
    alone it ranked 18th / below 50th on these two victims and is missed."""
    ids = torch.tensor([wordpiece()(sentence)["input_ids"]])
    obs, ids = dropout_victim("gpt2", seed, r=16, vocab=len(wordpiece()), ids=ids)
    text = ids[0].tolist()
    assert text[-2] in next_tokens(obs, text[:-2], len(text) - 1, 8)
    assert text[-2] not in next_tokens(obs, text[:-2], len(text) - 1, 8, noise_samples=0)
    with pytest.raises(ValueError, match="labels"):  # fewer labels than the prefix itself has
        next_tokens(obs, text[:-2], len(text) - 4, 8)


def test_dropout_cut_holds_the_members_of_a_dropped_out_span() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, generator=g, dtype=torch.float64)
    kept = (torch.rand(x.shape, generator=g) > 0.1).double()
    basis = torch.linalg.qr((x * kept).T)[0].T  # the span of the dropped-out inputs
    other = torch.randn(8, 256, generator=g, dtype=torch.float64)
    res = lambda v: (v - (v @ basis.T) @ basis).norm(dim=-1) / v.norm(dim=-1)  # noqa: E731
    assert bool((res(x) <= dropout_cut(x, 0.1)).all()) and bool((res(other) > dropout_cut(other, 0.1)).all())
    assert not bool((res(x) <= dropout_cut(x, 0.001)).any())  # the rate matters: no member passes at 0.1 %


def test_joint_choice_untangles_neighbouring_positions() -> None:
    """Position 1's best residual is position 2's token (a smooth position embedding): chosen position by
    position the sentence is wrong, chosen jointly it is the one whose inputs span the observation."""
    g = torch.Generator().manual_seed(1)
    cands = torch.randn(3, 6, 32, generator=g, dtype=torch.float64)  # positions × vocab × d
    truth = [0, 1, 2]
    basis = torch.linalg.qr(torch.stack([cands[p, v] for p, v in enumerate(truth)]).T)[0].T
    res = torch.full((3, 6), 0.9, dtype=torch.float64)
    for p, v in enumerate(truth):
        res[p, v] = 0.3
    res[1, 2] = 0.2  # token 2 looks best at position 1 too
    assert res.argmin(-1).tolist() != truth
    assert joint_sequence(res, cands, basis, [0, 1, 2]) == truth
