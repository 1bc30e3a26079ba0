"""SecAgg+ (Flower's SecAggPlusWorkflow + secaggplus_mod) on our training round, in-process engine.

The same seeded round runs plain and under SecAgg+: the aggregates agree within the error that
SecAgg+'s weight and stochastic quantization can introduce (bound computed from its parameters), the
server never receives an individual update (only masked integers), a client that never answers the
masked-vector stage leaves a round that still finishes, a lossy downlink codec reaches the clients as in a
plain run, and incompatible settings are refused.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from fedpeft import config, protocol
from fedpeft.clients.app import app as client_app
from fedpeft.compression import make_codec
from fedpeft.errors import ConfigError
from fedpeft.server.loop import FederatedServer
from fedpeft.simulation import runner
from fedpeft.simulation.inprocess import InProcessGrid, node_id

from conftest import tiny_overrides, write_classification

SECAGG = {"privacy.secure_aggregation": "secaggplus"}


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every message the server sends and receives (what the loop sees).
    ``drop`` = (node, stage): that node never answers that SecAgg+ stage (its reply is lost)."""

    def __init__(self, *args, drop: tuple[int, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop = drop
        self.sent, self.seen = [], []  # sent: (destination, stage, serialized bytes) as pushed

    def push_messages(self, messages):
        ids = []
        for msg in messages:  # a client edits what it receives, so record it before delivery
            cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = cfg.get(Key.STAGE) if cfg is not None else None
            self.sent.append((msg.metadata.dst_node_id, stage, protocol.record_bytes(msg.content)))
            if self.drop and (msg.metadata.dst_node_id, stage) == self.drop:
                ids.append(uuid.uuid4().hex)  # delivered, never answered
            else:
                ids.extend(super().push_messages([msg]))
        return ids

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.seen.extend(replies)
        return replies


def one_round(cfg: config.Config, run_dir: Path, drop: tuple[int, str] | None = None):
    """Run round 1 of ``cfg`` on a RecordingGrid; returns (server, grid, metrics row, initial global)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    run_dir.mkdir(parents=True, exist_ok=True)
    server = FederatedServer(cfg, run_dir, simulation=True)  # seeded DP noise, as simulate runs
    start = {k: v.clone() for k, v in server.global_state.items()}
    grid = RecordingGrid(client_app, cfg.data.num_clients, runner.run_config(cfg, run_dir, False), drop=drop)
    row = server.run_round(grid, 1)
    return server, grid, row, start


def flat(state, names) -> np.ndarray:
    return np.concatenate([state[n].double().numpy().ravel() for n in names])


def secagg_bound(weights, max_weight, deltas, c, q) -> float:
    """Largest per-element error of SecAgg+'s weighted mean vs the exact one: stochastic rounding (< one
    level 2c/Q per client) plus the quantized weights round(w/W*Q)/Q, both divided by the summed weight,
    plus float32 rounding of the stored global adapter."""
    d = np.array([round(w / max_weight * q) / q for w in weights])
    n, big = len(weights), max(float(np.abs(x).max()) for x in deltas)
    return n * (2 * c / q) / d.sum() + big * n / (q * d.sum()) + 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("secagg")
    return write_classification(base / "topics.jsonl"), base


def make_cfg(data, **extra) -> config.Config:
    path, base = data
    sets = {"data.partition": "quantity", "federation.rounds": 1, **extra}
    return config.load(None, tiny_overrides(path, base / "runs", **sets))


@pytest.fixture(scope="module")
def plain(data):
    """The plain round: per-client decoded deltas and weights as the plain server received them."""
    cfg = make_cfg(data)
    server, grid, row, start = one_round(cfg, data[1] / "plain")
    codec, names = make_codec("none"), server.layout.names
    clients = {}
    for reply in grid.seen:
        payload, metrics = protocol.parse_reply(reply.content)
        clients[reply.metadata.src_node_id] = (flat(codec.decode(payload, server.layout), names),
                                               metrics["num-examples"])
    mean = flat(server.global_state, names) - flat(start, names)
    return {"clients": clients, "mean": mean, "row": row, "names": names}


def weighted(clients, nodes):
    w = np.array([clients[n][1] for n in nodes])
    return sum(clients[n][0] * wi for n, wi in zip(nodes, w)) / w.sum(), list(w)


def test_secagg_round_equals_the_plain_round_within_the_quantization_bound(data, plain):
    cfg = make_cfg(data, **SECAGG)
    server, grid, row, start = one_round(cfg, data[1] / "secagg")
    assert row["replies"] == 3 and row["dropped"] == 0 and row["secagg_clipped"] == 0
    weights = [c[1] for c in plain["clients"].values()]
    assert len(set(weights)) == 3  # unequal weights, so a wrong weighting would show
    mean = flat(server.global_state, plain["names"]) - flat(start, plain["names"])
    p = cfg.privacy
    bound = secagg_bound(weights, server.secagg.max_weight, [c[0] for c in plain["clients"].values()],
                         p.secagg_clipping_range, p.secagg_quantization_range)
    err = float(np.abs(mean - plain["mean"]).max())
    assert err <= bound, (err, bound)
    assert bound < 0.01 * float(np.abs(plain["mean"]).max())  # the bound is tight enough to mean something
    # bytes: every SecAgg+ message of the round, both directions, as serialized by Flower
    assert row["bytes_up"] == sum(protocol.record_bytes(r.content) for r in grid.seen)
    assert row["bytes_down"] == sum(size for _, _, size in grid.sent)
    stages = Stage.all()
    assert all(row[f"secagg_up_{s}"] > 0 and row[f"secagg_down_{s}"] > 0 for s in stages)
    assert len(grid.sent) == 4 * 3  # four stages x three clients
    assert row["bytes_up"] > plain["row"]["bytes_up"]  # masked int64 vectors cost more than fp32


def test_the_server_never_receives_an_individual_update(data, plain):
    cfg = make_cfg(data, **SECAGG)
    server, grid, row, _ = one_round(cfg, data[1] / "secagg-seen")
    masked_seen = 0
    for reply in grid.seen:
        content = reply.content
        assert protocol.UPDATE not in content  # no fedpeft payload at all
        for name, record in content.array_records.items():
            assert len(record) == 0, name  # Flower's mod empties the FitRes parameters
        stage_reply = content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in stage_reply:
            masked_seen += 1
            factor, vector = (bytes_to_ndarray(b) for b in stage_reply[Key.MASKED_PARAMETERS])
            delta, weight = plain["clients"][reply.metadata.src_node_id]
            assert vector.shape == delta.shape
            # uniform over [0, modulus): no trace of the update (the plain delta would correlate ~1)
            assert abs(np.corrcoef(vector.astype(np.float64), delta)[0, 1]) < 0.15
            assert vector.max() > cfg.privacy.secagg_modulus_range // 2
            assert factor[0] != round(weight / server.secagg.max_weight * cfg.privacy.secagg_quantization_range)
    assert masked_seen == 3


def assert_survivors_mean(cfg, server, start, plain, dropped: int) -> tuple[np.ndarray, float]:
    """The round's mean equals the weighted mean of the survivors' plain updates within the SecAgg+ bound."""
    survivors = sorted(n for n in plain["clients"] if n != dropped)
    expected, weights = weighted(plain["clients"], survivors)
    mean = flat(server.global_state, plain["names"]) - flat(start, plain["names"])
    p = cfg.privacy
    bound = secagg_bound(weights, server.secagg.max_weight, [plain["clients"][n][0] for n in survivors],
                         p.secagg_clipping_range, p.secagg_quantization_range)
    assert float(np.abs(mean - expected).max()) <= bound
    return mean, bound


DROPOUT_OK = {"privacy.secagg_min_survivors": 2}  # these tests release a sum of two on purpose (see below)


def test_a_round_whose_sum_holds_fewer_than_the_minimum_survivors_releases_nothing(data):
    """The fault: a 3-client round with one dropout released a sum of two, from which each of the two can
    subtract its own update and learn the other's. By default (3) such a round releases nothing, and the server
    does not learn that sum either: the round stops before the unmask stage (Flower's reconstruction threshold,
    2 of 3 shares here, would have let it unmask; distributed DP accounts for 3 noise shares in any sum)."""
    cfg = make_cfg(data, **SECAGG)
    server, grid, row, start = one_round(cfg, data[1] / "secagg-min", drop=(node_id(1), Stage.COLLECT_MASKED_VECTORS))
    assert row["replies"] == 0 and row["train_loss"] is None and row["secagg_withheld"] == 1
    assert all(torch.equal(server.global_state[k], start[k]) for k in start)
    assert not [node for node, stage, _ in grid.sent if stage == Stage.UNMASK]
    assert "not unmasked" in row["dropped_nodes"][str(node_id(0))]


def test_a_client_dropping_out_of_the_masked_vector_stage_still_lets_the_round_finish(data, plain):
    cfg = make_cfg(data, **SECAGG, **DROPOUT_OK)
    victim = node_id(1)
    server, grid, row, start = one_round(cfg, data[1] / "secagg-drop", drop=(victim, Stage.COLLECT_MASKED_VECTORS))
    assert row["replies"] == 2 and row["dropped"] == 1 and row["train_loss"] is not None
    mean, bound = assert_survivors_mean(cfg, server, start, plain, victim)
    survivors = sorted(n for n in plain["clients"] if n != victim)
    assert float(np.abs(mean - plain["mean"]).max()) > 10 * bound  # the victim's update is really out
    # a node that never answered the masked stage is asked for nothing more
    unmask_to = [node for node, stage, _ in grid.sent if stage == Stage.UNMASK]
    assert sorted(unmask_to) == survivors


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS])
def test_an_early_dropout_is_left_out_of_the_sum(data, plain, stage):
    """Flower 1.41 alone halts here (survivors are asked for shares they never got); see _SecAggPlus."""
    cfg = make_cfg(data, **SECAGG, **DROPOUT_OK)
    server, grid, row, start = one_round(cfg, data[1] / f"secagg-{stage}", drop=(node_id(0), stage))
    assert row["replies"] == 2 and row["dropped"] == 1
    assert_survivors_mean(cfg, server, start, plain, node_id(0))


def test_too_many_dropouts_leave_the_global_adapter_unchanged(data):
    cfg = make_cfg(data, **SECAGG, **{"privacy.secagg_reconstruction_threshold": 1.0})
    server, grid, row, start = one_round(cfg, data[1] / "secagg-halt2", drop=(node_id(0), Stage.SETUP))
    assert row["replies"] == 0 and row["train_loss"] is None
    assert all(torch.equal(server.global_state[k], start[k]) for k in start)


def test_client_level_dp_under_secagg_matches_the_plain_dp_round(data):
    dp = {"privacy.mode": "client", "privacy.clip_norm": 0.05, "privacy.server_noise_multiplier": 0.2,
          "privacy.adaptive_clip": True, "privacy.delta": 1e-3}
    plain_cfg = make_cfg(data, **dp)
    ps, pgrid, prow, pstart = one_round(plain_cfg, data[1] / "dp-plain")
    cfg = make_cfg(data, **dp, **SECAGG)
    server, grid, row, start = one_round(cfg, data[1] / "dp-secagg")
    names = server.layout.names
    # the same seeded noise is added to (sum of clipped updates) / m on both paths
    a = flat(server.global_state, names) - flat(start, names)
    b = flat(ps.global_state, names) - flat(pstart, names)
    p, m = cfg.privacy, 3
    slack = server.secagg.slack
    bound = m * 2 * p.secagg_clipping_range / p.secagg_quantization_range / m + 3 * slack / m + 1e-6
    assert float(np.abs(a - b).max()) <= bound
    assert row["clip_norm"] == prow["clip_norm"] and row["epsilon_client"] == pytest.approx(prow["epsilon_client"])
    assert server.privacy.clip_norm == pytest.approx(ps.privacy.clip_norm)  # same securely summed indicator count
    for reply in grid.seen:  # per-client norms and clip indicators never travel in the clear
        for record in reply.content.config_records.values():
            assert "update-norm" not in record and "clip-indicator" not in record


def test_a_lossy_downlink_reaches_the_clients_under_secagg_as_in_a_plain_run(data):
    """The global adapter travels inside SecAgg+'s masked-vector stage, coded by the downlink codec as in a plain
    round. Round 1 downloads the whole adapter, round 2 the coded change, so two rounds: the SecAgg+ run with
    ``compeft:0.3`` follows the plain run with the same codec to SecAgg+'s quantization error, far closer than
    a SecAgg+ run whose clients get the dense adapter, and its round-2 download saves what the plain one saves.
    Plain SGD keeps the runs' small differences small (AdamW's normalisation can amplify them)."""
    sgd = {"federation.rounds": 2, "train.optimizer": "sgd", "train.lr": 0.5}
    coded = {"compression.downlink": "compeft:0.3"}
    runs = {}
    arms = {"plain": coded, "plain-dense": {}, "secagg": {**SECAGG, **coded}, "secagg-dense": SECAGG}
    for name, extra in arms.items():
        server, grid, _, start = one_round(make_cfg(data, **sgd, **extra), data[1] / f"downlink-{name}")
        row = server.run_round(grid, 2)
        names = server.layout.names
        runs[name] = (flat(server.global_state, names) - flat(start, names), row["bytes_down"])
    err = float(np.abs(runs["secagg"][0] - runs["plain"][0]).max())
    ignored = float(np.abs(runs["secagg-dense"][0] - runs["plain"][0]).max())  # what a dropped codec would give
    assert err < 1e-4 and err < ignored / 100, (err, ignored)
    saved = runs["secagg-dense"][1] - runs["secagg"][1]
    assert saved == pytest.approx(runs["plain-dense"][1] - runs["plain"][1], rel=0.01) and saved > 0


@pytest.mark.parametrize("extra, match", [
    ({"compression.uplink": "compeft:0.1"}, "compression.uplink"),
    ({"compression.uplink": "fp16"}, "compression.uplink"),
    ({"federation.clients_per_round": 2}, "at least 3 clients"),
    ({"privacy.secagg_modulus_range": 3 * 2**20}, "power of 2"),
    ({"privacy.secagg_quantization_range": 2**31}, "would wrap around"),
    ({"privacy.secagg_num_shares": 2.5}, "whole number"),
    ({"privacy.secagg_num_shares": 3, "privacy.secagg_reconstruction_threshold": 3}, "below privacy.secagg_num"),
    ({"data.num_clients": 6, "federation.clients_per_round": 6, "privacy.secagg_num_shares": 4}, "must be odd"),
    ({"privacy.secure_aggregation": "secagg"}, "choose one of"),
    ({"privacy.secagg_bits": 1}, "is no grid"),  # passed, then Flower's workflow raised at the run's start
    ({"privacy.mode": "client", "privacy.adaptive_clip": True, "privacy.clip_count_noise": 1.0,
      "privacy.secagg_clipping_range": 0.5}, "clip indicators"),
])
def test_incompatible_settings_are_refused(data, extra, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(data, **{**SECAGG, **extra})


def test_rounding_slack_is_what_the_clients_clip_away():
    from fedpeft.server.secagg import rounding_slack

    assert rounding_slack(10_000, 8.0, 2**22) == pytest.approx(100 * 16 / 2**22)
    assert math.isclose(rounding_slack(1, 1.0, 2), 1.0)
