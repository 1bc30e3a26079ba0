"""SCAFFOLD (federation.strategy = "scaffold"): the control-variate maths, the gradient correction, what travels
and its bytes, composition with a codec, refusals, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft import report, scaffold
from fedpeft.clients.app import SCAFFOLD_STATE, _corrector
from fedpeft.compression import Layout
from fedpeft.config import FederationSection, TrainSection
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
    """The server derives each reply's option-II control delta from the update it decoded, with K from the
    reply's num-examples (4 local epochs of batch 8: 20 examples -> 10 steps, 3 -> 2)."""
    gen = torch.Generator().manual_seed(1)
    state = {"a": torch.randn(2, 3, generator=gen), "b": torch.randn(4, generator=gen)}
    agg = make_aggregator(FederationSection(strategy="scaffold"))
    agg.population, agg.train = 10, TrainSection(optimizer="sgd", lr=0.5, local_steps=0, local_epochs=4,
                                                 batch_size=8)
    agg.state = {f"control/{k}": torch.randn(v.shape, generator=gen) for k, v in state.items()}  # c after a round
    c = {k: agg.state[f"control/{k}"].clone() for k in state}
    deltas = [{k: torch.randn(v.shape, generator=gen) for k, v in state.items()} for _ in range(3)]
    examples = [20, 3, 20]
    replies = RoundReplies(clients=[ClientReply(i, float(i + 1), {"num-examples": n}, d)
                                    for i, (d, n) in enumerate(zip(deltas, examples))])
    new = agg.aggregate(replies, state)
    for k in state:
        mean = sum((i + 1) / 6 * d[k] for i, d in enumerate(deltas))
        assert torch.allclose(new[k], state[k] + mean, atol=1e-6)
        dcs = [-c[k] - d[k] / (steps * 0.5) for d, steps in zip(deltas, (10, 2, 10))]
        assert torch.allclose(agg.control(state)[k], c[k] + sum(dcs) / 10, atol=1e-5)


def test_the_gradient_hook_adds_c_minus_ci():
    layer = torch.nn.Linear(3, 2)
    layer.weight.grad = torch.ones(2, 3)
    layer.bias.grad = torch.zeros(2)
    c = {"weight": torch.full((2, 3), 0.5), "bias": torch.full((2,), 2.0)}
    ci = {"weight": torch.full((2, 3), 0.25), "bias": torch.full((2,), 3.0)}
    _corrector(layer, c, ci)()
    assert torch.equal(layer.weight.grad, torch.full((2, 3), 1.25))
    assert torch.equal(layer.bias.grad, torch.full((2,), -1.0))


def test_scaffold_starts_as_fedavg_then_corrects_and_counts_the_control_variate_bytes(tiny_cfg):
    """The control variate travels down (dense fp32); up, the payload is the update alone, FedAvg's bytes."""
    rows = report.read_metrics(runner.simulate(tiny_cfg(**SCAFFOLD)))
    fedavg = report.read_metrics(runner.simulate(tiny_cfg(**{**SCAFFOLD, "federation.strategy": "fedavg"})))
    # round 1: c = c_i = 0, so the local steps are FedAvg's; round 2: c - c_i != 0 changes them
    assert rows[0]["train_loss"] == fedavg[0]["train_loss"] and rows[0]["eval_loss"] == fedavg[0]["eval_loss"]
    assert rows[1]["train_loss"] != fedavg[1]["train_loss"]
    elements = rows[0]["bytes_up_fp32"] // 4 // rows[0]["replies"]  # adapter elements per client
    for r, f in zip(rows, fedavg):
        assert r["bytes_down"] - f["bytes_down"] >= r["sampled"] * 4 * elements
        assert r["bytes_up"] == f["bytes_up"]


@pytest.mark.parametrize("uplink", ["int8", "topk:0.3,select=fisher"])
def test_with_a_lossy_uplink_the_server_c_stays_the_mean_of_the_clients_c_i(tiny_cfg, uplink):
    """Lossy codecs with error feedback (a Fisher-ranked one too): each client derives its control delta from the
    update as sent, the server from the update as decoded, so c = (1/N) sum_i c_i holds exactly (before, the
    control deltas travelled through the codec themselves and the server's c drifted from the clients')."""
    from safetensors.torch import load_file

    run_dir = runner.simulate(tiny_cfg(**{**SCAFFOLD, "compression.uplink": uplink, "federation.rounds": 3}))
    rows = report.read_metrics(run_dir)
    assert all(r["replies"] == 3 and r["dropped"] == 0 for r in rows)
    assert rows[0]["bytes_up"] < rows[0]["bytes_up_fp32"] / 2  # the update alone, compressed
    server = {k[len("control/"):]: v for k, v in load_file(str(run_dir / "checkpoint" / "optimizer.safetensors"))
              .items() if k.startswith("control/")}
    nodes = []
    for path in sorted((run_dir / "checkpoint" / "nodes").glob("*.npz")):
        with np.load(path) as npz:
            nodes.append({k.split("/", 1)[1]: torch.from_numpy(npz[k]) for k in npz.files
                          if k.startswith(SCAFFOLD_STATE + "/")})
    assert len(nodes) == 3 and server and set(nodes[0]) == set(server)
    scale = max(float(c.abs().max()) for c in server.values())
    assert scale > 0
    for k, c in server.items():
        mean = sum(n[k].double() for n in nodes) / 3
        assert torch.allclose(c.double(), mean, rtol=1e-5, atol=1e-6 * scale), k


@pytest.mark.parametrize(("extra", "needle"), [
    ({"privacy.mode": "client"}, "privacy.mode = 'client'"),
    ({"privacy.secure_aggregation": "secaggplus"}, "shows the server only their sum"),
    ({"federation.lora_aggregation": "exact"}, "federation.lora_aggregation = 'naive'"),
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


def test_a_reply_that_carries_a_control_variate_is_dropped_and_the_round_goes_on(tiny_cfg, monkeypatch):
    """Found by an outside review when control deltas travelled: with 2 clients one client sent an honest update and
    a control delta of norm 9,000, and the server's c steered the other client's every step. The uplink now holds
    the update alone, and c is derived from the updates: the old hostile payload is malformed, that reply is
    dropped, the other client's is applied and moves c."""
    import inspect

    from fedpeft.clients import app as client_app

    real = client_app.update.encode_update

    def hostile(delta, codec, layout, **kw):
        if inspect.currentframe().f_back.f_locals.get("partition_id") == 0:  # the ClientApp of partition 0
            delta = {**delta, **{"scaffold/" + k: 9000 * torch.ones_like(v) for k, v in delta.items()}}
            layout = Layout.from_state(delta)
        return real(delta, codec, layout, **kw)

    clean = report.read_metrics(runner.simulate(tiny_cfg(**SCAFFOLD, **{"data.num_clients": 2})))
    monkeypatch.setattr(client_app.update, "encode_update", hostile)
    rows = report.read_metrics(runner.simulate(tiny_cfg(**SCAFFOLD, **{"data.num_clients": 2})))
    for r in rows:
        assert r["replies"] == 1 and list(r["dropped_nodes"]) == ["1000"], r
    assert rows[-1]["eval_loss"] < 2 * clean[-1]["eval_loss"]
