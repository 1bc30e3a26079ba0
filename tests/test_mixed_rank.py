"""Mixed LoRA ranks per client (adapter.client_ranks): float64 properties of svd, zeropad and stack on clients of
ranks {2, 4, 8, 16}, what each rank sends and receives in a real run, refusals, resume."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedpeft import lora, models, protocol, report
from fedpeft.compression import make_codec
from fedpeft.config import FederationSection
from fedpeft.errors import ConfigError
from fedpeft.server import ranks as server_ranks
from fedpeft.server.aggregators import make_aggregator
from fedpeft.server.replies import ClientReply, RoundReplies
from fedpeft.simulation import runner

from conftest import interrupt_and_resume

RANKS = [2, 4, 8, 16]
R = 16
MODULES = {"m.q": (16, 20), "m.v": (12, 16)}  # min(out, in) <= R: rank R holds any mean (svd at full rank)
MIXED = {"adapter.r": R, "adapter.client_ranks": RANKS, "data.num_clients": 4, "federation.rounds": 2}


def _key(module: str, factor: str) -> str:
    return f"{module}.lora_{factor}.default.weight"


def _global(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"head.weight": torch.randn(3, 4, generator=gen, dtype=torch.float64)}
    for m, (out, inp) in MODULES.items():
        state[_key(m, "A")] = torch.randn(R, inp, generator=gen, dtype=torch.float64)
        state[_key(m, "B")] = torch.randn(out, R, generator=gen, dtype=torch.float64)
    return state


def _replies(gen: torch.Generator, global_state: dict) -> RoundReplies:
    """One client per rank; its delta has its rank's shapes (what the server decodes with its layout)."""
    clients = []
    for i, r in enumerate(RANKS):
        own = lora.truncate(global_state, r)
        delta = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in own.items()}
        clients.append(ClientReply(node=i, weight=float(i + 1), metrics={}, delta=delta))
    return RoundReplies(clients=clients)


def _by_hand(replies: RoundReplies, global_state: dict) -> dict[str, torch.Tensor]:
    """Σ w_i B_i A_i per module, each client's factors at its own rank (a loop, no padding)."""
    total = sum(replies.weights)
    out = {}
    for m in MODULES:
        a, b = _key(m, "A"), _key(m, "B")
        terms = []
        for c in replies.clients:
            r = c.delta[a].shape[0]
            b_i, a_i = global_state[b][:, :r] + c.delta[b], global_state[a][:r] + c.delta[a]
            terms.append((c.weight / total) * b_i @ a_i)
        out[m] = sum(terms)
    return out


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def test_stack_reproduces_the_mean_of_mixed_rank_products_and_restarts_the_factors():
    gen = torch.Generator().manual_seed(1)
    state = _global(gen)
    agg = make_aggregator(FederationSection(lora_aggregation="stack"))
    replies = _replies(gen, state)
    first = agg.aggregate(replies, state)
    c1 = {m: c.clone() for m, c in (agg.correction() or {}).items()}
    for m, mean in _by_hand(replies, state).items():
        a, b = _key(m, "A"), _key(m, "B")
        assert torch.equal(first[a], state[a]) and torch.equal(first[b], state[b])  # back to the init
        assert _rel(c1[m] + first[b] @ first[a], mean) < 1e-10  # the global ΔW is the exact mean
    assert agg.metrics["lora_agg_error"] > 1e-3  # zero-padded factor averaging would miss it
    replies = _replies(gen, first)  # round 2: clients train from the init factors over the round-1 correction
    agg.aggregate(replies, first)
    for m, mean in _by_hand(replies, first).items():
        a, b = _key(m, "A"), _key(m, "B")
        assert _rel(agg.correction()[m] + state[b] @ state[a], c1[m] + mean) < 1e-10


def _one_round(mode: str, seed: int) -> tuple[dict, RoundReplies, Any, dict]:
    """(global state, replies of ranks 2, 4, 8, 16, the aggregator, its new global state) for one round."""
    gen = torch.Generator().manual_seed(seed)
    state = _global(gen)
    replies = _replies(gen, state)
    agg = make_aggregator(FederationSection(lora_aggregation=mode))
    return state, replies, agg, agg.aggregate(replies, state)


