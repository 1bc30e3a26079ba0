"""Always-on sanity: one hostile client among three sends well-formed but hostile replies (real serialized
payloads); the round goes on, the global adapter and the checkpoint stay finite and bounded, and the
run keeps the honest clients' progress."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message

from fedpeft import protocol, report
from fedpeft.clients.app import app as client_app
from fedpeft.compression import Layout, Payload, make_codec
from fedpeft.errors import FedPeftError, PayloadError
from fedpeft.runtime import get_runtime
from fedpeft.server import checkpoint
from fedpeft.simulation import runner

HOSTILE = 1001  # the in-process node id of partition 1
BOUND = 1e4  # the default sanity.max_global_value and sanity.decode_bound
Forge = Callable[[Message, Message], Message]  # (honest reply, request) -> hostile reply


def _hostile_run(cfg, monkeypatch, forge: Forge) -> Path:
    """Run ``cfg`` with node HOSTILE's replies replaced by ``forge``; returns the run directory."""
    original = type(client_app).__call__

    def call(self, message, context):
        reply = original(self, message, context)
        return forge(reply, message) if message.metadata.dst_node_id == HOSTILE else reply

    monkeypatch.setattr(type(client_app), "__call__", call)
    return runner.simulate(cfg)


def _payload(reply: Message) -> Payload:
    return protocol.record_payload(reply.content[protocol.UPDATE])


def _metrics(reply: Message) -> dict[str, float]:
    return dict(reply.content[protocol.METRICS])


def _reply(request: Message, payload: Payload, metrics: dict[str, float]) -> Message:
    return Message(protocol.train_reply(payload, metrics), reply_to=request)


def _edit(payload: Payload, *, values: np.ndarray | None = None, scales: np.ndarray | None = None) -> Payload:
    """``payload`` with its values section and/or scales replaced (header and positions kept)."""
    arrays = payload.arrays()
    if values is not None:
        arrays["buffer"] = np.concatenate([payload.positions, values.view(np.uint8)])
    if scales is not None:
        arrays["scales"] = scales.astype(np.float32)
    return Payload.from_arrays(arrays)


def _assert_safe(run_dir: Path, rounds: int, progress: bool = True) -> list[dict]:
    """Every round recorded; checkpoint finite; global adapter within the bound; honest progress."""
    rows = report.read_metrics(run_dir)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    ckpt = checkpoint.load(run_dir / "checkpoint")
    for group, tensors in ckpt.tensors.items():
        for name, t in tensors.items():
            assert bool(torch.isfinite(t).all()), f"{group}/{name} is not finite"
    assert max(float(t.abs().max()) for t in ckpt.tensors["global"].values()) <= BOUND
    if progress:
        assert rows[-1]["eval_accuracy"] > 0.55  # 3 balanced topics: chance is 1/3
    return rows


# ---- hostile payloads, end to end --------------------------------------------------------------------


def test_bit_flipped_fp32_values_are_dropped(tiny_cfg, monkeypatch, caplog, one_thread):
    rng = np.random.default_rng(0)

    def flip(reply, request):
        payload = _payload(reply)
        values = payload.values.copy().view("<f4")
        small = np.flatnonzero((values != 0) & (np.abs(values) < 1))  # exponent < 127: stays finite
        values.view("<u4")[rng.choice(small, 8, replace=False)] |= np.uint32(1 << 30)  # exponent + 128
        assert np.isfinite(values).all() and np.abs(values).max() > 1e30
        return _reply(request, _edit(payload, values=values), _metrics(reply))

    caplog.set_level(logging.WARNING)
    rows = _assert_safe(_hostile_run(tiny_cfg(), monkeypatch, flip), 3)
    assert [(r["replies"], r["dropped"]) for r in rows] == [(2, 1)] * 3
    assert "beyond the bound" in caplog.text


@pytest.mark.parametrize("codec", ["int8", "compeft:0.2", "sign"])
def test_a_scale_of_3e38_is_refused(tiny_cfg, monkeypatch, caplog, one_thread, codec):
    def inflate(reply, request):
        payload = _payload(reply)
        return _reply(request, _edit(payload, scales=np.full(payload.scales.size, 3e38)), _metrics(reply))

    caplog.set_level(logging.WARNING)
    cfg = tiny_cfg(**{"compression.uplink": codec})
    rows = _assert_safe(_hostile_run(cfg, monkeypatch, inflate), 3)
    assert [(r["replies"], r["dropped"]) for r in rows] == [(2, 1)] * 3
    assert "decodes beyond the bound" in caplog.text


