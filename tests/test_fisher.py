"""The diagonal Fisher that local training reports, and Fisher-ranked compression in a federated run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedpeft import models
from fedpeft.compression import make_codec
from fedpeft.config import PrivacySection
from fedpeft.privacy import LocalDP
from fedpeft.runtime import get_runtime
from fedpeft.simulation import runner
from fedpeft.training import client_seed, train_local

CPU = torch.device("cpu")


@pytest.mark.parametrize("dp", [False, True])
def test_fisher_is_the_squared_gradient_the_step_used(tiny_cfg, dp: bool) -> None:
    """One plain SGD step moves each element by -lr * g, so the reported Fisher must equal (delta / lr)^2;
    under DP-SGD g is the clipped, noised gradient (the Fisher is post-processing of the private output)."""
    cfg = tiny_cfg()
    rt = get_runtime(cfg)
    train = dataclasses.replace(cfg.train, optimizer="sgd", lr=0.5, local_steps=1, max_grad_norm=0.0)
    dataset = rt.client_dataset(0)
    start = rt.initial_adapter()
    models.set_adapter_state(rt.model, start)
    ldp = LocalDP(PrivacySection(mode="local", noise_multiplier=1.0, max_grad_norm=0.1), dataset_size=len(dataset),
                  batch_size=train.batch_size, total_steps=1, seed=3) if dp else None
    result = train_local(rt.model, dataset, rt.collate, train, CPU, seed=3, dp=ldp, fisher=True)
    delta = models.subtract(models.adapter_state(rt.model), start)
    assert result.fisher is not None and result.fisher.keys() == delta.keys()
    for name, d in delta.items():
        torch.testing.assert_close(result.fisher[name], (d / train.lr) ** 2, rtol=1e-4, atol=1e-12)
    assert sum(float(f.sum()) for f in result.fisher.values()) > 0
    assert train_local(rt.model, dataset, rt.collate, train, CPU, seed=3, fisher=False).fisher is None


def test_clients_rank_their_compressed_update_by_their_fisher(tiny_cfg) -> None:
    """What the server decodes equals a replay of the client's round encoded with its own Fisher, and
    differs from magnitude ranking (so the Fisher really reached the codec)."""
    spec = "compeft:0.1,select=fisher"
    cfg = tiny_cfg(**{"federation.rounds": 1, "compression.uplink": spec})
    seen = []
    runner.simulate(cfg, observers=[seen.append])
    assert len(seen) == 3
    rt = get_runtime(cfg)
    ranked, by_size = make_codec(spec), make_codec("compeft:0.1,select=magnitude")
    for u in seen:
        models.set_adapter_state(rt.model, u.start_state)
        result = train_local(rt.model, rt.client_dataset(u.partition_id), rt.collate, cfg.train, CPU,
                             seed=client_seed(cfg.run.seed, 1, u.partition_id), fisher=True)
        delta = models.subtract(models.adapter_state(rt.model), u.start_state)
        replay = ranked.decode(ranked.encode(delta, rt.layout, fisher=result.fisher), rt.layout)
        assert all(torch.equal(replay[k], u.delta[k]) for k in delta)
        plain = by_size.decode(by_size.encode(delta, rt.layout), rt.layout)
        assert not all(torch.equal((plain[k] != 0), (u.delta[k] != 0)) for k in delta)