def test_svd_at_full_rank_reproduces_the_mixed_rank_mean_and_each_rank_gets_its_best_approximation():
    state, replies, agg, new = _one_round("svd", 2)
    assert agg.metrics["lora_svd_error"] < 1e-10
    for m, mean in _by_hand(replies, state).items():
        assert _rel(new[_key(m, "B")].double() @ new[_key(m, "A")].double(), mean) < 1e-6  # float32 factors
        s = torch.linalg.svdvals(mean)
        for r in RANKS:  # FlexLoRA: a rank-r client receives the first r components = Eckart-Young's best
            own = lora.truncate(new, r)
            err = (mean - own[_key(m, "B")].double() @ own[_key(m, "A")].double()).norm()
            assert float(err) == pytest.approx(float(s[r:].pow(2).sum().sqrt()), rel=1e-5, abs=1e-9)


def test_svd_delta_steps_the_exact_dense_global_by_each_clients_change():
    """ΔW' = BA + Σ w_i ((B_r + dB_i)(A_r + dA_i) - B_r A_r), kept dense; the factors are its SVD (full rank here)."""
    state, replies, agg, new = _one_round("svd_delta", 2)
    total = sum(replies.weights)
    for m in MODULES:
        a, b = _key(m, "A"), _key(m, "B")
        want = state[b] @ state[a]
        for c in replies.clients:
            r = c.delta[a].shape[0]
            b_r, a_r = state[b][:, :r], state[a][:r]
            want = want + (c.weight / total) * ((b_r + c.delta[b]) @ (a_r + c.delta[a]) - b_r @ a_r)
        assert _rel(agg.state[f"dense/{m}"], want) < 1e-12
        assert _rel(new[b].double() @ new[a].double(), want) < 1e-6  # float32 factors
    assert agg.metrics["lora_svd_error"] < 1e-10


@pytest.mark.parametrize("mode", ["svd", "svd_delta"])
def test_a_low_rank_client_that_changed_nothing_erases_the_global_tail_under_svd_only(mode):
    gen = torch.Generator().manual_seed(6)
    state = _global(gen)
    still = {k: torch.zeros_like(v) for k, v in lora.truncate(state, 2).items()}  # a rank-2 client, no change
    new = make_aggregator(FederationSection(lora_aggregation=mode)).aggregate(
        RoundReplies(clients=[ClientReply(0, 1.0, {}, still)]), state)
    for m in MODULES:
        a, b = _key(m, "A"), _key(m, "B")
        kept = _rel(new[b].double() @ new[a].double(), state[b] @ state[a])
        assert (kept < 1e-6) == (mode == "svd_delta"), kept  # svd: the global becomes the rank-2 start point


def test_svd_delta_with_every_client_at_full_rank_is_svd():
    gen = torch.Generator().manual_seed(7)
    state = _global(gen)
    clients = [ClientReply(i, float(i + 1), {}, {k: torch.randn(v.shape, generator=gen, dtype=torch.float64)
                                                 for k, v in state.items()}) for i in range(3)]
    out = {mode: make_aggregator(FederationSection(lora_aggregation=mode)).aggregate(RoundReplies(clients=clients),
                                                                                       state)
           for mode in ("svd", "svd_delta")}
    assert all(torch.allclose(out["svd"][k], out["svd_delta"][k], rtol=0, atol=1e-12) for k in state)


def test_zeropad_averages_the_zero_padded_factors_and_reports_its_error():
    state, replies, agg, new = _one_round("zeropad", 3)
    total = sum(replies.weights)
    errors, refs = [], []
    for m, mean in _by_hand(replies, state).items():
        a, b = _key(m, "A"), _key(m, "B")
        pa = sum((c.weight / total) * lora.pad({a: state[a][:c.delta[a].shape[0]] + c.delta[a]}, R)[a]
                 for c in replies.clients)
        pb = sum((c.weight / total) * lora.pad({b: state[b][:, :c.delta[b].shape[1]] + c.delta[b]}, R)[b]
                 for c in replies.clients)
        assert torch.allclose(new[a], pa, rtol=0, atol=1e-12) and torch.allclose(new[b], pb, rtol=0, atol=1e-12)
        errors.append(pb @ pa - mean)
        refs.append(mean)
    assert agg.metrics["lora_agg_error"] == pytest.approx(lora.relative_error(errors, refs), rel=1e-9)
    assert agg.correction() is None