@pytest.mark.parametrize("factor, action, counts", [
    (1e6, "drop", (2, 1, 0, 0)),  # values beyond the decode bound: malformed
    (100.0, "drop", (2, 1, 1, 0)),  # values within it, the norm 100x the round's median: out of bounds
    (100.0, "clip", (3, 0, 0, 1)),
])
def test_a_scaled_update_is_dropped_or_clipped(tiny_cfg, monkeypatch, caplog, one_thread, factor, action, counts):
    def scale(reply, request):
        payload = _payload(reply)
        values = payload.values.copy().view("<f4") * np.float32(factor)
        return _reply(request, _edit(payload, values=values), _metrics(reply))

    caplog.set_level(logging.WARNING)
    rounds = 3 if action == "drop" else 2  # progress is asserted where the hostile update is dropped
    cfg = tiny_cfg(**{"sanity.norm_action": action, "federation.rounds": rounds})
    rows = _assert_safe(_hostile_run(cfg, monkeypatch, scale), rounds, progress=action == "drop")
    assert [(r["replies"], r["dropped"], r["sanity_dropped"], r["sanity_clipped"]) for r in rows] == [counts] * rounds
    if action == "clip":  # scaled to at most 10x the median: the global adapter moves, but boundedly
        assert all(math.isfinite(r["eval_loss"]) and r["eval_loss"] < 10 for r in rows)


@pytest.mark.parametrize("claim", [1e9, 999_999])
def test_a_huge_num_examples_does_not_take_the_global_adapter_over(tiny_cfg, monkeypatch, one_thread, claim):
    """The hostile delta moves the global adapter to 0.5 everywhere: with its claimed weight it would."""
    cfg = tiny_cfg(**{"sanity.norm_action": "off"})  # the weight alone must hold (delta-W would catch this one)
    layout = get_runtime(cfg).layout
    none = make_codec("none")

    def takeover(reply, request):
        assert protocol.text(protocol.config_record(request.content), "downlink") == "full"
        start = none.decode(protocol.record_payload(request.content[protocol.GLOBAL]), layout)
        delta = {k: 0.5 - v for k, v in start.items()}
        return _reply(request, none.encode(delta, layout), {**_metrics(reply), "num-examples": claim})

    run_dir = _hostile_run(cfg, monkeypatch, takeover)
    rows = _assert_safe(run_dir, 3, progress=claim >= cfg.sanity.max_num_examples)
    if claim >= cfg.sanity.max_num_examples:  # the exclusive cap: dropped
        assert [(r["replies"], r["dropped"]) for r in rows] == [(2, 1)] * 3
    flat = torch.cat([t.reshape(-1) for t in checkpoint.load(run_dir / "checkpoint").tensors["global"].values()])
    assert float(((flat - 0.5).abs() < 1e-3).float().mean()) < 0.5


def test_forged_metrics_are_dropped_and_the_update_kept(tiny_cfg, monkeypatch, caplog, one_thread):
    forged = {"epsilon-local": 0.0, "train-loss": 1e300, "split-bytes-up": 1e18}

    def forge(reply, request):
        return _reply(request, _payload(reply), {**_metrics(reply), **forged})

    caplog.set_level(logging.WARNING)
    run_dir = _hostile_run(tiny_cfg(), monkeypatch, forge)
    rows = _assert_safe(run_dir, 3)
    assert all("epsilon_local" not in r and "split_bytes_up" not in r and 0 < r["train_loss"] < 10 for r in rows)
    summary = (run_dir / "summary.md").read_text()
    assert "epsilon_local" not in summary and "e+300" not in summary and "e+18" not in summary
    assert [(r["replies"], r["dropped"], r["sanity_metrics_dropped"]) for r in rows] == [(3, 0, 3)] * 3
    assert "'epsilon-local', which this run's configuration does not produce" in caplog.text


def test_a_global_adapter_beyond_the_bound_is_never_applied(tiny_cfg, one_thread):
    """Honest training moves the adapter past a tight bound: every round is skipped, the aggregator's
    state (FedAdam moments) rolls back, and the checkpoint holds the initial adapter."""
    cfg = tiny_cfg(**{"sanity.max_global_value": 0.13, "federation.strategy": "fedadam", "federation.rounds": 2})
    initial = get_runtime(cfg).initial_adapter()
    with pytest.raises(FedPeftError, match=r"no client update was applied in rounds 1-2, the global adapter is "
                                           r"unchanged: the new global adapter was rejected by the sanity bounds "
                                           r"\(2x, e.g. .* beyond sanity.max_global_value = 0.13\)"):
        runner.simulate(cfg)  # the run ends, with its report and checkpoint, and says why it failed
    (run_dir,) = Path(cfg.output.dir).iterdir()
    rows = report.read_metrics(run_dir)
    assert [(r["global_rejected"], r["train_loss"]) for r in rows] == [(1, None)] * 2
    ckpt = checkpoint.load(run_dir / "checkpoint")
    assert all(torch.equal(ckpt.tensors["global"][k], v) for k, v in initial.items())
    assert ckpt.extra["optimizer_t"] == 0 and not ckpt.tensors["optimizer"]


