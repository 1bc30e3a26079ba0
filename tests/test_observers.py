"""Observers see every update exactly as the server decoded and aggregated it (the audit's capture path)."""

import pytest
import torch
from safetensors.torch import load_file

from fedpeft import report
from fedpeft.errors import ConfigError
from fedpeft.runtime import get_runtime
from fedpeft.simulation import runner


@pytest.mark.parametrize("downlink", ["none", "compeft:0.3"])
def test_observed_updates_are_what_the_server_aggregates(tiny_cfg, downlink):
    cfg = tiny_cfg(**{"federation.rounds": 1, "compression.uplink": "compeft:0.2", "compression.downlink": downlink})
    seen = []
    run_dir = runner.simulate(cfg, observers=[seen.append])
    assert len(seen) == report.read_metrics(run_dir)[0]["replies"] == 3
    assert sorted(u.partition_id for u in seen) == [0, 1, 2]
    start = get_runtime(cfg).initial_adapter()
    for u in seen:  # round 1: everyone trained from the initial adapter (coded exactly on a lossy downlink too)
        assert u.round == 1 and all(torch.equal(u.start_state[k], start[k]) for k in start)
    weights = torch.tensor([u.metrics["num-examples"] for u in seen], dtype=torch.float64)
    final = load_file(str(run_dir / "checkpoint" / "global.safetensors"))
    for k in start:  # FedAvg at server lr 1: global = start + weighted mean of exactly these deltas
        mean = sum(w * u.delta[k].double() for w, u in zip(weights, seen)) / weights.sum()
        torch.testing.assert_close(final[k].double(), start[k].double() + mean, rtol=0, atol=1e-6)


def test_observers_need_the_inprocess_engine(tiny_cfg):
    with pytest.raises(ConfigError, match="inprocess"):
        runner.simulate(tiny_cfg(), engine="ray", observers=[print])
