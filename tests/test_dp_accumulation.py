"""Gradient accumulation under local DP-SGD (``privacy.physical_batch_size``): a Poisson-sampled batch run as
physical chunks gives the same update and the same epsilon as the whole batch at once, and no forward pass sees
more examples than the chunk size."""

from __future__ import annotations

import pytest
import torch
from test_privacy_dpsgd import VOCAB, lora_bert  # the tiny LoRA BERT (3 labels, no dropout)

from fedpeft.config import PrivacySection, TrainSection
from fedpeft.errors import PrivacyError
from fedpeft.privacy import LocalDP
from fedpeft.training import train_local

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
T, N = 8, 48


def examples() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (N, T), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(T, dtype=torch.long), "labels": torch.tensor(i % 3)}
            for i in range(N)]


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def run(physical: int, batch_size: int = 16, steps: int = 3) -> tuple[torch.Tensor, LocalDP, list[int]]:
    """Three seeded DP-SGD steps (noise on, clipping active); the trained parameters, the DP state and the
    batch size of every forward pass."""
    model = lora_bert()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    ldp = LocalDP(PrivacySection(mode="local", noise_multiplier=0.8, max_grad_norm=0.05,
                                 physical_batch_size=physical),
                  dataset_size=N, batch_size=batch_size, total_steps=steps, seed=7)
    train = TrainSection(local_steps=steps, batch_size=batch_size, lr=0.05, optimizer="sgd", precision="fp32")
    train_local(model, examples(), collate, train, torch.device("cpu"), seed=0, steps=steps, dp=ldp)
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]), ldp, seen


def test_split_batches_give_the_same_update_and_epsilon() -> None:
    whole, ldp_whole, seen_whole = run(physical=0)
    before = torch.cat([p.detach().flatten() for p in lora_bert().parameters() if p.requires_grad])
    assert max(seen_whole) > 5  # Poisson batches of about 16: the split below has work to do
    for physical in (3, 5):
        split, ldp_split, seen = run(physical=physical)
        assert max(seen) <= physical  # no forward pass holds more than a physical chunk
        assert sum(seen) == sum(seen_whole)  # the same examples, all of them
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
        assert ldp_split.steps == ldp_whole.steps == 3  # one accounted step per logical batch, not per chunk
        assert ldp_split.epsilon() == ldp_whole.epsilon()
    assert float((whole - before).norm()) > 1e-3  # the runs trained (the comparison is not of two no-ops)


def test_physical_batches_splits_every_tensor_alike() -> None:
    ldp = LocalDP(PrivacySection(mode="local", physical_batch_size=4), dataset_size=20, batch_size=10, total_steps=1)
    chunks = ldp.physical_batches(collate(examples()[:10]))
    assert [c["input_ids"].shape[0] for c in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat([c["labels"] for c in chunks]), collate(examples()[:10])["labels"])
    with pytest.raises(PrivacyError, match="examples"):
        ldp.physical_batches({"input_ids": torch.zeros(3, 2), "labels": torch.zeros(2)})
