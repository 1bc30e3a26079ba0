"""The client update pipeline (:mod:`fedpeft.update`): what it sends, what it remembers, and that the
ClientApp sends exactly what a replay through it (the audit grid's path) produces."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from fedpeft import models
from fedpeft.compression import ErrorFeedback, Layout, make_codec
from fedpeft.privacy import clip_to_norm, clip_update, global_norm
from fedpeft.runtime import get_runtime
from fedpeft.simulation import runner
from fedpeft.training import client_seed, train_local
from fedpeft.update import encode_update, error_feedback

CPU = torch.device("cpu")


def _delta(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.randn(4, 16, generator=g), "a.lora_B.weight": torch.randn(16, 4, generator=g)}


@pytest.mark.parametrize("clip", [None, 0.5])
def test_sent_is_the_decoded_payload_clipped_under_client_dp(clip: float | None) -> None:
    delta = _delta(0)
    codec, layout = make_codec("compeft:0.2"), Layout.from_state(delta)
    enc = encode_update(delta, codec, layout, rng=np.random.default_rng(1), clip=clip)
    decoded = codec.decode(enc.payload, layout)
    expected = decoded if clip is None else clip_to_norm(decoded, clip)
    assert all(torch.equal(enc.sent[k], expected[k]) for k in delta)
    assert not all(torch.equal(enc.sent[k], delta[k]) for k in delta)  # lossy
    if clip is None:
        assert enc.update_norm is None and enc.clip_indicator is None
    else:
        assert enc.update_norm == pytest.approx(global_norm(delta)) and enc.clip_indicator == 0.0
        assert global_norm(enc.sent) <= clip * (1 + 1e-6)
    again = encode_update(delta, codec, layout, rng=np.random.default_rng(1), clip=clip)
    assert all(np.array_equal(a, b) for a, b in zip(again.payload.arrays().values(), enc.payload.arrays().values()))


@pytest.mark.parametrize("clip", [None, 0.5])
def test_error_feedback_keeps_compensated_minus_sent(clip: float | None) -> None:
    codec = make_codec("compeft:0.2")
    ef = error_feedback(codec, True)
    assert isinstance(ef, ErrorFeedback) and error_feedback(codec, False) is None
    assert error_feedback(make_codec("none"), True) is None  # lossless: nothing to remember
    first, second = _delta(0), _delta(1)
    layout = Layout.from_state(first)
    enc = encode_update(first, codec, layout, rng=np.random.default_rng(1), ef=ef, clip=clip)
    compensated = first if clip is None else clip_update(first, clip)[0]
    assert all(torch.equal(ef.residual[k], compensated[k] - enc.sent[k]) for k in first)
    residual = ef.residual
    enc = encode_update(second, codec, layout, rng=np.random.default_rng(2), ef=ef, clip=clip)
    compensated = {k: second[k] + residual[k] for k in second}
    compensated = compensated if clip is None else clip_update(compensated, clip)[0]
    assert all(torch.equal(ef.residual[k], compensated[k] - enc.sent[k]) for k in second)


def test_clientapp_sends_what_the_pipeline_replay_produces(tiny_cfg) -> None:
    """Two rounds with error feedback and client-level DP: every update the server decoded equals a
    replay of that client's rounds through :func:`encode_update` (the audit grid's path)."""
    spec = "compeft:0.1"
    cfg = tiny_cfg(**{"federation.rounds": 2, "compression.uplink": spec, "privacy.mode": "client",
                      "privacy.server_noise_multiplier": 0.5, "privacy.clip_norm": 0.05, "privacy.delta": 1e-3,
                      "train.local_steps": 2, "privacy.release_client_metrics": True})
    seen = []
    runner.simulate(cfg, observers=[seen.append])
    assert len(seen) >= 3
    rt = get_runtime(cfg)
    codec = make_codec(spec)
    residuals: dict[int, ErrorFeedback | None] = defaultdict(lambda: error_feedback(codec, True))
    for u in sorted(seen, key=lambda u: u.round):
        seed = client_seed(cfg.run.seed, u.round, u.partition_id)
        models.set_adapter_state(rt.model, u.start_state)
        result = train_local(rt.model, rt.client_dataset(u.partition_id), rt.collate, cfg.train, CPU, seed=seed)
        delta = models.subtract(models.adapter_state(rt.model), u.start_state)
        enc = encode_update(delta, codec, rt.layout, rng=np.random.default_rng(seed), fisher=result.fisher,
                            ef=residuals[u.partition_id], clip=cfg.privacy.clip_norm)
        decoded = codec.decode(enc.payload, rt.layout)
        assert all(torch.equal(decoded[k], u.delta[k]) for k in delta)
        assert u.metrics["update-norm"] == enc.update_norm and u.metrics["clip-indicator"] == enc.clip_indicator
    assert any(u.round == 2 for u in seen)  # the residual of round 1 was replayed too
