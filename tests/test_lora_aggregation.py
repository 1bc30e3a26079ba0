"""federation.lora_aggregation: float64 properties of each mode on tiny LoRA shapes, its config rules, and
end-to-end runs on the tiny model (docs/lora-aggregation.md)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedpeft import config, lora, report
from fedpeft.errors import ConfigError
from fedpeft.server.aggregators import make_aggregator
from fedpeft.server.replies import ClientReply, RoundReplies
from fedpeft.simulation import runner

from conftest import interrupt_and_resume

MODULES = {"m.q": (6, 5), "m.v": (4, 7)}  # module -> (out, in)
R = 2


def _key(module: str, factor: str) -> str:
    return f"{module}.lora_{factor}.default.weight"


def _global(gen: torch.Generator, b_zero: bool = False, r: int = R) -> dict[str, torch.Tensor]:
    state = {"head.weight": torch.randn(3, 4, generator=gen, dtype=torch.float64)}
    for m, (out, inp) in MODULES.items():
        state[_key(m, "A")] = torch.randn(r, inp, generator=gen, dtype=torch.float64)
        state[_key(m, "B")] = torch.zeros(out, r, dtype=torch.float64) if b_zero else \
            torch.randn(out, r, generator=gen, dtype=torch.float64)
    return state


def _replies(gen: torch.Generator, global_state: dict, n: int = 4, freeze_a: bool = False) -> RoundReplies:
    clients = []
    for i in range(n):
        delta = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in global_state.items()}
        if freeze_a:
            delta.update({k: torch.zeros_like(v) for k, v in delta.items() if ".lora_A." in k})
        clients.append(ClientReply(node=i, weight=float(i + 1), metrics={}, delta=delta))
    return RoundReplies(clients=clients)


def _exact_means(replies: RoundReplies, global_state: dict) -> dict[str, torch.Tensor]:
    """Σ w_i B_i A_i per module by hand (a loop over clients)."""
    total = sum(replies.weights)
    out = {}
    for m in MODULES:
        a, b = _key(m, "A"), _key(m, "B")
        out[m] = sum((c.weight / total) * (global_state[b] + c.delta[b]) @ (global_state[a] + c.delta[a])
                     for c in replies.clients)
    return out


def _fed(mode: str, **extra: object) -> config.FederationSection:
    return config.FederationSection(lora_aggregation=mode, **extra)  # type: ignore[arg-type]


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def test_exact_reproduces_the_weighted_mean_of_the_products_over_two_rounds():
    gen = torch.Generator().manual_seed(0)
    agg = make_aggregator(_fed("exact"))
    state = _global(gen, b_zero=True)
    correction = {m: torch.zeros(s, dtype=torch.float64) for m, s in MODULES.items()}
    for _ in range(2):  # the second round starts from a non-zero correction the clients trained under
        replies = _replies(gen, state)
        want = {m: correction[m] + v for m, v in _exact_means(replies, state).items()}
        state = agg.aggregate(replies, state)
        correction = agg.correction()
        for m in MODULES:
            got = state[_key(m, "B")] @ state[_key(m, "A")] + correction[m]
            assert _rel(got, want[m]) < 1e-10
            assert state[_key(m, "A")].shape == (R, MODULES[m][1])  # the adapter keeps its rank
        assert agg.metrics["lora_agg_error"] > 1e-3  # what the correction made up for


def test_exact_keeps_float32_factors_and_puts_their_rounding_into_the_correction():
    gen = torch.Generator().manual_seed(1)
    state64 = _global(gen)
    replies = _replies(gen, state64)
    state = {k: v.float() for k, v in state64.items()}
    for c in replies.clients:
        c.delta.update({k: v.float() for k, v in c.delta.items()})
    agg = make_aggregator(_fed("exact"))
    new = agg.aggregate(replies, state)
    assert all(v.dtype == torch.float32 for v in new.values())
    want = _exact_means(replies, {k: v.double() for k, v in state.items()})
    for m in MODULES:
        got = new[_key(m, "B")].double() @ new[_key(m, "A")].double() + agg.correction()[m]
        assert _rel(got, want[m]) < 1e-10


def test_exact_with_a_server_learning_rate_steps_part_way_to_the_mean():
    gen = torch.Generator().manual_seed(2)
    state = _global(gen)
    replies = _replies(gen, state)
    agg = make_aggregator(_fed("exact", server_lr=0.5))
    new = agg.aggregate(replies, state)
    for m, mean in _exact_means(replies, state).items():
        old = state[_key(m, "B")] @ state[_key(m, "A")]
        got = new[_key(m, "B")] @ new[_key(m, "A")] + agg.correction()[m]
        assert _rel(got, old + 0.5 * (mean - old)) < 1e-10


def test_naive_misses_the_mean_and_reports_its_error_as_computed_by_hand():
    gen = torch.Generator().manual_seed(3)
    state = _global(gen)
    replies = _replies(gen, state)
    new = make_aggregator(_fed("naive")).aggregate(replies, state)
    mean = _exact_means(replies, state)
    assert all(_rel(new[_key(m, "B")].double() @ new[_key(m, "A")].double(), mean[m]) > 1e-2 for m in MODULES)
    total = sum(replies.weights)
    factor = {k: v + sum(c.weight / total * c.delta[k] for c in replies.clients) for k, v in state.items()}
    errors = {m: factor[_key(m, "B")] @ factor[_key(m, "A")] - mean[m] for m in MODULES}
    hand = (sum(float((e ** 2).sum()) for e in errors.values()) / sum(float((v ** 2).sum()) for v in mean.values()))
    reported = lora.agg_error(lora.pair_means(replies.deltas, replies.weights, state))
    assert reported == pytest.approx(hand ** 0.5, rel=1e-10)


def test_exact_averages_tensors_that_are_not_lora_pairs_like_fedavg():
    gen = torch.Generator().manual_seed(4)
    state = _global(gen)
    replies = _replies(gen, state)
    exact = make_aggregator(_fed("exact")).aggregate(replies, state)
    naive = make_aggregator(_fed("naive")).aggregate(replies, state)
    assert torch.allclose(exact["head.weight"].double(), naive["head.weight"].double(), atol=1e-6)


def test_set_correction_folds_into_the_base_weight_and_replaces_rather_than_adds(tiny_cfg):
    from fedpeft.runtime import get_runtime

    rt = get_runtime(tiny_cfg())
    model, state = rt.model, rt.initial_adapter()
    shapes = lora.correction_shapes(state)
    name, shape = next(iter(shapes.items()))
    layer = model.get_submodule(name)
    w0 = layer.get_base_layer().weight.detach().clone()
    c = torch.randn(shape)
    scale = float(layer.scaling["default"])
    lora.set_correction(model, {name: c})
    lora.set_correction(model, {name: c})
    assert torch.allclose(layer.get_base_layer().weight, w0 + scale * c, atol=1e-6)
    lora.set_correction(model, {})
    assert torch.equal(layer.get_base_layer().weight, w0)


@pytest.mark.parametrize(("extra", "needle"), [
    ({"federation.strategy": "median"}, "'fedavg' or 'fedprox'"),
    ({"privacy.secure_aggregation": "secaggplus"}, "only their sums"),
    ({"privacy.mode": "client"}, "client-level DP"),
    ({"adapter.type": "ia3"}, "adapter.type = 'lora'"),
    ({"split.enabled": True, "model.tiny_layers": 3}, "split.enabled"),
])
@pytest.mark.parametrize("mode", ["exact", "svd"])
def test_product_means_refuse_what_they_cannot_compose_with(tiny_cfg, mode, extra, needle):
    with pytest.raises(ConfigError, match="lora_aggregation") as e:
        tiny_cfg(**{"federation.lora_aggregation": mode, **extra})
    assert needle in str(e.value)


def test_exact_run_learns_reports_the_error_and_counts_the_correction_bytes(tiny_cfg):
    extra = {"federation.rounds": 2}
    exact_dir = runner.simulate(tiny_cfg(**{"federation.lora_aggregation": "exact", **extra}))
    exact = report.read_metrics(exact_dir)
    naive = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    assert all(0 < r["lora_agg_error"] < 10 for r in exact + naive)
    assert exact[0]["lora_agg_error"] == pytest.approx(naive[0]["lora_agg_error"], rel=1e-9)  # same first round
    correction = load_file(str(exact_dir / "adapter" / lora.CORRECTION_FILE))
    assert correction and all(float(v.abs().max()) > 0 for v in correction.values())
    assert exact[0]["bytes_down"] == naive[0]["bytes_down"]  # no correction before the first aggregation
    assert exact[1]["bytes_down"] > naive[1]["bytes_down"]  # every sampled client downloads it (exactly: below)
    assert exact[-1]["eval_loss"] < exact[0]["eval_loss"] * 1.2


@pytest.mark.parametrize(("mode", "keys"), [
    ("exact", ("train_loss", "eval_loss", "lora_agg_error", "bytes_down")),  # the correction is aggregator state
    ("share_a", ("train_loss", "eval_loss", "bytes_up")),  # each client's B is node state
])
def test_resumes_exactly(tiny_cfg, monkeypatch, mode, keys):
    extra = {"federation.rounds": 3, "federation.clients_per_round": 2, "federation.lora_aggregation": mode}
    full = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    resumed = report.read_metrics(interrupt_and_resume(tiny_cfg(**extra), 3, monkeypatch))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]


def test_freeze_a_equals_exact_when_a_is_common_and_unchanged():
    """FFA-LoRA: with every dA_i = 0, averaging B alone is the exact mean, and exact adds no correction."""
    gen = torch.Generator().manual_seed(5)
    state = _global(gen)
    replies = _replies(gen, state, freeze_a=True)
    agg = make_aggregator(_fed("exact"))
    exact = agg.aggregate(replies, state)
    b_only = [{k: v for k, v in c.delta.items() if ".lora_A." not in k} for c in replies.clients]
    frozen = make_aggregator(_fed("freeze_a")).aggregate(
        RoundReplies(clients=[ClientReply(c.node, c.weight, {}, d) for c, d in zip(replies.clients, b_only)]),
        {k: v for k, v in state.items() if ".lora_A." not in k})
    mean = _exact_means(replies, state)
    for m in MODULES:
        a, b = _key(m, "A"), _key(m, "B")
        assert _rel(frozen[b].double() @ state[a], mean[m]) < 1e-6  # float32 factors, exact product
        assert torch.allclose(frozen[b].double(), exact[b].double(), atol=1e-6)
        assert float(agg.correction()[m].abs().max()) < 1e-6  # only exact's float32 rounding of B
    assert agg.metrics["lora_agg_error"] == 0.0


def test_freeze_a_sends_only_b_and_keeps_a_at_its_seeded_init(tiny_cfg):
    from fedpeft.runtime import get_runtime

    naive_cfg = tiny_cfg(**{"federation.rounds": 2})
    naive = get_runtime(naive_cfg)
    init_a = {k: v for k, v in naive.initial_adapter().items() if ".lora_A." in k}
    naive_elements = naive.layout.total
    cfg = tiny_cfg(**{"federation.rounds": 2, "federation.lora_aggregation": "freeze_a",
                      "compression.uplink": "int8", "privacy.mode": "client", "privacy.clip_norm": 5.0,
                      "privacy.server_noise_multiplier": 0.01})
    rows = report.read_metrics(runner.simulate(cfg))
    rt = get_runtime(cfg)
    assert not [n for n in rt.layout.names if ".lora_A." in n]  # A is in no payload, either way
    assert rt.layout.total == naive_elements - sum(v.numel() for v in init_a.values())  # fewer noised coordinates
    params = dict(rt.model.named_parameters())
    assert init_a and all(torch.equal(params[k].detach().cpu(), v) for k, v in init_a.items())
    assert all(r["replies"] == 3 and "lora_agg_error" not in r for r in rows)  # exact by construction
    assert rows[-1]["bytes_up"] < report.read_metrics(runner.simulate(
        tiny_cfg(**{"federation.rounds": 2, "compression.uplink": "int8"})))[-1]["bytes_up"]


@pytest.mark.parametrize("extra", [
    {"federation.strategy": "median"}, {"federation.strategy": "fedadam"}, {"compression.uplink": "compeft:0.1"},
    {"privacy.secure_aggregation": "secaggplus"}, {"privacy.mode": "both"},
])
@pytest.mark.parametrize("mode", ["freeze_a", "share_a"])
def test_one_factor_modes_compose_with_strategies_codecs_secagg_and_dp(tiny_cfg, mode, extra):
    assert tiny_cfg(**{"federation.lora_aggregation": mode, **extra}).federation.lora_aggregation == mode


@pytest.mark.parametrize("mode", ["freeze_a", "share_a"])
def test_one_factor_modes_need_lora(tiny_cfg, mode):
    with pytest.raises(ConfigError, match="adapter.type = 'lora'"):
        tiny_cfg(**{"federation.lora_aggregation": mode, "adapter.type": "prompt"})


def test_svd_at_full_rank_reproduces_the_weighted_mean_of_the_products():
    """r = 5 is full rank for both modules (min(out, in) = 5 and 4: the second pads a zero direction)."""
    gen = torch.Generator().manual_seed(6)
    state = _global(gen, r=5)
    replies = _replies(gen, state)
    agg = make_aggregator(_fed("svd"))
    new = agg.aggregate(replies, state)
    for m, mean in _exact_means(replies, state).items():
        assert new[_key(m, "A")].shape == state[_key(m, "A")].shape
        assert _rel(new[_key(m, "B")] @ new[_key(m, "A")], mean) < 1e-10
    assert agg.metrics["lora_svd_error"] < 1e-10 < agg.metrics["lora_agg_error"]
    assert agg.correction() is None  # nothing but the adapter travels


def test_svd_below_full_rank_is_the_best_rank_r_approximation_and_reports_what_it_drops():
    gen = torch.Generator().manual_seed(7)
    state = _global(gen)
    replies = _replies(gen, state)
    agg = make_aggregator(_fed("svd"))
    new = agg.aggregate(replies, state)
    dropped, total = 0.0, 0.0
    for m, mean in _exact_means(replies, state).items():
        s = torch.linalg.svdvals(mean)
        dropped, total = dropped + float((s[R:] ** 2).sum()), total + float((s ** 2).sum())
        err = new[_key(m, "B")] @ new[_key(m, "A")] - mean
        assert float(err.norm()) == pytest.approx(float(s[R:].norm()), rel=1e-9)  # Eckart-Young
    assert agg.metrics["lora_svd_error"] == pytest.approx((dropped / total) ** 0.5, rel=1e-9)
    assert agg.metrics["lora_svd_error"] > 1e-3


def test_svd_run_reports_its_truncation_error(tiny_cfg):
    rows = report.read_metrics(runner.simulate(tiny_cfg(**{"federation.rounds": 2, "federation.lora_aggregation":
                                                             "svd"})))
    assert all(0 < r["lora_svd_error"] < 1 and r["lora_agg_error"] > 0 for r in rows)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] * 1.2


def _serialized(content) -> bytes:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return b"".join(obj.deflate() for obj in get_all_nested_objects(content).values())


def capture_calls(monkeypatch) -> list[tuple]:
    """Record every ClientApp call as (message type, its serialized instruction + reply, the node's personal state
    before and after, the reply)."""
    from fedpeft.clients.app import PERSONAL_STATE
    from fedpeft.clients.app import app as client_app

    calls: list[tuple] = []
    original = client_app.__call__

    def personal(context) -> dict:
        record = context.state.get(PERSONAL_STATE)
        return {} if record is None else {k: torch.tensor(v.numpy()) for k, v in record.items()}

    def capture(self, message, context):
        before = personal(context)
        reply = original(message, context)
        calls.append((message.metadata.message_type, _serialized(message.content) + _serialized(reply.content),
                      before, personal(context), reply))
        return reply

    monkeypatch.setattr(type(client_app), "__call__", capture)
    return calls


def test_share_a_never_puts_b_in_any_payload(tiny_cfg, monkeypatch):
    """Every client's B update (its personal state after minus before the call) is searched for, byte for byte,
    in everything that crossed the wire that round; A's updates, which do travel, are found the same way."""
    from fedpeft.compression import make_codec
    from fedpeft.protocol import parse_reply

    calls = capture_calls(monkeypatch)
    cfg = tiny_cfg(**{"federation.rounds": 2, "federation.lora_aggregation": "share_a"})
    rows = report.read_metrics(runner.simulate(cfg))
    from fedpeft.runtime import get_runtime

    layout = get_runtime(cfg).layout
    assert not [n for n in layout.names if ".lora_B." in n] and [n for n in layout.names if ".lora_A." in n]
    assert len(calls) == 6 and all(r["replies"] == 3 for r in rows)
    for _, wire, before, after, reply in calls:
        assert after and all(".lora_B." in k for k in after)
        for k, b in after.items():
            db = b - before.get(k, torch.zeros_like(b))
            assert float(db.abs().max()) > 0  # B trained
            assert b.numpy().tobytes() not in wire and db.numpy().tobytes() not in wire
        sent = make_codec("none").decode(parse_reply(reply.content)[0], layout)
        assert all(v.numpy().tobytes() in wire for k, v in sent.items() if ".lora_A." in k)  # the method finds A
    assert "lora_agg_error" not in rows[0]