def test_zeropad_with_equal_ranks_is_fedavg():
    gen = torch.Generator().manual_seed(4)
    state = _global(gen)
    clients = [ClientReply(i, float(i + 1), {}, {k: torch.randn(v.shape, generator=gen, dtype=torch.float64)
                                                 for k, v in state.items()}) for i in range(3)]
    replies = RoundReplies(clients=clients)
    zeropad = make_aggregator(FederationSection(lora_aggregation="zeropad")).aggregate(replies, state)
    fedavg = make_aggregator(FederationSection()).aggregate(replies, state)
    assert all(torch.allclose(zeropad[k], fedavg[k].double(), atol=1e-6) for k in state)


def test_rank_rules():
    sizes = [50, 10, 30, 20, 40, 60, 70, 5]
    assert lora.client_ranks(RANKS, "cycle", sizes) == [2, 4, 8, 16, 2, 4, 8, 16]
    # sorted by size: 5, 10 -> 2; 20, 30 -> 4; 40, 50 -> 8; 60, 70 -> 16
    assert lora.client_ranks(RANKS, "by_size", sizes) == [8, 2, 4, 4, 8, 16, 16, 2]


@pytest.mark.parametrize(("extra", "needle"), [
    ({"federation.lora_aggregation": "naive"}, "choose one of: 'svd', 'svd_delta', 'zeropad', 'stack'"),
    ({"federation.lora_aggregation": "exact"}, "choose one of: 'svd', 'svd_delta', 'zeropad', 'stack'"),
    ({"federation.lora_aggregation": "share_a"}, "choose one of: 'svd', 'svd_delta', 'zeropad', 'stack'"),
    ({"federation.lora_aggregation": "svd", "adapter.r": 8}, "between 1 and adapter.r = 8"),
    ({"federation.lora_aggregation": "svd", "run.engine": "ray"}, "run.engine = 'inprocess'"),
    ({"federation.lora_aggregation": "zeropad", "compression.downlink": "int8"}, "lossless compression.downlink"),
    ({"federation.lora_aggregation": "stack", "privacy.mode": "local"}, "local DP-SGD"),
    ({"federation.lora_aggregation": "stack", "adapter.type": "ia3"}, "adapter.type = 'lora'"),
])
def test_mixed_ranks_refuse_what_cannot_carry_them(tiny_cfg, extra, needle):
    with pytest.raises(ConfigError, match="adapter.client_ranks|lora_aggregation") as e:
        tiny_cfg(**{**MIXED, **extra})
    assert needle in str(e.value)


@pytest.mark.parametrize("mode", ["svd", "svd_delta", "zeropad", "stack"])
def test_ranks_2_4_8_16_in_one_run(tiny_cfg, monkeypatch, mode):
    """Each node is sent its rank's share of the global adapter and replies at its rank (decoded with that
    layout, fingerprint-checked); every update is aggregated; the run learns."""
    sent: dict[int, int] = {}
    replied: dict[int, set[int]] = {}
    original_contents, original_add = server_ranks.RankPlan.contents, RoundReplies.add

    def contents(self, global_state, sampled, rnd, config):
        out = original_contents(self, global_state, sampled, rnd, config)
        for node, content in out.items():  # decode what travels: it must fit the node's own rank
            state = make_codec("none").decode(protocol.record_payload(content[protocol.GLOBAL]), self.layout(node))
            sent[node] = next(v.shape[0] for k, v in state.items() if ".lora_A." in k)
        return out

    def add(self, reply, uplink, layout, rnd, checks=None):
        original_add(self, reply, uplink, layout, rnd, checks)
        if self.clients and self.clients[-1].node == reply.metadata.src_node_id:
            delta = self.clients[-1].delta
            replied.setdefault(reply.metadata.src_node_id, set()).update(
                v.shape[0] for k, v in delta.items() if ".lora_A." in k)

    monkeypatch.setattr(server_ranks.RankPlan, "contents", contents)
    monkeypatch.setattr(RoundReplies, "add", add)
    rows = report.read_metrics(runner.simulate(tiny_cfg(**{**MIXED, "federation.lora_aggregation": mode})))
    assert sorted(sent.values()) == RANKS
    assert {n: {r} for n, r in sent.items()} == replied  # each node replied at the rank it was sent
    assert all(r["replies"] == 4 and r["dropped"] == 0 for r in rows)
    assert all(0 < r["lora_agg_error"] for r in rows)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] * 1.2


