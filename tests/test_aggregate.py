"""Server aggregation: weighted mean and the FedOpt family on plain tensors."""

import pytest
import torch

from fedpeft import config
from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.server.aggregators import AGGREGATORS as OPTIMIZERS
from fedpeft.server.aggregators import make_aggregator, weighted_mean
from fedpeft.server.replies import ClientReply, RoundReplies


def test_weighted_mean_weights_by_examples():
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    out = weighted_mean([a, b], [3, 1])
    assert torch.allclose(out["w"], torch.tensor([0.75, 0.25]))


def test_fedavg_with_server_lr_one_applies_the_mean():
    cfg = config.load(None).federation
    opt = make_server_optimizer(cfg)
    g = {"w": torch.ones(3)}
    assert torch.equal(opt.apply(g, {"w": torch.full((3,), 0.5)})["w"], torch.full((3,), 1.5))


def make_server_optimizer(fed):
    """The aggregator of ``fed``; SCAFFOLD's gets the clients' train section, as the server loop gives it."""
    agg = make_aggregator(fed)
    if fed.strategy == "scaffold":
        agg.train = config.load(None, ["train.optimizer=sgd"]).train
    return agg


def _federation(name, **kw):
    """The federation section for strategy ``name`` (8 clients: enough for krum's n >= 2f + 3)."""
    sets = [f"federation.strategy={name}", "data.num_clients=8"]
    if name == "scaffold":  # its control variates assume plain SGD at one learning rate
        sets += ["train.optimizer=sgd", "train.schedule=constant", "train.warmup_steps=0"]
    return config.load(None, sets + [f"federation.{k}={v}" for k, v in kw.items()]).federation


def _step(name, deltas, **kw):
    cfg = _federation(name, **kw)
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


def test_the_registry_lists_every_strategy_and_config_refuses_unknown_ones():
    assert OPTIMIZERS.names() == ["cosine_filter", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedprox", "fedyogi",
                                  "krum", "median", "norm_bounded", "scaffold", "sign_majority", "trimmed_mean"]
    with pytest.raises(ConfigError) as e:
        config.load(None, ["federation.strategy=fedmedian"])
    assert "federation.strategy = 'fedmedian'" in str(e.value)
    assert all(repr(name) in str(e.value) for name in OPTIMIZERS.names())


def _replies(*deltas, weights=None):
    weights = weights or [1.0] * len(deltas)
    return RoundReplies(clients=[ClientReply(i, w, {"num-examples": w, "train-loss": 0.0}, {"w": torch.tensor(d)})
                                 for i, (d, w) in enumerate(zip(deltas, weights))])


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_an_aggregator_resumed_from_its_state_dict_continues_identically(name):
    cfg = _federation(name, server_lr=0.5)
    agg = make_server_optimizer(cfg)
    g = {"w": torch.zeros(2)}
    for r in ([0.1, -0.2], [0.3, 0.1]):
        g = agg.aggregate(_replies(r, [0.0, 0.4], weights=[3.0, 1.0]), g)
    state, t = agg.state_dict()
    twin = make_server_optimizer(cfg)
    twin.load_state_dict({k: v.clone() for k, v in state.items()}, t)
    a, b = {"w": g["w"].clone()}, {"w": g["w"].clone()}
    for r in ([-0.2, 0.2], [0.05, 0.0]):
        a = agg.aggregate(_replies(r, [0.1, 0.1]), a)
        b = twin.aggregate(_replies(r, [0.1, 0.1]), b)
        assert torch.equal(a["w"], b["w"])
    assert agg.state_dict()[1] == twin.state_dict()[1] == t + 2


def test_mean_aggregators_step_from_the_example_weighted_or_secure_mean():
    agg = make_server_optimizer(config.load(None).federation)
    assert not agg.needs_individual_updates
    g = {"w": torch.zeros(2)}
    out = agg.aggregate(_replies([1.0, 0.0], [0.0, 1.0], weights=[3.0, 1.0]), g)
    assert torch.allclose(out["w"], torch.tensor([0.75, 0.25]))
    secure = RoundReplies(clients=_replies([0.0, 0.0]).clients, secure_mean={"w": torch.tensor([0.5, 0.5])})
    assert torch.equal(agg.aggregate(secure, g)["w"], torch.tensor([0.5, 0.5]))
    with pytest.raises(FedPeftError, match="only the sum"):
        secure.deltas  # noqa: B018
