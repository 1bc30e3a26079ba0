"""An outside attacker: a hostile ClientApp that shares no code with fedpeft's client, encoders or adversary
harness. It builds well-formed replies from the wire format in docs/robustness.md with numpy and Flower records
only, and sends them through the real ServerApp path (the in-process engine); the run must complete with the
honest clients' progress, the global adapter finite and within the bound, the checkpoint finite."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft import report
from fedpeft.clients.app import app as client_app
from fedpeft.runtime import get_runtime
from fedpeft.server import checkpoint
from fedpeft.simulation import runner

HOSTILE = 1001  # the in-process node id of partition 1
BOUND = 1e4  # the default sanity.decode_bound and sanity.max_global_value
MAGIC = 0x46504546544301
CODEC_IDS = {"none": 1, "int8": 4}
Layout = list[tuple[str, tuple[int, ...]]]


def fingerprint(layout: Layout) -> int:
    """BLAKE2b-64 of the "name:shape" lines, read as a little-endian signed int64 (the documented recipe)."""
    text = "\n".join(f"{name}:{shape}" for name, shape in layout).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)


def pack(codec: str, layout: Layout, values: np.ndarray, scales: np.ndarray | None = None) -> bytes:
    """Preamble (three uint32 section lengths) + int64 header + values + float32 scales, little-endian."""
    scales = np.zeros(0, "<f4") if scales is None else scales.astype("<f4")
    total = sum(int(np.prod(shape)) for _, shape in layout)
    header = np.array([MAGIC, CODEC_IDS[codec], len(layout), total, fingerprint(layout), 0, values.nbytes,
                       scales.size], dtype="<i8").tobytes()
    sections = [header, values.tobytes(), scales.tobytes()]
    return np.array([len(s) for s in sections], dtype="<u4").tobytes() + b"".join(sections)


def received_header(msg: Message) -> np.ndarray:
    """The int64 header of the global adapter the server sent (unpacked by the same documented layout)."""
    data = msg.content["global"]["payload"].data
    header_bytes = int(np.frombuffer(data[:4], dtype="<u4")[0])
    return np.frombuffer(data[12:12 + header_bytes], dtype="<i8")


Forge = Callable[[Layout], tuple[bytes, float]]  # layout -> (packed payload, claimed num-examples)


def hostile_app(layout: Layout, forge: Forge) -> ClientApp:
    """A ClientApp of the attacker's own: checks its layout against the server's header, replies with ``forge``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        header = received_header(msg)
        assert header[0] == MAGIC and header[4] == fingerprint(layout)  # the docs were enough to match the layout
        data, claim = forge(layout)
        array = Array(dtype="uint8", shape=(len(data),), stype="raw", data=data)
        content = RecordDict({"update": ArrayRecord({"payload": array}),
                              "metrics": MetricRecord({"num-examples": claim, "train-loss": 0.1})})
        return Message(content, reply_to=msg)

    return app


def int8_huge_scale(layout: Layout) -> tuple[bytes, float]:
    """Every code 127 with a finite scale of 3e38: 127 x scale is no float32."""
    total = sum(int(np.prod(s)) for _, s in layout)
    return pack("int8", layout, np.full(total, 127, "i1"), np.full(len(layout), 3e38)), 100.0


def int8_at_the_bound(layout: Layout) -> tuple[bytes, float]:
    """Every element 127 x scale just inside the decode bound: decodes, but its norm is far beyond the honest."""
    total = sum(int(np.prod(s)) for _, s in layout)
    return pack("int8", layout, np.full(total, 127, "i1"), np.full(len(layout), 0.99 * BOUND / 127)), 100.0


def dense_poison(layout: Layout) -> tuple[bytes, float]:
    """An update of +-1e6 (an honest one's entries are ~1e-2, so this is x1e6 and more)."""
    total = sum(int(np.prod(s)) for _, s in layout)
    values = np.where(np.arange(total) % 2 == 0, 1e6, -1e6).astype("<f4")
    return pack("none", layout, values), 100.0


def dense_takeover(layout: Layout) -> tuple[bytes, float]:
    """A small update (0.01 everywhere) with the largest weight the wire format allows."""
    total = sum(int(np.prod(s)) for _, s in layout)
    return pack("none", layout, np.full(total, 0.01, "<f4")), 1e9 - 1


@pytest.mark.slow  # five 3-round runs of the real ServerApp path
@pytest.mark.parametrize("codec, forge, sanity, seen", [
    ("int8", int8_huge_scale, {}, "decodes beyond the bound"),
    ("int8", int8_at_the_bound, {}, "out of bounds"),
    ("int8", int8_at_the_bound, {"sanity.norm_action": "clip"}, "clipped"),
    ("none", dense_poison, {}, "beyond the bound"),
    ("none", dense_takeover, {}, "not below sanity.max_num_examples"),
])
def test_a_reply_built_from_the_docs_cannot_take_the_federation_over(tiny_cfg, monkeypatch, caplog, one_thread,
                                                                     codec, forge, sanity, seen):
    cfg = tiny_cfg(**{"compression.uplink": codec, **sanity})
    known = get_runtime(cfg).layout  # names and shapes only: the public model's adapter, as any node builds it
    layout = list(zip(known.names, known.shapes))
    attacker = hostile_app(layout, forge)
    original = type(client_app).__call__

    def call(self, message, context):
        if message.metadata.dst_node_id == HOSTILE and message.metadata.message_type == "train":
            return original(attacker, message, context)  # the attacker's own ClientApp, through Flower's machinery
        return original(self, message, context)

    monkeypatch.setattr(type(client_app), "__call__", call)
    caplog.set_level(logging.INFO)
    run_dir = runner.simulate(cfg)

    rows = report.read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    clipped = "sanity.norm_action" in sanity
    assert [(r["replies"], r["dropped"]) for r in rows] == [(3, 0) if clipped else (2, 1)] * 3
    assert seen in caplog.text
    ckpt = checkpoint.load(run_dir / "checkpoint")
    for group, tensors in ckpt.tensors.items():
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values()), group
    peak = max(float(t.abs().max()) for t in ckpt.tensors["global"].values())
    assert peak <= BOUND
    if clipped:  # the attacker's update counts, scaled to 10x the round's median norm: the adapter moves boundedly
        assert all(r["sanity_clipped"] == 1 for r in rows) and peak < 10
    else:  # dropped every round: the honest clients' progress (3 balanced topics, chance is 1/3)
        assert rows[-1]["eval_accuracy"] > 0.55