def test_a_lower_rank_client_sends_fewer_bytes(tiny_cfg):
    low = report.read_metrics(runner.simulate(tiny_cfg(**{**MIXED, "adapter.client_ranks": [2],
                                                          "federation.lora_aggregation": "zeropad",
                                                          "federation.rounds": 1})))
    high = report.read_metrics(runner.simulate(tiny_cfg(**{**MIXED, "adapter.client_ranks": [16],
                                                           "federation.lora_aggregation": "zeropad",
                                                           "federation.rounds": 1})))
    assert low[0]["bytes_up"] < high[0]["bytes_up"] and low[0]["bytes_down"] < high[0]["bytes_down"]


@pytest.mark.parametrize("mode", ["stack", "svd", "svd_delta"])
def test_mixed_ranks_resume_exactly(tiny_cfg, monkeypatch, mode):
    extra = {**MIXED, "federation.lora_aggregation": mode, "federation.rounds": 2, "federation.clients_per_round": 3}
    keys = ("train_loss", "eval_loss", "lora_agg_error", "bytes_up", "bytes_down")
    full = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    resumed = report.read_metrics(interrupt_and_resume(tiny_cfg(**extra), 2, monkeypatch))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]


def _state(tail_scale: float) -> dict[str, torch.Tensor]:
    """A rank-8 adapter whose components 4-7 are ``tail_scale`` times components 0-3 (same directions' sizes)."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(8, 20, generator=gen, dtype=torch.float64)
    b = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    b[:, 4:] *= tail_scale
    return {_key("m.q", "A"): a, _key("m.q", "B"): b}


def test_self_pruning_drops_small_trailing_components_by_the_decay_factor():
    small, large = _state(0.01), _state(1.0)
    # by hand: ||B[:, 4:] A[4:]|| against ||B[:, :4] A[:4]||
    for state, expected in ((small, 4), (large, 8)):
        a, b = state[_key("m.q", "A")], state[_key("m.q", "B")]
        ratio = float((b[:, 4:] @ a[4:]).norm() / (b[:, :4] @ a[:4]).norm())
        assert (ratio < 0.5) == (expected == 4)
        assert lora.pruned_rank(state, 8, 0.5, 0.5) == expected
    assert lora.pruned_rank(small, 8, 0.25, 0.5) == 8  # k = 2: components 2-7 hold half the update
    assert lora.pruned_rank(small, 1, 0.5, 0.5) == 1  # a rank-1 client has nothing to drop
    zero = {k: torch.zeros_like(v) for k, v in small.items()}
    assert lora.pruned_rank(zero, 8, 0.5, 0.5) == 8  # nothing trained yet: keep the rank


def test_self_pruned_ranks_travel_and_resume_exactly(tiny_cfg, monkeypatch):
    """With a threshold no update can miss, every client halves its rank each round (2, 4, 8, 16 -> 1, 2, 4, 8 ->
    1, 1, 2, 4); the server decodes the smaller replies, sends the smaller shares, and a resumed run is identical."""
    extra = {**MIXED, "federation.lora_aggregation": "zeropad", "adapter.rank_prune_decay": 0.5,
             "adapter.rank_prune_threshold": 1e9}
    keys = ("train_loss", "eval_loss", "lora_ranks", "bytes_up", "bytes_down")
    full = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    assert [sorted(r["lora_ranks"].values()) for r in full] == [[1, 2, 4, 8], [1, 1, 2, 4]]
    assert all(r["replies"] == 4 and r["dropped"] == 0 for r in full)
    assert full[1]["bytes_up"] < full[0]["bytes_up"] and full[1]["bytes_down"] < full[0]["bytes_down"]
    resumed = report.read_metrics(interrupt_and_resume(tiny_cfg(**extra), 2, monkeypatch))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]


def test_a_resume_whose_nodes_start_with_empty_state_keeps_the_ranks_learned_from_their_replies(tiny_cfg, monkeypatch):
    """As in a deployment (a resumed run is a new Flower run: node state starts empty, the node ids persist), the
    nodes forget the ranks they pruned themselves to; the checkpoint's learned ranks keep sending each node its
    pruned rank, so the resumed run equals the uninterrupted one (it went back to the partitions' ranks before)."""
    from fedpeft.simulation.inprocess import InProcessGrid

    extra = {**MIXED, "federation.lora_aggregation": "zeropad", "adapter.rank_prune_decay": 0.5,
             "adapter.rank_prune_threshold": 1e9, "federation.rounds": 3}
    keys = ("train_loss", "eval_loss", "lora_ranks", "bytes_up", "bytes_down")
    full = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    monkeypatch.delattr(InProcessGrid, "load_node_states")  # the deployment path: nothing restores node state
    resumed = report.read_metrics(interrupt_and_resume(tiny_cfg(**extra), 3, monkeypatch))
    assert [sorted(r["lora_ranks"].values()) for r in resumed] == [[1, 2, 4, 8], [1, 1, 2, 4], [1, 1, 1, 2]]
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]


