"""An outside attacker: a hostile ClientApp that shares no code with fedpeft's client, encoders or adversary
harness (tests/outside_client.py). It builds well-formed replies from the wire format in docs/robustness.md with
numpy and Flower records only, and sends them through the real ServerApp path: the in-process engine, and a real
TLS deployment in which one registered node runs the attacker's app. The run must complete with the honest
clients' progress, the global adapter finite and within the bound, the checkpoint finite."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from outside_client import (
    BOUND,
    Forge,
    Layout,
    bitmap,
    compeft_at_the_bound,
    compeft_huge_scale,
    dense_poison,
    dense_takeover,
    golomb,
    hostile_app,
    int8_at_the_bound,
    int8_huge_scale,
    pack,
    sign_huge_scale,
    sparse,
    topk_bad_positions,
    topk_huge_values,
)
from test_deploy import Cluster, _cli

from fedpeft import certs, config, protocol, report
from fedpeft.clients.app import app as client_app
from fedpeft.compression import Layout as FedpeftLayout
from fedpeft.compression import make_codec
from fedpeft.deploy import flower, submit
from fedpeft.runtime import get_runtime
from fedpeft.server import checkpoint
from fedpeft.simulation import runner

from conftest import tiny_overrides, write_classification

HOSTILE = 1001  # the in-process node id of partition 1


def public_layout(cfg) -> Layout:
    """Names and shapes only: the public model's adapter, as any node builds it."""
    known = get_runtime(cfg).layout
    return list(zip(known.names, known.shapes))


def density(codec: str) -> float:
    """The density p the attacker reads from the run's uplink spec (``topk:0.2``; 0 for a codec without one)."""
    return float(codec.partition(":")[2] or 0.0)


def attacked_run(cfg, forge: Forge, p: float, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run ``cfg`` in process with partition 1 answering every train message by the attacker's own ClientApp."""
    attacker = hostile_app(public_layout(cfg), forge, p)
    original = type(client_app).__call__

    def call(self, message, context):
        if message.metadata.dst_node_id == HOSTILE and message.metadata.message_type == "train":
            return original(attacker, message, context)  # the attacker's own ClientApp, through Flower's machinery
        return original(self, message, context)

    monkeypatch.setattr(type(client_app), "__call__", call)
    return runner.simulate(cfg)


def global_peak(run_dir: Path) -> float:
    """The largest magnitude of the checkpointed global adapter, after checking every checkpoint tensor is finite."""
    ckpt = checkpoint.load(run_dir / "checkpoint")  # load refuses a non-finite checkpoint; check it ourselves too
    for group, tensors in ckpt.tensors.items():
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values()), group
    return max(float(t.abs().max()) for t in ckpt.tensors["global"].values())


SMALL: Layout = [("a.lora_A", (3, 5)), ("b.lora_B", (7,)), ("c.weight", (2, 9))]  # 40 elements, three tensors


def _sparse_cases() -> list[tuple[str, bytes, np.ndarray]]:
    """Hand-built topk / compeft payloads of SMALL at p = 0.5 with both positions codings, and what they hold."""
    pos = np.array([0, 1, 4, 9, 14, 15, 16, 22, 30, 39])  # runs, short and long gaps, the first and last element
    half = np.array([1.0, -2.0, 0.5, 3.0, -0.25, 8.0, -1.5, 0.75, 2.5, -4.0], "<f2")
    negative = half < 0
    scales = np.array([0.5, 2.0, 0.125], "<f4")
    tensor = np.searchsorted([15, 22, 40], pos, side="right")  # which tensor each position falls in
    cases = []
    for coding, name in [(None, "bitmap"), (1, "golomb m=1"), (2, "golomb m=2"), (3, "golomb m=3"), (6, "golomb m=6")]:
        fields, streams = (0, 0, 0, 0), bitmap(40, pos)
        if coding is not None:
            fields, streams = golomb(pos, coding)
        top = np.zeros(40, np.float32)
        top[pos] = half
        cases.append((f"topk:0.5 {name}", sparse("topk", SMALL, 0.5, pos.size, streams, half, coding=fields), top))
        ternary = np.zeros(40, np.float32)
        ternary[pos] = np.where(negative, -scales[tensor], scales[tensor])
        signs = np.packbits(negative.astype("u1"))
        cases.append((f"compeft:0.5 {name}", sparse("compeft", SMALL, 0.5, pos.size, streams, signs, scales,
                                                    coding=fields), ternary))
    return cases