@pytest.mark.parametrize(("mode", "held_back"), [("freeze_a", ".lora_A."), ("share_a", ".lora_B.")])
def test_one_factor_modes_run_under_secagg(tiny_cfg, mode, held_back):
    """SecAgg+ masks and sums the one factor that travels (its dense vector has the restricted layout)."""
    from fedpeft.runtime import get_runtime

    cfg = tiny_cfg(**{"federation.rounds": 1, "federation.lora_aggregation": mode, "train.local_steps": 3,
                      "privacy.secure_aggregation": "secaggplus"})
    row = report.read_metrics(runner.simulate(cfg))[0]
    layout = get_runtime(cfg).layout
    assert row["replies"] == 3 and row["dropped"] == 0 and row["secagg_up_collect_masked_vectors"] > 0
    assert not [n for n in layout.names if held_back in n] and row["bytes_up_fp32"] == 4 * 3 * layout.total


@pytest.mark.usefixtures("one_thread")
def test_audit_share_a_a_alone_still_gives_the_batch_away(tmp_path):
    """What share_a exposes (measured, not assumed): the server observes only dA, and the span attack's A channel
    reads the client's one-example batch from it as well as from naive's dA + dB (tiny LLaMA, one SGD step)."""
    from test_audit_capture import FAST, _rows, _sets

    from fedpeft import config
    from fedpeft.audit import capture

    found = {}
    for mode in ("naive", "share_a"):
        (tmp_path / mode).mkdir()
        cfg = config.load(None, _sets(tmp_path / mode, **{"federation.lora_aggregation": mode}))
        found[mode] = _rows(capture.audit_run(cfg, FAST, rounds=[2]))
    for r in found["share_a"]:
        assert r["verdict"] == "fail" and r["best_attack"] == "span" and float(r["token_f1"]) >= 0.9, r
    assert [int(r["payload_bytes"]) for r in found["share_a"]] < [int(r["payload_bytes"]) for r in found["naive"]]


