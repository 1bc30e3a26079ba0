"""Where the span attacks cut, on independent victims (plain transformers + peft, ``plain_victims``).

The bag: a float32 SGD step at a small learning rate (or a pretrained model whose least-weighted tokens carry
little gradient) buries the tail of the batch's inputs in rounding noise, inside the rank budget: no residual
gap, and the outlier cut can take a handful of tokens. ``cut="spectrum"`` counts the stacked rows' singular
values above their noise bulk and takes that many best-ranked inputs.

The sequences: a client that keeps the padding in the loss (labels = ids, the attention mask alone hides the
padding) makes the first pad of each sentence visible and labels the sentence's last token with it;
``span_decode`` ends a sentence at a pad and trims trailing pads. A zero pad embedding (``padding_idx``) hides
the pad from the first block, so the decoder tries the public pad id at every position, masks it as the client
does, and the label channel counts a pad-ended sentence as known to the end.
"""

from __future__ import annotations

import pytest
import torch
from plain_victims import padded_victim

from fedpeft.attacks import run_attack
from fedpeft.attacks.lora_io import count_cut, noise_floor_rank, signal_rank
from fedpeft.attacks.metrics import summarize, token_prf, unpadded
from fedpeft.attacks.span_decode import padding_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def test_signal_rank_counts_a_tail_that_runs_into_white_noise() -> None:
    g = torch.Generator().manual_seed(0)
    n_inputs, rows, d = 40, 96, 128
    x = torch.nn.functional.normalize(torch.randn(n_inputs, d, generator=g, dtype=torch.float64), dim=1)
    weights = torch.randn(rows, n_inputs, generator=g, dtype=torch.float64) * torch.logspace(0, -3, n_inputs)
    s = torch.linalg.svdvals(weights @ x + 1e-4 * torch.randn(rows, d, generator=g, dtype=torch.float64))
    assert noise_floor_rank(s) == rows  # no clear drop: the old rule keeps every row
    assert abs(signal_rank(s, d) - n_inputs) <= 4  # measured: 43
    assert signal_rank(s[:5], 4) == 5  # rows >= d: no noise bulk to find
    assert count_cut(torch.tensor([0.3, 0.1, 0.2, 0.9]), 2) == pytest.approx((0.2 * 0.3) ** 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectrum_cut_reads_a_bag_whose_tail_sinks_into_rounding_noise(seed: int) -> None:
    """8 random sentences, 54-70 distinct visible tokens, 96 first-block rows (r = 32 on q/k/v), a float32
    SGD step at lr 1e-4: inside the budget, but no gap; measured, the outlier cut takes 7 tokens on seed 2."""
    obs, ids, mask = padded_victim(8, seed, arch="llama", r=32, hidden=128, seq_len=16, dtype=torch.float32,
                                   sgd_lr=1e-4)
    truth = [t for row in unpadded(ids, mask) for t in row[:-1]]  # the last token is invisible to the span
    assert len(set(truth)) < 96
    assert run_attack("span", obs).bag == []
    result = run_attack("span", obs, cut="spectrum")
    prf = token_prf(result.bag, truth)
    assert prf["f1"] >= 0.95 and prf["precision"] >= 0.95
    assert result.extra["signal_rank"] < result.extra["rows"]


@pytest.mark.parametrize("arch, batch_sizes", [("llama", (1, 2, 4)), ("gpt2", (1,))])
def test_span_decode_trims_padding_kept_in_the_loss(arch: str, batch_sizes: tuple[int, ...]) -> None:
    """Before: every padded sentence came back with a trailing pad (exact 0-0.5 per batch)."""
    rows = []
    for batch_size in batch_sizes:
        for seed in range(3):
            obs, ids, mask = padded_victim(batch_size, seed, arch=arch, pad_in_loss=True)
            result = run_attack("span_decode", obs)
            rows.append(summarize(result, ids, mask)["exact"])
    assert sum(rows) / len(rows) >= 0.9


def test_padding_mask_masks_the_trailing_pads_after_the_sentence() -> None:
    ids = torch.tensor([[5, 6, 0, 0], [5, 6, 7, 8], [0, 0, 0, 0]])
    assert padding_mask(ids, 0, 2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert padding_mask(ids, 0, 0).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]  # pad = EOS: kept once
    assert padding_mask(ids, None, 2).tolist() == torch.ones_like(ids).tolist()


@pytest.mark.parametrize("batch_size", [2, 4])
def test_span_decode_reads_padded_word_batches_whose_pad_embedding_is_zero(batch_size: int) -> None:
    """LLaMA, WordPiece sentences ([CLS] the ... [SEP], pad id 0 with a zero embedding), a float32 SGD step,
    the padding kept in the loss. Measured before: exact 0.50 / 0.50 / 1.00 at B = 2 and 0.25 / 0.75 / 1.00
    at B = 4 (the pad never a candidate; with it, 0.75 / 0.75 / 1.00 at B = 4 until the label channel counted
    pad-ended sentences as known)."""
    for seed in range(3):
        obs, ids, mask = padded_victim(batch_size, seed, arch="llama", dtype=torch.float32, text="words",
                                       sgd_lr=0.01, pad_in_loss=True)
        assert summarize(run_attack("span_decode", obs), ids, mask)["exact"] == 1.0
