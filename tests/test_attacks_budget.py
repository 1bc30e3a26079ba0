"""``span`` beyond the rank budget, on an independent victim (plain transformers + peft,
``plain_victims.padded_victim``): a tiny LLaMA with LoRA r = 8 on q/k/v (24 first-block rows), later round,
one SGD step on 16 padded WordPiece sentences (31 distinct tokens). The rows do not span every input, so no
residual gap separates the batch from the vocabulary: the gap cut accepts nothing, the outlier cut reads
most of the bag. The same client observed in several rounds on the same batch (the global adapter moved
in between) stacks rows past the batch's inputs: the noise floor (:func:`noise_floor_rank`) keeps the
stacked rows' rounding noise out of the basis, and the exact test reads the bag of 4 English sentences.
"""

from __future__ import annotations

import pytest
import torch
from plain_victims import padded_victim

from fedpeft.attacks import run_attack
from fedpeft.attacks.lora_io import noise_floor_rank, outlier_cut
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


def test_rounds_of_one_client_read_a_batch_beyond_one_rounds_budget() -> None:
    """B = 4 English sentences (about 45 distinct tokens), r = 8: one round's 24 rows rank the bag (outlier cut
    about 0.6); three rounds' 72 rows hold every visible input, plus rows of float32 rounding noise, which
    the basis took before the noise floor (old code: every candidate near the span, bag F1 0)."""
    truth: list[int] = []
    for rounds, want in ((1, 0.0), (3, 0.95)):
        obs, ids, mask = padded_victim(4, 0, arch="llama", r=8, text="english", seq_len=24, dtype=torch.float32,
                                       sgd_lr=0.01, rounds=rounds)
        truth = [t for row in unpadded(ids, mask) for t in row]
        visible = {t for row in unpadded(ids, mask) for t in row[:-1]}
        result = run_attack("span", obs)
        f1 = token_prf(result.bag, truth)["f1"]
        assert result.extra["rows"] == 24 * rounds and len(obs.history) == rounds - 1
        if rounds == 1:
            assert len(visible) > 24 and f1 == want  # beyond one round's budget: no gap
        else:
            assert f1 >= want and len(visible) - 2 <= result.extra["rank"] <= len(visible)


def test_noise_floor_rank_cuts_only_a_clear_floor() -> None:
    smooth = torch.logspace(0, -3, 24, dtype=torch.float64)  # beyond the budget: every row kept
    floored = torch.cat([smooth, torch.full((10,), 1e-6, dtype=torch.float64)])
    assert noise_floor_rank(smooth) == 24 and noise_floor_rank(floored) == 24
    assert noise_floor_rank(torch.tensor([1.0, 0.5, 0.04, 0.03], dtype=torch.float64)) == 4  # a drop above 1e-3
