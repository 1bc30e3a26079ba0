"""``sign_span`` on updates of five AdamW steps, on independent victims (plain transformers + peft,
``plain_victims.adamw_victim``): a tiny random LLaMA over the packaged MiniLM WordPiece vocabulary (30,522
tokens), LoRA r = 8 on q/k/v, one English sentence of 16 tokens, the client's local − global after five
torch AdamW steps. Adam's per-coordinate normalisation leaves the signs of a span vector: the exact span
test accepts nothing there and the subspace ranking reads part of the sentence; the logistic pursuit on
the signs reads most of it.
"""

from __future__ import annotations

import pytest
import torch
from plain_victims import adamw_victim, wordpiece

from fedpeft.attacks import run_attack
from fedpeft.attacks.metrics import token_prf
from fedpeft.attacks.sign_span import logistic_fit, pursuit, soft_sign_fit

pytestmark = pytest.mark.usefixtures("one_thread")
SENTENCE = "She found a small wooden box hidden under the stairs of her grandmother's house."


def test_pursuit_reads_the_inputs_behind_sign_rows() -> None:
    """Signs of random combinations of 5 of 400 candidate inputs (d = 48): the pursuit picks exactly those 5
    and then stops (all but the ``floor`` fraction of the signs explained)."""
    g = torch.Generator().manual_seed(0)
    cands = torch.randn(1, 400, 48, generator=g, dtype=torch.float64)
    truth = [3, 50, 120, 260, 399]
    rows = torch.randn(12, 5, generator=g, dtype=torch.float64) @ cands[0, truth]
    picks, errors, first = pursuit(torch.sign(rows), cands, per_position=400, max_picks=10)
    assert sorted(v for _, v in picks) == truth and errors[-1] <= 0.01 < errors[-2] and len(picks) == 5
    x = cands[0, truth] / cands[0, truth].norm(dim=-1, keepdim=True)
    margins, _, loss = logistic_fit(x, torch.sign(rows))
    wrong = cands[0, [3, 50, 120, 260, 398]] / cands[0, [3, 50, 120, 260, 398]].norm(dim=-1, keepdim=True)
    assert float((torch.sign(margins) == torch.sign(rows)).double().mean()) >= 0.99
    assert logistic_fit(wrong, torch.sign(rows))[2] > 2 * loss  # one wrong input: a much worse fit
    assert first.shape == (1, 400)


@pytest.mark.parametrize("later", [False, True])
def test_sign_span_reads_a_sentence_through_five_adamw_steps(later: bool) -> None:
    tok = wordpiece()
    ids = torch.tensor([tok(SENTENCE)["input_ids"][:16]])
    obs = adamw_victim("llama", 1, ids, later=later)
    truth = ids[0].tolist()
    new = token_prf(run_attack("sign_span", obs).bag, truth)["f1"]
    span = token_prf(run_attack("span", obs).bag, truth)["f1"]
    subspace = token_prf(run_attack("subspace_opt", obs).bag, truth)["f1"]
    assert new >= 0.75, new
    assert span < 0.1 and subspace < 0.55, (span, subspace)


def test_soft_sign_fit_reads_margins_the_signs_do_not_show() -> None:
    """Soft signs tanh(X u) of 5 inputs (d = 48): the least-squares fit on the true inputs reproduces them,
    one wrong input fits much worse, and the magnitude pursuit picks exactly the 5."""
    g = torch.Generator().manual_seed(1)
    cands = torch.randn(1, 400, 48, generator=g, dtype=torch.float64)
    truth = [7, 60, 111, 250, 333]
    x = cands[0, truth] / cands[0, truth].norm(dim=-1, keepdim=True)
    y = torch.tanh(torch.randn(12, 5, generator=g, dtype=torch.float64) @ x)
    margins, _, loss = soft_sign_fit(x, y)
    assert float((torch.tanh(margins) - y).abs().max()) < 5e-3  # the loss is then mostly the ridge term
    wrong = cands[0, [7, 60, 111, 250, 334]] / cands[0, [7, 60, 111, 250, 334]].norm(dim=-1, keepdim=True)
    assert soft_sign_fit(wrong, y)[2] > 100 * loss
    picks, _, _ = pursuit(y, cands, per_position=400, max_picks=10, fit="magnitude")
    assert sorted(v for _, v in picks) == truth


def test_magnitudes_read_more_of_a_later_round_sentence_than_the_signs() -> None:
    """Later round, five AdamW steps: the soft-sign fit (default) reads more of the sentence than the
    logistic pursuit on the signs alone (the attack as first measured)."""
    tok = wordpiece()
    ids = torch.tensor([tok(SENTENCE)["input_ids"][:16]])
    obs = adamw_victim("llama", 1, ids, later=True)
    truth = ids[0].tolist()
    new = token_prf(run_attack("sign_span", obs).bag, truth)["f1"]
    old = token_prf(run_attack("sign_span", obs, fit="sign").bag, truth)["f1"]
    assert new >= 0.9 and new >= old + 0.03, (new, old)
