"""``span`` on FFA-LoRA updates (``federation.lora_aggregation = "freeze_a"``): ``A`` stays at its public seeded
init and only ``B`` trains and travels. dL/dB = Σ_t δ_t (A x_t)ᵀ, so the rows of each first-block module's dL/dB
lie in span{A x_t} ⊂ R^r, and the server, which knows ``A``, tests every candidate A·x against it (exact while
the batch's distinct first-block inputs are fewer than r). Before, the attacks found no LoRA module with both
factors trainable and reported "not applicable", so the audit's pass was no evidence.

Victims: an independent one (plain transformers + peft, ``A`` frozen by hand) and the updates of real
freeze_a runs captured by ``fedpeft audit --capture``, each beside the same setting with both factors trained.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from plain_victims import EOS, padded_batch, tiny_lm

from fedpeft.attacks import NotApplicable, Observation, run_attack
from fedpeft.attacks.metrics import unpadded

pytestmark = pytest.mark.usefixtures("one_thread")


def victim(frozen_a: bool, batch_size: int, r: int = 16, seed: int = 0) -> tuple[Observation, list[int]]:
    """Tiny LLaMA (d = 64, vocab 300) with LoRA r on q/k/v in a later round (B ≠ 0), one SGD gradient on
    ``batch_size`` padded random sentences of <= 12 tokens; ``frozen_a``: A at its init, only B trainable."""
    lora = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(tiny_lm("llama", 300, 64, seed), lora)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                if frozen_a and ".lora_A." in n:
                    p.requires_grad_(False)
                else:
                    p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ids, mask = padded_batch(batch_size, 12, seed, 300)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    grads = torch.autograd.grad(loss, list(params.values()))
    obs = Observation(model=model, global_state={n: p.detach().clone() for n, p in params.items()},
                      update={n: gr.detach().clone() for n, gr in zip(params, grads)}, kind="gradient",
                      batch_size=batch_size, num_examples=batch_size, seq_len=12, task="causal_lm")
    return obs, [t for row in unpadded(ids, mask) for t in row]


def test_span_reads_a_b_only_update_when_a_is_frozen() -> None:
    """One sentence (<= 12 distinct tokens < r = 16): the B channel names the bag exactly, as the A channel does
    on the same sentence with both factors trained; the A channel itself is refused by name. Before, both
    channels raised NotApplicable (no first-block module with a trainable A)."""
    for seed in range(3):
        obs, truth = victim(True, 1, seed=seed)
        assert not any(".lora_A." in n for n in obs.update)
        frozen = run_attack("span", obs)
        both = run_attack("span", victim(False, 1, seed=seed)[0])
        assert frozen.extra["channel"] == "B" and frozen.extra["modules"]
        # every token but the final EOS, whose position has no next token: no loss, a zero gradient in every module
        assert frozen.bag == both.bag == sorted(set(truth) - {EOS}), (seed, frozen.bag, sorted(set(truth)))
        with pytest.raises(NotApplicable, match="frozen"):
            run_attack("span", obs, channel="A")


def test_span_on_a_frozen_a_beyond_r_distinct_tokens_accepts_nothing() -> None:
    """Four sentences (> r = 16 distinct tokens): each module's A·x_t span all of R^r and the B channel has no
    exact test left; the span attack applies, ranks and accepts nothing (its bag F1 is 0, measured)."""
    obs, truth = victim(True, 4)
    assert len(set(truth)) > 16
    result = run_attack("span", obs)
    assert result.extra["channel"] == "B" and result.bag == []
