"""Server aggregation: weighted mean and the FedOpt family on plain tensors."""

import pytest
import torch

from fedpeft import config
from fedpeft.server.aggregators import AGGREGATORS as OPTIMIZERS
from fedpeft.server.aggregators import make_aggregator as make_server_optimizer
from fedpeft.server.aggregators import weighted_mean


def test_weighted_mean_weights_by_examples():
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    out = weighted_mean([a, b], [3, 1])
    assert torch.allclose(out["w"], torch.tensor([0.75, 0.25]))


def test_fedavg_with_server_lr_one_applies_the_mean():
    cfg = config.load(None).federation
    opt = make_server_optimizer(cfg)
    g = {"w": torch.ones(3)}
    assert torch.equal(opt.apply(g, {"w": torch.full((3,), 0.5)})["w"], torch.full((3,), 1.5))


def _step(name, deltas, **kw):
    cfg = config.load(None, [f"federation.strategy={name}"] + [f"federation.{k}={v}" for k, v in kw.items()]).federation
    opt = make_server_optimizer(cfg)
    g = {"w": torch.zeros(2)}
    for d in deltas:
        g = opt.apply(g, {"w": torch.tensor(d)})
    return g["w"], opt


def test_fedadam_matches_reddi_et_al():
    # m1 = 0.1*d; v1 = 0.99*tau^2 + 0.01*d^2; x = lr * m1 / (sqrt(v1) + tau)
    d, tau, lr = torch.tensor([0.2, -0.4]), 1e-3, 0.1
    out, _ = _step("fedadam", [[0.2, -0.4]], server_lr=lr, tau=tau)
    m = 0.1 * d
    v = 0.99 * tau**2 + 0.01 * d * d
    assert torch.allclose(out, lr * m / (v.sqrt() + tau), atol=1e-6)


def test_fedavgm_accumulates_momentum():
    out, _ = _step("fedavgm", [[1.0, 1.0], [1.0, 1.0]], server_lr=1.0, server_momentum=0.5)
    assert torch.allclose(out, torch.tensor([2.5, 2.5]))  # 1 + (0.5*1 + 1)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_strategy_moves_towards_the_delta_and_restores_state(name):
    deltas = [[0.1, -0.2], [0.1, -0.2], [0.1, -0.2]]
    out, opt = _step(name, deltas, server_lr=0.5)
    assert out[0] > 0 and out[1] < 0
    state, t = opt.state_dict()
    twin = make_server_optimizer(opt.cfg)
    twin.load_state_dict({k: v.clone() for k, v in state.items()}, t)
    g = {"w": out.clone()}
    assert torch.equal(opt.apply(g, {"w": torch.tensor([0.3, 0.3])})["w"],
                       twin.apply(g, {"w": torch.tensor([0.3, 0.3])})["w"])