# ---- units ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["int8", "sign", "compeft:0.5", "qsgd"])
def test_decoders_refuse_a_scale_that_would_overflow_without_computing_it(spec):
    state = {"a": torch.randn(6, 5), "b": torch.randn(7)}
    layout = Layout.from_state(state)
    codec = make_codec(spec)
    payload = codec.encode(state, layout, rng=np.random.default_rng(0))
    hostile = _edit(payload, scales=np.full(payload.scales.size, 3e38))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in numpy would warn
        with pytest.raises(PayloadError, match="beyond the bound"):
            codec.decode(hostile, layout, bound=BOUND)  # the server's default sanity.decode_bound
        if spec == "int8":  # 127 x 3e38 is no float32 at all: refused whatever the bound
            with pytest.raises(PayloadError, match="beyond the bound"):
                codec.decode(hostile, layout)
        with pytest.raises(PayloadError, match="beyond the bound 100"):
            codec.decode(_edit(payload, scales=payload.scales * 1e4), layout, bound=100.0)
    assert all(torch.isfinite(t).all() for t in codec.decode(payload, layout, bound=100.0).values())


def test_the_delta_w_norm_catches_what_per_tensor_norms_do_not():
    """Same per-tensor norms for every client; one puts its lora_B update on A's large direction."""
    from fedpeft.server.replies import ClientReply, RoundReplies
    from fedpeft.server.sanity import screen_norms

    a, b = "m.lora_A.weight", "m.lora_B.weight"
    glob = {a: torch.tensor([[100.0, 0, 0], [0, 0.01, 0]]), b: torch.zeros(4, 2)}
    honest = {a: torch.zeros(2, 3), b: torch.tensor([[0, 1.0]] * 4)}  # moves along A's small direction
    hostile = {a: torch.zeros(2, 3), b: torch.tensor([[1.0, 0]] * 4)}  # same norms, 10^4 x the weight change
    replies = RoundReplies(clients=[ClientReply(n, 1.0, {}, d) for n, d in enumerate([honest, honest, hostile])])
    cfg = tiny_sanity(norm_action="drop")
    assert screen_norms(replies, glob, cfg, 1) == {"sanity_dropped": 1, "sanity_clipped": 0}
    assert replies.nodes == [0, 1] and "lora_AB" in replies.dropped[2]

    replies = RoundReplies(clients=[ClientReply(n, 1.0, {}, d) for n, d in enumerate([honest, honest, hostile])])
    screen_norms(replies, glob, tiny_sanity(norm_action="clip"), 1)
    clipped = replies.clients[2].delta
    change = torch.linalg.matrix_norm(clipped[b] @ glob[a])
    assert change <= 10 * torch.linalg.matrix_norm(honest[b] @ glob[a]) * (1 + 1e-6)


def tiny_sanity(**values):
    from fedpeft.config import SanitySection

    return SanitySection(**values)


@pytest.mark.parametrize("mode, claims, weights", [
    ("partition", [50, 60, 999_999], [50, 60, 60]),  # capped at the node's partition size (60 each)
    ("claimed", [50, 999_999], [50, 999_999]),
    ("uniform", [50, 999_999], [1, 1]),
])
def test_weights_are_capped_at_the_partition_or_uniform(mode, claims, weights):
    from fedpeft.server.sanity import ReplyChecks

    checks = ReplyChecks(tiny_sanity(weights=mode), {}, largest_partition=60, partition_size=lambda node: 60)
    assert [checks.weight({"num-examples": c}, 1000, 1) for c in claims] == weights
    with pytest.raises(PayloadError, match="not below sanity.max_num_examples"):
        checks.check_claim({"num-examples": 10**6})
    checks.check_claim({"num-examples": 10**6 - 1})


def test_the_exclusive_cap_must_leave_room_for_every_partition(tiny_cfg, tmp_path):
    from fedpeft.server.loop import FederatedServer

    with pytest.raises(FedPeftError, match="must exceed the largest partition"):
        FederatedServer(tiny_cfg(**{"sanity.max_num_examples": 60}), tmp_path)


def test_a_checkpoint_never_holds_non_finite_values(tmp_path):
    good = checkpoint.ServerCheckpoint(1, {"global": {"w": torch.ones(3)}}, {"state": 1})
    checkpoint.save(good, tmp_path / "ckpt")
    bad = checkpoint.ServerCheckpoint(2, {"global": {"w": torch.tensor([1.0, math.inf, 0.0])}}, {"state": 2})
    with pytest.raises(FedPeftError, match="refusing to checkpoint non-finite tensors"):
        checkpoint.save(bad, tmp_path / "ckpt")
    kept = checkpoint.load(tmp_path / "ckpt")  # a resume still finds the last good checkpoint
    assert kept.round == 1 and torch.equal(kept.tensors["global"]["w"], torch.ones(3))

    from safetensors.torch import save_file

    save_file({"w": torch.tensor([math.nan])}, str(tmp_path / "ckpt" / "global.safetensors"))  # written elsewhere
    with pytest.raises(FedPeftError, match="global.safetensors does not match the checkpoint's manifest"):
        checkpoint.load(tmp_path / "ckpt")
    checkpoint.seal(tmp_path / "ckpt", 1)  # even with a manifest that vouches for it
    with pytest.raises(FedPeftError, match="holds non-finite tensors"):
        checkpoint.load(tmp_path / "ckpt")
