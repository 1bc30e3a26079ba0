"""Rank-aware weighting of mixed LoRA ranks (federation.lora_rank_weighting): the per-component weights, and what
zeropad, svd and svd_delta form with them, against numbers computed by hand; refusals; a real run resumes exactly."""

from __future__ import annotations

import pytest
import torch

from fedpeft import lora, report
from fedpeft.config import FederationSection
from fedpeft.errors import ConfigError
from fedpeft.server.aggregators import make_aggregator
from fedpeft.server.replies import ClientReply, RoundReplies
from fedpeft.simulation import runner

from conftest import interrupt_and_resume

A, B = "m.q.lora_A.default.weight", "m.q.lora_B.default.weight"
#: one 1 x 1 module at server rank 2: A = [1; 1] (2 x 1), B = [1 1] (1 x 2), so B·A = 2
GLOBAL = {A: torch.ones(2, 1, dtype=torch.float64), B: torch.ones(1, 2, dtype=torch.float64)}


def _client(node: int, weight: float, rank: int, step: float) -> ClientReply:
    """A rank-``rank`` client whose every factor entry moved by ``step``."""
    return ClientReply(node, weight, {}, {A: torch.full((rank, 1), step, dtype=torch.float64),
                                          B: torch.full((1, rank), step, dtype=torch.float64)})


#: client 0: rank 1, weight 1, steps +1 (its factors: a = b = [2]); client 1: rank 2, weight 1, steps +2 ([3, 3])
TWO = [_client(0, 1.0, 1, 1.0), _client(1, 1.0, 2, 2.0)]


def _aggregate(mode: str, weighting: str, clients: list[ClientReply]) -> tuple[dict, object]:
    agg = make_aggregator(FederationSection(lora_aggregation=mode, lora_rank_weighting=weighting))
    return agg.aggregate(RoundReplies(clients=clients), GLOBAL), agg


def test_component_weights_by_hand():
    w = lora.component_weights([1.0, 3.0], [1, 2], 3, "examples")
    assert w.tolist() == [[0.25, 0.25, 0.25], [0.75, 0.75, 0.75]]
    w = lora.component_weights([1.0, 3.0], [1, 2], 3, "rank")  # 1·1 : 3·2
    assert torch.allclose(w, torch.tensor([[1 / 7] * 3, [6 / 7] * 3], dtype=torch.float64), rtol=0, atol=1e-15)
    w = lora.component_weights([1.0, 3.0], [1, 2], 3, "slice")  # component 1: client 1 only; 2: nobody
    assert w.tolist() == [[0.25, 0.0, 0.0], [0.75, 1.0, 0.0]]
    with pytest.raises(ValueError, match="unknown rank weighting 'rows'"):
        lora.component_weights([1.0], [1], 1, "rows")


@pytest.mark.parametrize(("weighting", "a"), [
    ("examples", [2.5, 1.5]),  # row 1: (-1 + 2) / 2, the rank-1 client's zero padding pulls it down
    ("rank", [8 / 3, 2.0]),  # weights 1/3, 2/3: row 0 1/3 + 4/3, row 1 -1/3 + 4/3
    ("slice", [2.5, 3.0]),  # row 1 is the rank-2 client's alone
])
def test_zeropad_factors_by_hand(weighting, a):
    new, _ = _aggregate("zeropad", weighting, TWO)
    want = torch.tensor(a, dtype=torch.float64)
    assert torch.allclose(new[A].view(-1), want, rtol=0, atol=1e-12)
    assert torch.allclose(new[B].view(-1), want, rtol=0, atol=1e-12)  # B moved like A here


@pytest.mark.parametrize(("mode", "weighting", "product"), [
    # component 0: (2·2 + 3·3) / 2 = 6.5 under examples and slice; component 1: (0 + 9) / 2 = 4.5 or 9 (slice)
    ("svd", "examples", 11.0),
    ("svd", "slice", 15.5),
    ("svd", "rank", 1 / 3 * 4 + 2 / 3 * 18),  # weights 1/3, 2/3: 4/3 + 2/3 (9 + 9)
    # svd_delta: ΔW = BA + Σ_k Σ_i w_ik (b_ik a_ik - b_k a_k) with the clients' own components only:
    # examples: 2 + 0.5 (4 - 1) + 0.5 (9 - 1 + 9 - 1) = 11.5; slice: 2 + (6.5 - 1) + (9 - 1) = 15.5
    ("svd_delta", "examples", 11.5),
    ("svd_delta", "slice", 15.5),
    ("svd_delta", "rank", 2 + 1 / 3 * 3 + 2 / 3 * 16),
])
def test_product_modes_by_hand(mode, weighting, product):
    new, agg = _aggregate(mode, weighting, TWO)
    assert float((new[B].double() @ new[A].double()).item()) == pytest.approx(product, rel=1e-6)  # float32 factors
    if mode == "svd_delta":
        assert float(agg.state["dense/m.q"].item()) == pytest.approx(product, rel=1e-12)


