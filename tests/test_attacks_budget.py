"""``span`` beyond the rank budget, on an independent victim (plain transformers + peft,
``plain_victims.padded_victim``): a tiny LLaMA with LoRA r = 8 on q/k/v (24 first-block rows), later round,
one SGD step on 16 padded WordPiece sentences (31 distinct tokens). The rows do not span every input, so no
residual gap separates the batch from the vocabulary: the gap cut accepts nothing, the outlier cut reads
most of the bag.
"""

from __future__ import annotations

import pytest
import torch
from plain_victims import padded_victim

from fedpeft.attacks import run_attack
from fedpeft.attacks.lora_io import outlier_cut
from fedpeft.attacks.metrics import token_prf, unpadded

pytestmark = pytest.mark.usefixtures("one_thread")


def test_outlier_cut_reads_a_batch_beyond_the_rank_budget() -> None:
    obs, ids, mask = padded_victim(16, 0, arch="llama", r=8, text="words", seq_len=12, dtype=torch.float32,
                                   sgd_lr=0.01)
    truth = [t for row in unpadded(ids, mask) for t in row]
    assert len(set(truth)) > 24  # beyond the budget
    gap = run_attack("span", obs)
    outlier = run_attack("span", obs, cut="outlier")
    assert gap.bag == [] and token_prf(outlier.bag, truth)["f1"] >= 0.85
    with pytest.raises(ValueError, match="cut"):
        run_attack("span", obs, cut="median")


def test_outlier_cut_sits_below_a_gaussian_bulk() -> None:
    values = torch.randn(30000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.05 + 0.9
    cut = outlier_cut(values)
    assert cut == pytest.approx(0.9 - 5 * 0.05, abs=0.01) and int((values < cut).sum()) <= 2