@pytest.mark.usefixtures("one_thread")
def test_audit_freeze_a_b_alone_gives_the_batch_away_below_r_tokens(tmp_path):
    """What freeze_a exposes (measured): the server observes only dB and knows A (the public seeded init); the span
    attack's B channel reads the client's one-example batch (about 32 distinct tokens) at r = 64 nearly as well as
    naive's A channel, and at r = 16 (fewer dimensions than tokens) applies and reads nothing. Before, it found
    no module with a trainable A and the audit's pass had no attack behind it (best attack '-')."""
    from test_audit_capture import FAST, _rows, _sets

    from fedpeft import config
    from fedpeft.audit import capture

    found = {}
    for mode, r in (("naive", 64), ("freeze_a", 64), ("freeze_a", 16)):
        (tmp_path / f"{mode}{r}").mkdir()
        cfg = config.load(None, _sets(tmp_path / f"{mode}{r}", **{"federation.lora_aggregation": mode,
                                                                    "adapter.r": r}))
        found[mode, r] = _rows(capture.audit_run(cfg, FAST, rounds=[2]))
    for naive, frozen in zip(found["naive", 64], found["freeze_a", 64]):
        assert frozen["verdict"] == "fail" and frozen["best_attack"] == "span", frozen
        assert float(frozen["token_f1"]) >= 0.9 and float(naive["token_f1"]) - float(frozen["token_f1"]) < 0.05
        assert int(frozen["payload_bytes"]) < int(naive["payload_bytes"])
    for r in found["freeze_a", 16]:
        assert r["best_attack"] == "span" and float(r["token_f1"]) == 0.0, r