@pytest.mark.parametrize("mode", ["svd", "svd_delta", "zeropad"])
def test_slice_keeps_a_component_no_client_holds(mode):
    """Only a rank-1 client replies: under slice the global's component 1 (b_1 a_1 = 1) is kept, 2·2 + 1 = 5;
    examples averages in the client's zero padding and erases it (4) except under svd_delta."""
    only = [_client(0, 1.0, 1, 1.0)]
    sliced, _ = _aggregate(mode, "slice", only)
    plain, _ = _aggregate(mode, "examples", only)
    assert float((sliced[B].double() @ sliced[A].double()).item()) == pytest.approx(5.0, rel=1e-6)
    assert float((plain[B].double() @ plain[A].double()).item()) == pytest.approx(
        5.0 if mode == "svd_delta" else 4.0, rel=1e-6)
    if mode == "zeropad":
        assert sliced[A].view(-1).tolist() == [2.0, 1.0] and plain[A].view(-1).tolist() == [2.0, 0.0]


def test_slice_on_random_mixed_ranks_is_the_per_component_mean_by_a_loop():
    """Ranks 2, 4, 8, 16 at server rank 16, float64: svd at full rank reproduces Σ_k Σ_{i: r_i > k} w_i b_ik a_ikᵀ
    / Σ_{i: r_i > k} w_i, computed with a loop over components."""
    gen = torch.Generator().manual_seed(3)
    r, out, inp = 16, 16, 20
    state = {A: torch.randn(r, inp, generator=gen, dtype=torch.float64),
             B: torch.randn(out, r, generator=gen, dtype=torch.float64)}
    clients = [ClientReply(i, float(i + 1), {}, {A: torch.randn(ri, inp, generator=gen, dtype=torch.float64),
                                                 B: torch.randn(out, ri, generator=gen, dtype=torch.float64)})
               for i, ri in enumerate([2, 4, 8, 16])]
    agg = make_aggregator(FederationSection(lora_aggregation="svd", lora_rank_weighting="slice"))
    new = agg.aggregate(RoundReplies(clients=clients), state)
    want = torch.zeros(out, inp, dtype=torch.float64)
    for k in range(r):
        holders = [c for c in clients if c.delta[A].shape[0] > k]
        total = sum(c.weight for c in holders)
        for c in holders:
            want += (c.weight / total) * torch.outer(state[B][:, k] + c.delta[B][:, k], state[A][k] + c.delta[A][k])
    assert float((new[B].double() @ new[A].double() - want).norm() / want.norm()) < 1e-6
    assert agg.metrics["lora_svd_error"] < 1e-10


def test_rank_weighting_needs_mixed_ranks_and_a_known_name(tiny_cfg):
    with pytest.raises(ConfigError, match="federation.lora_rank_weighting = 'slice' weighs clients of different"):
        tiny_cfg(**{"federation.lora_aggregation": "svd", "federation.lora_rank_weighting": "slice"})
    with pytest.raises(ConfigError, match="lora_rank_weighting"):
        tiny_cfg(**{"federation.lora_rank_weighting": "rows"})


def test_a_sliced_mixed_rank_run_differs_from_examples_and_resumes_exactly(tiny_cfg, monkeypatch):
    extra = {"adapter.r": 16, "adapter.client_ranks": [2, 4, 8, 16], "data.num_clients": 4, "federation.rounds": 2,
             "federation.lora_aggregation": "svd_delta", "federation.lora_rank_weighting": "slice"}
    keys = ("train_loss", "eval_loss", "lora_agg_error", "bytes_up", "bytes_down")
    full = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    plain = report.read_metrics(runner.simulate(tiny_cfg(**{**extra, "federation.lora_rank_weighting": "examples"})))
    assert full[-1]["eval_loss"] != plain[-1]["eval_loss"]
    resumed = report.read_metrics(interrupt_and_resume(tiny_cfg(**extra), 2, monkeypatch))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]
