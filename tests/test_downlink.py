"""Per-client downlink residuals: rare clients get coded deltas, the server knows what each client holds."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedpeft import report
from fedpeft.clients.app import BROADCAST_STATE
from fedpeft.errors import ConfigError
from fedpeft.simulation import runner

from conftest import interrupt_and_resume

RARE = {"federation.rounds": 6, "data.num_clients": 6, "federation.clients_per_round": 2,
        "compression.downlink": "compeft:0.2", "compression.uplink": "compeft:0.2"}


def test_per_client_residuals_send_deltas_to_returning_clients(tiny_cfg):
    shared_dir = runner.simulate(tiny_cfg(**RARE))
    per_dir = runner.simulate(tiny_cfg(**RARE, **{"compression.downlink_residual": "per_client"}))
    shared, per = report.read_metrics(shared_dir), report.read_metrics(per_dir)
    assert all(r["replies"] == 2 and r["dropped"] == 0 for r in per)  # every base round matched the client's
    assert [r["sampled"] for r in per] == [r["sampled"] for r in shared]
    # returning clients missed rounds: shared mode resends them the full fp32 state, per-client a sparse delta
    assert sum(r["bytes_down"] for r in per) < 0.8 * sum(r["bytes_down"] for r in shared)
    assert per[-1]["eval_loss"] < per[0]["eval_loss"] * 1.2

    # the server's record of each client's state is exactly what that client reconstructed
    held = load_file(str(per_dir / "checkpoint" / "downlink_states.safetensors"))
    nodes = {key.split("/", 1)[0] for key in held}
    assert len(nodes) >= 2
    for node in nodes:
        with np.load(per_dir / "checkpoint" / "nodes" / f"{node}.npz", allow_pickle=False) as client:
            for key, value in held.items():
                if key.startswith(f"{node}/"):
                    name = key.split("/", 1)[1]
                    assert torch.equal(value, torch.from_numpy(client[f"{BROADCAST_STATE}/{name}"])), key


def test_per_client_residuals_resume_exactly(tiny_cfg, monkeypatch):
    extra = {**RARE, "federation.rounds": 4, "compression.downlink_residual": "per_client"}
    keys = ("train_loss", "eval_loss", "bytes_up", "bytes_down")
    full = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    resumed = report.read_metrics(interrupt_and_resume(tiny_cfg(**extra), 3, monkeypatch))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]


def test_per_client_residuals_need_a_lossy_downlink(tiny_cfg):
    with pytest.raises(ConfigError, match="downlink_residual = 'per_client' needs a lossy"):
        tiny_cfg(**{"compression.downlink_residual": "per_client"})
