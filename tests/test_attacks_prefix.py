"""The per-head span check on prefix-tuning updates (``span`` on a prefix adapter, see
:mod:`fedpeft.attacks.prefix_span`): the derivation checked numerically, then what is exact.

Tiny 2-layer models, hidden 128, 4 heads (d_h = 32), 16-token byte-level sequences of random words
(GPT-2 / LLaMA: causal LM, BERT: classifier), global prefix in a "later round" state.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedpeft.attacks import Observation, run_attack
from fedpeft.attacks.lora_io import residuals, row_basis
from fedpeft.attacks.metrics import summarize
from fedpeft.attacks.prefix_span import key_blocks, layer0_queries, prefix_layout
from fedpeft.audit.victim import observe, private_batch, victim_config
from fedpeft.models import build_peft_model, load_base_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is faster


def prefix_victim(model: str = "tiny-gpt2", virtual_tokens: int = 8, batch_size: int = 1, seq_len: int = 16,
                  seed: int = 0, float64: bool = False, **round_kw: object) -> tuple[Observation, torch.Tensor]:
    """A prefix-tuning victim with ``virtual_tokens`` prefix positions (GPT-2: causal LM, BERT: classifier)."""
    task = "classification" if model == "tiny-bert" else "causal_lm"
    cfg = victim_config(model, "prefix", task=task)
    adapter = dataclasses.replace(cfg.adapter, num_virtual_tokens=virtual_tokens)
    peft_model = build_peft_model(load_base_model(cfg.model, num_labels=4, seed=seed % 3), adapter, task, seed=seed)
    peft_model = peft_model.to(torch.float64 if float64 else torch.float32)
    ids = private_batch(batch_size, seq_len, seed)
    labels = torch.randint(4, (batch_size,), generator=torch.Generator().manual_seed(seed)) \
        if task == "classification" else None
    return observe(peft_model, ids, labels, task, seed=seed, **round_kw), ids  # type: ignore[arg-type]


def _span(model: str, seeds: range, **kw: object) -> list[dict[str, float]]:
    rows = []
    for seed in seeds:
        obs, ids = prefix_victim(model, seed=seed, **kw)  # type: ignore[arg-type]
        rows.append(summarize(run_attack("span", obs), ids))
    return rows


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r.get(key, 0.0) for r in rows) / len(rows)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-bert"])
def test_key_gradient_rows_lie_in_the_span_of_the_true_queries_and_value_rows_do_not(model: str) -> None:
    """The derivation: rows of every head's layer-0 prefix-key gradient ∈ span{q_t^h}, also with more
    tokens (16) than prefix rows (8); the value block has no such structure."""
    obs, ids = prefix_victim(model, batch_size=1, float64=True)
    lay = prefix_layout(obs.working_model())
    assert lay is not None and lay.heads == 4 and lay.head_dim == 32
    q = layer0_queries(obs.working_model(), lay, ids)[0]  # seq × heads × d_h
    d = lay.heads * lay.head_dim
    for h, rows in enumerate(key_blocks(obs, lay)):
        basis, _ = row_basis(q[:, h], ids.shape[1])
        assert float(residuals(rows, basis).max()) < 1e-8
        values = obs.update[lay.param].to(torch.float64)[:, d + h * lay.head_dim: d + (h + 1) * lay.head_dim]
        assert float(residuals(values, basis).mean()) > 0.05


@pytest.mark.parametrize("model, batch_size, seq_len", [("tiny-gpt2", 1, 16), ("tiny-gpt2", 2, 16),
                                                        ("tiny-bert", 1, 16), ("tiny-bert", 2, 12),
                                                        ("tiny-llama", 1, 16)])
def test_prefix_span_is_exact_within_the_prefix_and_head_budget(model: str, batch_size: int, seq_len: int) -> None:
    """32 prefix rows per head and fewer visible (token, position) inputs than d_h = 32 (GPT-2: 15 per
    sequence, the last is invisible; BERT: all of them): the exact bag."""
    rows = _span(model, range(2), virtual_tokens=32, batch_size=batch_size, seq_len=seq_len)
    assert _mean(rows, "token_f1") >= 0.95
    if batch_size == 1:  # learned positions / RoPE: (token, position) pairs; a causal LM's last token is invisible
        assert _mean(rows, "positional_accuracy") >= (0.99 if model == "tiny-bert" else 0.9)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-bert"])
def test_prefix_span_over_budget_is_a_ranking_not_a_bag(model: str) -> None:
    """8 prefix rows < 15-16 visible inputs: no exact bag, but the per-head residual still ranks."""
    rows = _span(model, range(2), virtual_tokens=8, batch_size=1)
    assert _mean(rows, "token_f1") < 0.1
    assert _mean(rows, "top_true") >= 10 * _mean(rows, "chance_top_true")


def test_stacking_rounds_adds_prefix_rows_and_makes_the_check_exact() -> None:
    """Layer-0 queries do not depend on the prefix, so each stacked round adds m rows of one span;
    a multi-step delta sums its steps' rows instead (rank still ≤ m) and stays a ranking."""
    one = _span("tiny-gpt2", range(2), virtual_tokens=8, batch_size=1)
    two_rounds = _span("tiny-gpt2", range(2), virtual_tokens=8, batch_size=1, rounds=2)
    two_steps = _span("tiny-gpt2", range(2), virtual_tokens=8, batch_size=1, steps=2, lr=0.5)
    assert _mean(one, "token_f1") < 0.1 and _mean(two_steps, "token_f1") < 0.1
    assert _mean(two_rounds, "token_f1") >= 0.95


def test_prefix_span_says_not_applicable_without_prefix_keys() -> None:
    from fedpeft.attacks import NotApplicable
    from fedpeft.attacks.prefix_span import run_prefix
    from fedpeft.audit.victim import make_victim

    obs, _ = make_victim(adapter="prompt", batch_size=1, seed=0)
    with pytest.raises(NotApplicable):
        run_prefix(obs)