def test_correction_travels_as_factors_of_its_rank_when_fewer_bytes():
    gen = torch.Generator().manual_seed(8)
    low = torch.randn(64, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 48, generator=gen,
                                                                              dtype=torch.float64)
    full = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    wire, ranks = lora.correction_wire({"m.q": low, "m.v": full, "m.k": torch.zeros(6, 6, dtype=torch.float64)})
    assert ranks == {"m.q": 5, "m.v": 0, "m.k": 1}  # rank 5 of 64 x 48; full rank: dense; zero: one zero component
    assert wire["m.q/B"].shape == (64, 5) and wire["m.q/A"].shape == (5, 48) and wire["m.v"].shape == (8, 8)
    back = lora.correction_from_wire(wire, ranks)
    assert _rel(back["m.q"].double(), low) < 1e-6 and _rel(back["m.v"].double(), full) < 1e-6  # fp32 rounding
    assert float(back["m.k"].abs().max()) == 0.0


def test_stack_downloads_its_correction_as_stacked_factors_and_counts_them(tiny_cfg, monkeypatch):
    """Round 2 of stack: each of the 3 clients downloads the rank <= 3 x 4 correction as factors, fewer bytes than
    the dense matrices, and bytes_down exceeds naive's by those records (serialized Flower objects)."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from fedpeft import protocol
    from fedpeft.compression import make_codec

    sent: list[dict[str, int]] = []
    original = lora.correction_wire

    def wire(correction):
        out, ranks = original(correction)
        sent.append(dict(ranks))
        return out, ranks

    monkeypatch.setattr(lora, "correction_wire", wire)
    extra = {"federation.rounds": 2, "data.num_clients": 3, "adapter.r": 4}
    stack = report.read_metrics(runner.simulate(tiny_cfg(**extra, **{"federation.lora_aggregation": "stack"})))
    naive = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    assert len(sent) == 1 and all(1 <= k <= 3 * 4 for k in sent[0].values())  # stacked rank: 3 clients x r 4
    from fedpeft.runtime import PROCESS_RUNTIMES

    template = PROCESS_RUNTIMES.get(tiny_cfg(**extra)).initial_adapter()
    factored = lora.correction_layout(template, sent[0])
    dense = lora.correction_layout(template)
    assert factored.total < dense.total
    records = {protocol.CORRECTION: protocol.payload_record(make_codec("none").encode(
        {n: torch.zeros(s) for n, s in zip(factored.names, factored.shapes)}, factored)),
        lora.CORRECTION_RANKS: ConfigRecord(sent[0])}
    both = protocol.record_bytes(RecordDict({"x": ArrayRecord(), **records})) - protocol.record_bytes(
        RecordDict({"x": ArrayRecord()}))
    assert stack[0]["bytes_down"] == naive[0]["bytes_down"]
    # the records, within 2 bytes per message: the framing of the enclosing message (varint length prefixes) moves
    # with its size; a dense correction would add thousands of bytes more
    assert abs(stack[1]["bytes_down"] - naive[1]["bytes_down"] - 3 * both) <= 3 * 2