def test_self_pruning_needs_mixed_ranks(tiny_cfg):
    with pytest.raises(ConfigError, match="rank_prune_decay = 0.5 prunes mixed LoRA ranks"):
        tiny_cfg(**{"federation.lora_aggregation": "zeropad", "adapter.rank_prune_decay": 0.5})


def test_federated_evaluation_sends_each_node_the_adapter_at_its_own_rank(tiny_cfg, monkeypatch):
    """Each node evaluates (and downloads) the truncation its train message gets: a rank-2 node's model has LoRA
    components 2..15 at zero, and the round's evaluate bytes are the sum of each rank's message, not 4 full ones."""
    from fedpeft.clients import app as client_app
    from fedpeft.server import fed_eval
    from fedpeft.server.ranks import RankPlan

    evaluated: list[int] = []
    original = client_app._local_eval

    def local_eval(rt, dataset, cfg):
        a = next(v for k, v in models.adapter_state(rt.model).items() if ".lora_A." in k)
        evaluated.append(int((a.abs().sum(dim=1) > 0).sum()))  # the rank components the node evaluates with
        return original(rt, dataset, cfg)

    monkeypatch.setattr(client_app, "_local_eval", local_eval)
    cfg = tiny_cfg(**{**MIXED, "federation.lora_aggregation": "svd", "data.client_eval_fraction": 0.25,
                      "federation.evaluation": "federated"})
    rows = report.read_metrics(runner.simulate(cfg))
    assert sorted(evaluated) == sorted(RANKS * 2)  # two rounds, one evaluation per node
    assert all(r["fed_eval_replies"] == 4 for r in rows)
    template = runner_template(cfg)
    plan = RankPlan(cfg, [1] * 4, template)
    for rnd, row in enumerate(rows, start=1):
        want = {r: protocol.record_bytes(fed_eval.evaluate_instruction(lora.truncate(template, r), plan.layout_of(r),
                                                                       rnd, rank=r)) for r in RANKS}
        assert row["fed_eval_bytes_down"] == sum(want.values())  # exactly one message of each rank
        assert row["fed_eval_bytes_down"] < 4 * protocol.record_bytes(fed_eval.evaluate_instruction(
            template, plan.layout_of(R), rnd))


def runner_template(cfg) -> dict[str, torch.Tensor]:
    """The run's adapter tensors that travel (zeros: an fp32 payload's size does not depend on the values)."""
    from fedpeft.runtime import PROCESS_RUNTIMES

    return {k: torch.zeros_like(v) for k, v in PROCESS_RUNTIMES.get(cfg).initial_adapter().items()}
