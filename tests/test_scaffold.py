"""SCAFFOLD (federation.strategy = "scaffold"): the control-variate maths, the gradient correction, what travels
and its bytes, composition with a codec, refusals, resume."""

from __future__ import annotations

import pytest
import torch

from fedpeft import report, scaffold
from fedpeft.clients.app import _corrector
from fedpeft.compression import Layout
from fedpeft.config import FederationSection
from fedpeft.errors import ConfigError
from fedpeft.server.aggregators import make_aggregator
from fedpeft.server.replies import ClientReply, RoundReplies
from fedpeft.simulation import runner

from conftest import interrupt_and_resume

SCAFFOLD = {"federation.strategy": "scaffold", "federation.rounds": 2, "train.optimizer": "sgd", "train.lr": 0.3}


def test_control_delta_is_option_ii():
    """Δc_i = c_i+ - c_i with c_i+ = c_i - c + (x - y_i) / (K lr)."""
    gen = torch.Generator().manual_seed(0)
    c, ci, x, y = (torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(4))
    dc = scaffold.control_delta({"w": c}, {"w": y - x}, steps=5, lr=0.1)["w"]
    assert torch.allclose(ci + dc, ci - c + (x - y) / (5 * 0.1), rtol=0, atol=1e-12)


def test_the_server_steps_like_fedavg_and_moves_c_by_the_mean_control_delta_over_the_population():
    gen = torch.Generator().manual_seed(1)
    state = {"a": torch.randn(2, 3, generator=gen, dtype=torch.float64), "b": torch.randn(4, generator=gen,
                                                                                         dtype=torch.float64)}
    agg = make_aggregator(FederationSection(strategy="scaffold"))
    agg.population = 10
    deltas = [{k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in state.items()}
              for _ in range(3)]
    controls = [{k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in state.items()}
                for _ in range(3)]
    replies = RoundReplies(clients=[ClientReply(i, float(i + 1), {}, scaffold.join(d, c))
                                    for i, (d, c) in enumerate(zip(deltas, controls))])
    new = agg.aggregate(replies, state)
    for k in state:
        mean = sum((i + 1) / 6 * d[k] for i, d in enumerate(deltas))
        assert torch.allclose(new[k], state[k] + mean, atol=1e-6)  # weighted_mean rounds to float32
        assert torch.allclose(agg.control(state)[k].double(), sum(c[k] for c in controls) / 10, atol=1e-6)


def test_the_gradient_hook_adds_c_minus_ci():
    layer = torch.nn.Linear(3, 2)
    layer.weight.grad = torch.ones(2, 3)
    layer.bias.grad = torch.zeros(2)
    c = {"weight": torch.full((2, 3), 0.5), "bias": torch.full((2,), 2.0)}
    ci = {"weight": torch.full((2, 3), 0.25), "bias": torch.full((2,), 3.0)}
    _corrector(layer, c, ci)()
    assert torch.equal(layer.weight.grad, torch.full((2, 3), 1.25))
    assert torch.equal(layer.bias.grad, torch.full((2,), -1.0))


def test_the_uplink_layout_carries_a_control_variate_per_tensor():
    adapter = Layout.from_state({"x.lora_A": torch.empty(2, 5), "head": torch.empty(3)})
    up = scaffold.uplink_layout(adapter)
    assert up.total == 2 * adapter.total and set(up.names) == {"x.lora_A", "head", "scaffold/x.lora_A", "scaffold/head"}


