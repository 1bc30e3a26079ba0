"""Per-node LoRA ranks in a deployment (adapter.rank_rule = "node"): the node config carries the rank, the server
learns it from each reply and refuses a reply whose declared rank or shape does not fit, and a real SuperLink with
two SuperNodes of ranks 2 and 8 runs svd rounds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from flwr.app import Message, Metadata
from test_deploy import Cluster, _cli

from fedpeft import config, lora, protocol
from fedpeft.compression import Layout, make_codec
from fedpeft.deploy import flower, launch
from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.server.ranks import RankPlan
from fedpeft.server.replies import RoundReplies
from fedpeft.simulation import runner

from conftest import tiny_overrides, write_classification

R = 8
NODE = {"adapter.r": R, "adapter.rank_rule": "node", "federation.lora_aggregation": "svd"}


def _template() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"m.q.lora_A.default.weight": torch.randn(R, 6, generator=gen),
            "m.q.lora_B.default.weight": torch.randn(5, R, generator=gen),
            "head.weight": torch.randn(3, 5, generator=gen)}


def _reply(node: int, payload_rank: int, metrics: dict[str, float]) -> Message:
    """A real Flower reply from ``node`` whose payload holds a rank-``payload_rank`` update."""
    delta = {k: torch.full_like(v, 0.01) for k, v in lora.truncate(_template(), payload_rank).items()}
    payload = make_codec("none").encode(delta, Layout.from_state(delta))
    meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="m",
                    group_id="1", created_at=0.0, ttl=60.0, message_type=protocol.TRAIN)
    return Message(content=protocol.train_reply(payload, {"num-examples": 10.0, **metrics}), metadata=meta)


def test_node_config_carries_the_rank() -> None:
    opts = launch.NodeOptions("h:9092", partition_id=1, rank=4)
    assert launch.node_config(opts) == "partition-id=1 rank=4 deployed=true"
    limited = launch.NodeOptions("h:9092", partition_id=1, max_epsilon=3)
    assert launch.node_config(limited) == "partition-id=1 max-epsilon=3.0 deployed=true"
    with pytest.raises(FedPeftError, match="--max-epsilon 0"):
        launch.node_config(launch.NodeOptions("h:9092", partition_id=1, max_epsilon=0))
    with pytest.raises(FedPeftError, match="--rank 0"):
        launch.node_config(launch.NodeOptions("h:9092", partition_id=1, rank=0))


def test_the_server_learns_each_rank_from_the_replies_and_drops_a_lying_node(tiny_cfg, caplog) -> None:
    plan = RankPlan(tiny_cfg(**NODE), [10, 10], _template())
    plan.bind(None)  # a deployment: no partition map
    assert plan.rank(7) == plan.rank(9) == R  # not heard from yet: the whole adapter
    replies = RoundReplies()
    uplink = make_codec("none")
    for reply in (_reply(1, 2, {"lora-rank": 2}),  # honest, rank 2
                  _reply(2, 8, {"lora-rank": 2}),  # declares 2, sends rank 8: the shape does not match
                  _reply(3, 4, {"lora-rank": 16}),  # above the rank it was sent (and adapter.r)
                  _reply(4, 4, {}),  # declares nothing
                  _reply(5, 4, {"lora-rank": 4.5})):
        replies.add(reply, uplink, plan.reply_layout, 1)
    assert replies.nodes == [1]
    assert "fingerprint" in replies.dropped[2] or "layout" in replies.dropped[2], replies.dropped[2]
    assert "lora-rank = 16 is not between 1 and the rank 8" in replies.dropped[3]
    assert "declares no 'lora-rank'" in replies.dropped[4] and "4.5" in replies.dropped[5]
    assert "dropped the update of node 2" in caplog.text
    plan.learn(replies)
    assert plan.rank(1) == 2 and plan.rank(2) == R  # only a valid reply teaches the server a rank
    sent = plan.contents(_template(), [1, 2], 2, {"round": 2})
    a = make_codec("none").decode(protocol.record_payload(sent[1][protocol.GLOBAL]), plan.layout_of(2))
    assert a["m.q.lora_A.default.weight"].shape[0] == 2  # node 1 is now sent its own rank
    assert protocol.config_record(sent[2])["lora-rank"] == R
    later = RoundReplies()
    later.add(_reply(1, 4, {"lora-rank": 4}), uplink, plan.reply_layout, 2)  # grows beyond what it was sent
    assert not later.nodes and "rank 2 the node was sent" in later.dropped[1]
    plan.restore(plan.state())
    assert plan.learned == {1: 2}


@pytest.mark.parametrize(("extra", "needle"), [
    ({"adapter.client_ranks": [2, 8]}, "leave adapter.client_ranks empty"),
    ({"federation.lora_aggregation": "naive"}, "choose one of: 'svd', 'svd_delta', 'zeropad', 'stack'"),
    ({"compression.downlink": "int8"}, "lossless compression.downlink"),
])
def test_node_ranks_refuse_what_cannot_carry_them(tiny_cfg, extra, needle) -> None:
    with pytest.raises(ConfigError, match="rank_rule") as e:
        tiny_cfg(**{**NODE, **extra})
    assert needle in str(e.value)


def test_node_ranks_need_node_configs_so_a_simulation_refuses_them(tiny_cfg) -> None:
    with pytest.raises(FedPeftError, match="simulated nodes have none"):
        runner.simulate(tiny_cfg(**NODE, **{"federation.rounds": 1}))


def run_two_nodes(tmp_path: Path, extra: dict, node_args: list[list]) -> tuple[list[str], Path]:
    """A 2-round run of the tiny scenario (with ``extra``) on a real insecure SuperLink and two warm ``fedpeft node``
    SuperNodes on partitions 0 and 1 (each with its ``node_args``), all torn down after; (the overrides, run dir).
    Warm, as a per-message ClientApp process would cost each round two imports of torch and transformers; the cold
    path has its own deployment tests in test_deploy.py."""
    port = flower.free_port()
    cluster = Cluster(tmp_path)
    data = write_classification(tmp_path / "all.jsonl", n=120)
    sets = tiny_overrides(data, tmp_path / "runs", **{
        "data.num_clients": 2, "federation.rounds": 2, "federation.node_wait_timeout": 120.0, "run.threads": 1,
        "federation.round_timeout": 180.0, **extra})
    try:
        link = cluster.start("superlink", _cli("superlink", "--host", "127.0.0.1", "--port", port, "--insecure",
                                               "--no-auth"), tmp_path / "home-link")
        flower.wait_healthy(port, link)
        for i, own in enumerate(node_args):
            cluster.start(f"n{i}", _cli("node", "--superlink", f"127.0.0.1:{port}", "--insecure", "--port",
                                        flower.free_port(), "--partition-id", i, "--warm", *own),
                          tmp_path / f"home-n{i}")
        home = tmp_path / "home-cli"
        out = subprocess.run(_cli("run", "--superlink", f"127.0.0.1:{port}", "--insecure", "--flwr-home", home,
                                  "--wait", *[a for s in sets for a in ("--set", s)]),
                             capture_output=True, text=True, timeout=600, env=flower.flower_env(home))
        assert out.returncode == 0, out.stdout + out.stderr + cluster.log("n0") + cluster.log("n1")
    finally:
        cluster.stop()
    return sets, Path(json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("{")))["run_dir"])


@pytest.mark.slow
def test_two_deployed_nodes_of_ranks_2_and_8_run_svd_rounds(tmp_path: Path) -> None:
    """Real SuperLink + two SuperNodes (fedpeft node --rank 2 / --rank 8) under adapter.r = 16: round 1 sends
    both the whole adapter, then each node is sent its own rank (the downlink shrinks by exactly the rank-16
    shares less the rank-2 and rank-8 ones), every reply is aggregated, and the checkpoint holds the ranks."""
    from fedpeft.runtime import Runtime
    from fedpeft.server import checkpoint

    sets, run_dir = run_two_nodes(tmp_path, {"adapter.r": 16, "adapter.rank_rule": "node",
                                             "federation.lora_aggregation": "svd"},
                                  [["--rank", 2], ["--rank", 8]])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["replies"] for r in rows] == [2, 2] and all(r["dropped"] == 0 for r in rows)
    assert all(r["lora_agg_error"] is not None and r["lora_svd_error"] is not None for r in rows)
    learned = checkpoint.load(run_dir / "checkpoint").extra["lora_ranks"]
    assert sorted(learned.values()) == [2, 8]
    template = Runtime(config.load(None, sets)).initial_adapter()
    elements = {r: Layout.from_state(lora.truncate(template, r)).total for r in (2, 8, 16)}
    saved = 4 * (2 * elements[16] - elements[2] - elements[8])  # fp32 bytes no longer sent in round 2
    assert rows[0]["bytes_down"] - rows[1]["bytes_down"] == pytest.approx(saved, rel=0.01)
