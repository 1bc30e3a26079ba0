"""The message schema between the ServerApp and the ClientApp, and its byte accounting.

Server -> client (message type ``train``): ``global`` (ArrayRecord: the downlink codec's packed
payload of the global adapter) and ``config`` (ConfigRecord: round, seed, per-round settings).
Client -> server: ``update`` (ArrayRecord: the uplink codec's packed payload of the adapter delta)
and ``metrics`` (MetricRecord: num-examples, train-loss, ...).

A payload travels as a handful of 1-D numpy arrays inside one ArrayRecord (Flower serializes them
with ``np.save(allow_pickle=False)``); nothing received is unpickled. Bytes are counted from the
serialized Flower objects themselves (what the object store pushes), so reported == sent.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedpeft.compression import Payload
from fedpeft.errors import PayloadError

TRAIN = "train"
GLOBAL, CONFIG, UPDATE, METRICS = "global", "config", "update", "metrics"
REQUIRED_METRICS = ("num-examples", "train-loss")
MAX_NUM_EXAMPLES = 10**9


def payload_record(payload: Payload) -> ArrayRecord:
    """Pack a codec payload into one ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.arrays().items()})


def record_payload(record: object) -> Payload:
    """Unpack an ArrayRecord into a Payload, validating types (raises PayloadError)."""
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected an ArrayRecord, got {type(record).__name__}")
    arrays = {}
    for key, arr in record.items():
        if not isinstance(arr, Array) or arr.stype != "numpy.ndarray":
            raise PayloadError(f"array {key!r} is not a serialized numpy array")
        try:
            arrays[key] = arr.numpy()
        except Exception as e:  # malformed npy bytes: np.load raises many types
            raise PayloadError(f"array {key!r} cannot be read: {e}") from None
    return Payload.from_arrays(arrays)


def record_bytes(content: RecordDict) -> int:
    """Bytes of the serialized Flower objects that carry ``content`` (records, arrays, chunks)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def train_instruction(global_payload: Payload, config: dict[str, int | float | str | bool]) -> RecordDict:
    """The content of a server -> client training message."""
    return RecordDict({GLOBAL: payload_record(global_payload), CONFIG: ConfigRecord(config)})


def train_reply(update: Payload, metrics: dict[str, float]) -> RecordDict:
    """The content of a client -> server reply."""
    return RecordDict({UPDATE: payload_record(update), METRICS: MetricRecord({k: float(v) for k, v in metrics.items()})})


def parse_reply(content: RecordDict) -> tuple[Payload, dict[str, float]]:
    """Validate a reply's structure and metrics; returns the payload and metrics (raises PayloadError)."""
    if set(content.keys()) != {UPDATE, METRICS}:
        raise PayloadError(f"reply must hold exactly {UPDATE!r} and {METRICS!r}, got {sorted(content.keys())}")
    metrics_rec = content[METRICS]
    if not isinstance(metrics_rec, MetricRecord):
        raise PayloadError("reply metrics are not a MetricRecord")
    metrics: dict[str, float] = {}
    for k, v in metrics_rec.items():
        if not isinstance(v, (int, float)) or not np.isfinite(v):
            raise PayloadError(f"metric {k!r} must be a finite number, got {v!r}")
        metrics[k] = float(v)
    for k in REQUIRED_METRICS:
        if k not in metrics:
            raise PayloadError(f"reply metrics lack {k!r}")
    if not 0 < metrics["num-examples"] <= MAX_NUM_EXAMPLES or metrics["num-examples"] != int(metrics["num-examples"]):
        raise PayloadError(f"num-examples must be a positive integer, got {metrics['num-examples']}")
    return record_payload(content[UPDATE]), metrics