def test_scaffold_starts_as_fedavg_then_corrects_and_counts_the_control_variate_bytes(tiny_cfg):
    rows = report.read_metrics(runner.simulate(tiny_cfg(**SCAFFOLD)))
    fedavg = report.read_metrics(runner.simulate(tiny_cfg(**{**SCAFFOLD, "federation.strategy": "fedavg"})))
    # round 1: c = c_i = 0, so the local steps are FedAvg's; round 2: c - c_i != 0 changes them
    assert rows[0]["train_loss"] == fedavg[0]["train_loss"] and rows[0]["eval_loss"] == fedavg[0]["eval_loss"]
    assert rows[1]["train_loss"] != fedavg[1]["train_loss"]
    elements = rows[0]["bytes_up_fp32"] // 4 // rows[0]["replies"]  # adapter elements per client
    for r, f in zip(rows, fedavg):  # the control variate: dense fp32 down, in the same payload up
        assert r["bytes_down"] - f["bytes_down"] >= r["sampled"] * 4 * elements
        assert r["bytes_up"] - f["bytes_up"] >= r["replies"] * 4 * elements


def test_scaffold_composes_with_a_lossy_uplink_codec(tiny_cfg):
    rows = report.read_metrics(runner.simulate(tiny_cfg(**{**SCAFFOLD, "compression.uplink": "int8"})))
    assert all(r["replies"] == 3 and r["dropped"] == 0 for r in rows)
    assert rows[0]["bytes_up"] < rows[0]["bytes_up_fp32"]  # 2x the elements at 1 byte each, not 4


@pytest.mark.parametrize(("extra", "needle"), [
    ({"privacy.mode": "client"}, "privacy.mode = 'client'"),
    ({"privacy.secure_aggregation": "secaggplus"}, "shows the server only their sum"),
    ({"federation.lora_aggregation": "exact"}, "federation.lora_aggregation = 'naive'"),
    ({"compression.uplink": "topk:0.1,select=fisher"}, "select=magnitude"),
    ({"train.optimizer": "adamw"}, "train.optimizer = 'sgd'"),
])
def test_scaffold_refuses_what_it_cannot_compose_with(tiny_cfg, extra, needle):
    with pytest.raises(ConfigError, match="federation.strategy = 'scaffold'") as e:
        tiny_cfg(**{**SCAFFOLD, **extra})
    assert needle in str(e.value)


def test_scaffold_resumes_exactly(tiny_cfg, monkeypatch):
    """c is aggregator state in the checkpoint, each c_i node state: round 3 after a resume is identical."""
    extra = {**SCAFFOLD, "federation.rounds": 3, "federation.clients_per_round": 2}
    keys = ("train_loss", "eval_loss", "bytes_up", "bytes_down")
    full = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    resumed = report.read_metrics(interrupt_and_resume(tiny_cfg(**extra), 3, monkeypatch))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]


def test_a_control_delta_that_is_not_its_own_update_s_is_left_out(tiny_cfg, monkeypatch):
    """Found by an outside review: with 2 clients (no relative norm screen) one client sent an honest update and a
    control delta of norm 9,000; the server's c grew to 8,400 and steered the other client's every step. Over a
    lossless uplink each control delta must be option II's -c - update / (K lr) for the update it came with."""
    import inspect

    honest = scaffold.control_delta

    def hostile(c, delta, steps, lr):
        dc = honest(c, delta, steps, lr)
        if inspect.currentframe().f_back.f_locals.get("partition_id") == 0:  # the ClientApp of partition 0
            n = sum(v.numel() for v in dc.values())
            return {k: 9000 / n**0.5 * torch.ones_like(v) for k, v in dc.items()}
        return dc

    clean = report.read_metrics(runner.simulate(tiny_cfg(**SCAFFOLD, **{"data.num_clients": 2})))
    assert all("excluded_nodes" not in r for r in clean)  # honest replies pass the check
    monkeypatch.setattr(scaffold, "control_delta", hostile)
    rows = report.read_metrics(runner.simulate(tiny_cfg(**SCAFFOLD, **{"data.num_clients": 2})))
    for r in rows:
        assert list(r["excluded_nodes"]) == ["1000"] and "SCAFFOLD control delta" in r["excluded_nodes"]["1000"]
        assert r["replies"] == 2  # a valid reply, left out by the aggregator
    assert rows[-1]["eval_loss"] < 2 * clean[-1]["eval_loss"]