def _dense_cases() -> list[tuple[str, bytes, np.ndarray]]:
    values = np.linspace(-1, 1, 40).astype("<f4")
    codes = np.arange(-20, 20).astype("i1")
    int8_scales = np.array([0.1, 1.0, 0.01], "<f4")
    sign_scales = np.array([0.5, 2.0, 0.125], "<f4")
    per_element = np.repeat(np.arange(3), [15, 7, 18])
    signs = np.packbits((values < 0).astype("u1"))
    return [("none", pack("none", SMALL, values), values),
            ("int8", pack("int8", SMALL, codes, int8_scales), codes * int8_scales[per_element]),
            ("sign", pack("sign", SMALL, signs, sign_scales),
             np.where(values < 0, -sign_scales[per_element], sign_scales[per_element]))]


@pytest.mark.parametrize("spec, data, expected", _dense_cases() + _sparse_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_the_documented_layouts_decode_to_what_the_builder_meant(spec, data, expected):
    """The wire-format section is enough: every payload built from it alone decodes in fedpeft to the intended
    values (bitmap and Golomb positions, with m = 1, 2, 3 and 6 exercising every stream)."""
    layout = FedpeftLayout(tuple(n for n, _ in SMALL), tuple(s for _, s in SMALL))
    decoded = make_codec(spec.split()[0]).decode(protocol.unpack_payload(data), layout)
    flat = np.concatenate([decoded[name].reshape(-1).numpy() for name, _ in SMALL])
    assert np.array_equal(flat, expected.astype(np.float32))


@pytest.mark.slow  # ten 3-round runs of the real ServerApp path
@pytest.mark.parametrize("codec, forge, sanity, seen", [
    ("int8", int8_huge_scale, {}, "decodes beyond the bound"),
    ("int8", int8_at_the_bound, {}, "out of bounds"),
    ("int8", int8_at_the_bound, {"sanity.norm_action": "clip"}, "clipped"),
    ("none", dense_poison, {}, "beyond the bound"),
    ("none", dense_takeover, {}, "not below sanity.max_num_examples"),
    ("compeft:0.2", compeft_huge_scale, {}, "compeft scale 3e+38 x level 1 decodes beyond the bound"),
    ("sign", sign_huge_scale, {}, "sign scale 3e+38 x level 1 decodes beyond the bound"),
    ("topk:0.2", topk_huge_values, {}, "topk payload decodes to values in [-6.55e+04, 6.55e+04], beyond the bound"),
    ("compeft:0.2", compeft_at_the_bound, {}, "out of bounds"),
    ("compeft:0.2", compeft_at_the_bound, {"sanity.norm_action": "clip"}, "clipped"),
])
def test_a_reply_built_from_the_docs_cannot_take_the_federation_over(tiny_cfg, monkeypatch, caplog, one_thread,
                                                                     codec, forge, sanity, seen):
    cfg = tiny_cfg(**{"compression.uplink": codec, **sanity})
    caplog.set_level(logging.INFO)
    run_dir = attacked_run(cfg, forge, density(codec), monkeypatch)

    rows = report.read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    clipped = "sanity.norm_action" in sanity
    assert [(r["replies"], r["dropped"]) for r in rows] == [(3, 0) if clipped else (2, 1)] * 3
    assert seen in caplog.text
    peak = global_peak(run_dir)
    assert peak <= BOUND
    if clipped:  # the attacker's update counts, scaled to 10x the round's median norm: the adapter moves boundedly
        assert all(r["sanity_clipped"] == 1 for r in rows) and peak < 10
    else:  # dropped every round: the honest clients' progress (3 balanced topics, chance is 1/3)
        assert rows[-1]["eval_accuracy"] > 0.55


@pytest.mark.slow  # one 3-round run
def test_forged_topk_positions_are_refused_by_the_decoder_itself(tiny_cfg, monkeypatch, caplog, one_thread):
    """Out-of-range, repeated and too many positions are malformed whatever ``sanity.enabled`` says: they are
    refused with the sanity checks off (with them on, the same decoder checks run first)."""
    cfg = tiny_cfg(**{"compression.uplink": "topk:0.2", "sanity.enabled": False})
    caplog.set_level(logging.INFO)
    run_dir = attacked_run(cfg, topk_bad_positions, 0.2, monkeypatch)

    rows = report.read_metrics(run_dir)
    assert [(r["round"], r["replies"], r["dropped"]) for r in rows] == [(1, 2, 1), (2, 2, 1), (3, 2, 1)]
    for rnd, why in ((1, "unary length"), (2, "position bitmap has 1 set bits, header says 2"), (3, "payload keeps")):
        assert f"round {rnd}: dropped the update of node {HOSTILE}: {why}" in caplog.text
    assert global_peak(run_dir) <= BOUND and rows[-1]["eval_accuracy"] > 0.55


@pytest.mark.slow  # four 1-round runs
@pytest.mark.parametrize("codec, forge, floor", [
    ("compeft:0.2", compeft_huge_scale, BOUND),
    ("sign", sign_huge_scale, BOUND),
    ("topk:0.2", topk_huge_values, BOUND),
    ("compeft:0.2", compeft_at_the_bound, 0.1 * BOUND),
])
def test_without_sanity_the_same_replies_do_take_the_adapter(tiny_cfg, monkeypatch, one_thread, codec, forge, floor):
    """The control: with ``sanity.enabled = false`` the compressed replies above are accepted and move the global
    adapter far beyond anything honest (so the test above fails without the sanity checks)."""
    cfg = tiny_cfg(**{"compression.uplink": codec, "sanity.enabled": False, "federation.rounds": 1})
    run_dir = attacked_run(cfg, forge, density(codec), monkeypatch)
    (row,) = report.read_metrics(run_dir)
    assert (row["replies"], row["dropped"]) == (3, 0)
    assert global_peak(run_dir) > floor


# ---------------------------------------------------------------------------------- a real deployment

def hostile_python_path(root: Path) -> str:
    """A Python path on which ``fedpeft.clients.app`` (the app's ``clientapp`` reference) is the attacker's app."""
    app_module = root / "fedpeft" / "clients"
    app_module.mkdir(parents=True)
    (root / "fedpeft" / "__init__.py").write_text("")
    (app_module / "__init__.py").write_text("")
    (app_module / "app.py").write_text("from outside_client import app  # noqa: F401\n")
    return os.pathsep.join([str(root), str(Path(__file__).parent)])


@pytest.mark.slow
def test_a_hostile_node_of_a_real_deployment_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SuperLink, two honest SuperNodes (``fedpeft node``) and a third, registered node that runs plain
    ``flower-supernode`` with the attacker's ClientApp on its Python path; TLS and node auth on. The server side is
    the unmodified deployment path (``fedpeft run``): the hostile ComPEFT reply (scale 3e38) is dropped every round
    with a log line, the honest nodes' updates make the progress, and the checkpoint stays finite."""
    pki = certs.make_certs("localhost", tmp_path / "certs")
    keys = {n: certs.make_node_key(tmp_path / "keys", name=n) for n in ("a", "b", "hostile")}
    data = write_classification(tmp_path / "all.jsonl", n=240)
    cfg_sets = tiny_overrides(data, tmp_path / "runs", **{
        "data.num_clients": 3, "federation.rounds": 3,
        "federation.round_timeout": 60.0, "federation.node_wait_timeout": 90.0,
        "compression.uplink": "compeft:0.2", "run.threads": 1})
    layout_file = tmp_path / "layout.json"  # the public model's adapter names and shapes, as the attacker knows them
    layout_file.write_text(json.dumps(public_layout(config.load(None, cfg_sets))))
    cluster = Cluster(tmp_path)
    try:
        address, cli_home = cluster.tls_superlink(pki, [key.public for key in keys.values()])
        for i, name in enumerate("ab"):
            cluster.start(name, _cli("node", "--superlink", address, "--ca", pki.ca_cert, "--key", keys[name].private,
                                     "--port", flower.free_port(), "--partition-id", i, "--warm"),
                          tmp_path / f"home-{name}")
        with monkeypatch.context() as env:  # only the hostile node's processes see its Python path
            env.setenv("PYTHONPATH", hostile_python_path(tmp_path / "hostile-path"))
            cluster.start("hostile", [
                flower.flower_bin("flower-supernode"), "--superlink", address, "--port", str(flower.free_port()),
                "--root-certificates", str(pki.ca_cert), "--auth-supernode-private-key", str(keys["hostile"].private),
                "--node-config", f'layout-file="{layout_file}" forge="compeft_huge_scale" p=0.2'],
                tmp_path / "home-hostile")
        out = subprocess.run(_cli("run", "--superlink", address, "--ca", pki.ca_cert, "--flwr-home", cli_home,
                                  *[a for s in cfg_sets for a in ("--set", s)]),
                             capture_output=True, text=True, timeout=120, env=flower.flower_env(cli_home))
        assert out.returncode == 0, out.stderr
        submitted = json.loads(out.stdout.strip().splitlines()[-1])
        run_id, run_dir = int(submitted["run_id"]), Path(submitted["run_dir"])
        status = submit.wait(cli_home, run_id, timeout=300)
        logs = submit.logs(cli_home, run_id)
        assert status == "finished:completed", logs + cluster.log("hostile")

        rows = report.read_metrics(run_dir)
        assert [(r["round"], r["replies"], r["dropped"]) for r in rows] == [(1, 2, 1), (2, 2, 1), (3, 2, 1)], (
            logs + cluster.log("hostile"))
        assert "compeft scale 3e+38 x level 1 decodes beyond the bound" in logs
        assert logs.count("dropped the update of node") == 3
        assert global_peak(run_dir) <= BOUND
        assert rows[-1]["eval_accuracy"] > 0.55, rows
    finally:
        cluster.stop()
