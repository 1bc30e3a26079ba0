"""The message schema between the ServerApp and the ClientApp, and its byte accounting.

Server -> client (message type ``train``): ``global`` (ArrayRecord: the downlink codec's packed
payload of the global adapter) and ``config`` (ConfigRecord: round, seed, per-round settings).
Client -> server: ``update`` (ArrayRecord: the uplink codec's packed payload of the adapter delta)
and ``metrics`` (MetricRecord: num-examples, train-loss, ...).
Federated evaluation (message type ``evaluate``): the server sends ``global`` (the exact global adapter,
codec ``none``) and ``config`` (round); the client replies with ``metrics`` only: the counts of
:data:`EVAL_METRICS` over its own held-out split.

A payload travels as ONE raw ``uint8`` Array (``stype="raw"``): a 12-byte preamble with the byte
lengths of the header, buffer and scales sections, then the sections. Flower turns every Array into
two objects plus an npy header, so three separate arrays cost about 1 kB more per message (measured:
2,562 B vs about 1,550 B for a 709-byte ComPEFT payload). Nothing received is unpickled or passed to
``np.load``: the bytes are sliced by validated lengths and handed to ``Payload.from_arrays``, which
checks dtypes and the codec checks everything else. Bytes are counted from the serialized Flower
objects themselves (what the object store pushes), so reported == sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedpeft.compression import Payload
from fedpeft.compression.secure import field_modulus, levels_for
from fedpeft.config import PrivacySection
from fedpeft.errors import PayloadError
from fedpeft.privacy.distributed import DistributedDP

TRAIN, EVALUATE = "train", "evaluate"
GLOBAL, CONFIG, UPDATE, METRICS = "global", "config", "update", "metrics"
CONTROL = "scaffold-control"  # federation.strategy = "scaffold": the server control variate (dense fp32)
CORRECTION = "lora-correction"  # federation.lora_aggregation = "exact": the frozen per-module correction (dense fp32)
PAYLOAD = "payload"
EF_RESET = "ef-reset"  # train config (FedBuff): the client's error-feedback residual is too stale; start from zero
REQUIRED_METRICS = ("num-examples",)
#: what a client sends under DP unless privacy.release_client_metrics: values that do not depend on its data
#: (its simulation index, the traffic the split server sees anyway, adaptive clipping's 0/1 indicator, which
#: the server only releases noised); num-examples is sent as 1, so updates are weighted uniformly
PUBLIC_METRICS = ("partition-id", "clip-indicator", "split-bytes-up", "split-bytes-down", "split-steps",
                  "split-local-steps", "fl-adapter-bytes-fp32")
MAX_NUM_EXAMPLES = 10**9  # exclusive: a claim must lie below it (sanity.max_num_examples is tighter)
SECTIONS: tuple[tuple[str, np.dtype], ...] = (("header", np.dtype("<i8")), ("buffer", np.dtype("u1")),
                                               ("scales", np.dtype("<f4")))
PREAMBLE = np.dtype("<u4")


def pack_payload(payload: Payload) -> bytes:
    """Preamble (three uint32 section lengths in bytes) + header + buffer + scales."""
    arrays = payload.arrays()
    parts = [np.ascontiguousarray(arrays.get(name, np.zeros(0, dt)), dtype=dt).tobytes() for name, dt in SECTIONS]
    return np.array([len(p) for p in parts], dtype=PREAMBLE).tobytes() + b"".join(parts)


def unpack_payload(data: bytes) -> Payload:
    """Inverse of :func:`pack_payload`; every length is checked before slicing (raises PayloadError)."""
    head = 3 * PREAMBLE.itemsize
    if len(data) < head:
        raise PayloadError(f"payload of {len(data)} bytes is shorter than its {head}-byte preamble")
    lengths = [int(n) for n in np.frombuffer(data[:head], dtype=PREAMBLE)]
    if sum(lengths) != len(data) - head:
        raise PayloadError(f"payload sections add up to {sum(lengths)} bytes, {len(data) - head} were received")
    arrays, offset = {}, head
    for (name, dt), n in zip(SECTIONS, lengths):
        if n % dt.itemsize:
            raise PayloadError(f"payload {name} section of {n} bytes is not a whole number of {dt} values")
        if n or name != "scales":
            arrays[name] = np.frombuffer(data[offset:offset + n], dtype=dt)
        offset += n
    return Payload.from_arrays(arrays)


def payload_record(payload: Payload) -> ArrayRecord:
    """Pack a codec payload into one ArrayRecord holding one raw uint8 Array."""
    data = pack_payload(payload)
    return ArrayRecord({PAYLOAD: Array(dtype="uint8", shape=(len(data),), stype="raw", data=data)})


def config_record(content: RecordDict, key: str = CONFIG) -> ConfigRecord:
    """The ConfigRecord ``key`` of a message (raises PayloadError when it is missing or of another kind)."""
    record = content.get(key)
    if not isinstance(record, ConfigRecord):
        raise PayloadError(f"expected a ConfigRecord {key!r}, got {type(record).__name__}")
    return record


def number(record: ConfigRecord, key: str) -> float:
    """A numeric value of a config record (bools and text refused)."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PayloadError(f"config {key!r} must be a number, got {value!r}")
    return float(value)


def text(record: ConfigRecord, key: str) -> str:
    """A string value of a config record."""
    value = record.get(key)
    if not isinstance(value, str):
        raise PayloadError(f"config {key!r} must be a string, got {value!r}")
    return value


def record_payload(record: object) -> Payload:
    """Unpack the ArrayRecord of :func:`payload_record` into a Payload (raises PayloadError)."""
    return unpack_payload(payload_bytes(record))


def payload_bytes(record: object) -> bytes:
    """The raw packed bytes inside an ArrayRecord of :func:`payload_record` (raises PayloadError)."""
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected an ArrayRecord, got {type(record).__name__}")
    if list(record.keys()) != [PAYLOAD]:
        raise PayloadError(f"expected exactly one array {PAYLOAD!r}, got {sorted(record.keys())}")
    arr = record[PAYLOAD]
    if not isinstance(arr, Array) or arr.stype != "raw" or arr.dtype != "uint8":
        raise PayloadError("the payload array is not raw uint8 bytes")
    if tuple(arr.shape) != (len(arr.data),):
        raise PayloadError(f"payload array declares shape {tuple(arr.shape)} but carries {len(arr.data)} bytes")
    return bytes(arr.data)


def record_bytes(content: RecordDict) -> int:
    """Bytes of the serialized Flower objects that carry ``content`` (records, arrays, chunks)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def round_of(group_id: str) -> int:
    """The round a message's group id names (``"3"`` for training, ``"3-fed_eval"`` for evaluation; 0: none)."""
    head = group_id.split("-")[0]
    return int(head) if head.isdigit() else 0


def train_instruction(global_payload: Payload, config: Mapping[str, int | float | str | bool]) -> RecordDict:
    """The content of a server -> client training message."""
    return RecordDict({GLOBAL: payload_record(global_payload), CONFIG: ConfigRecord(dict(config))})


def train_reply(update: Payload, metrics: dict[str, float]) -> RecordDict:
    """The content of a client -> server reply."""
    record = MetricRecord({k: float(v) for k, v in metrics.items()})
    return RecordDict({UPDATE: payload_record(update), METRICS: record})


def hides_metrics(p: PrivacySection) -> bool:
    """Whether clients send :func:`public_metrics` only (any DP mode, unless privacy.release_client_metrics):
    their FedAvg weight is then 1, which SecAgg+'s weight cap must match."""
    return p.mode != "none" and not p.release_client_metrics


def public_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a client may send under DP without opting in: :data:`PUBLIC_METRICS`, and weight 1."""
    return {"num-examples": 1, **{k: v for k, v in metrics.items() if k in PUBLIC_METRICS}}


def _finite(key: str, value: object) -> float:
    """``value`` as a float if it is a finite int or float (not a bool), else :class:`PayloadError` (an int too
    large for a float included: an in-process reply is not bounded by protobuf's 64-bit integers)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number):
            return number
    raise PayloadError(f"metric {key!r} must be a finite number, got {value!r}")


def parse_metrics(record: Mapping[str, object]) -> dict[str, float]:
    """Validate a training reply's metrics (as a MetricRecord, or SecAgg+'s cleartext FitRes metrics): finite
    numbers, a whole positive ``num-examples`` below :data:`MAX_NUM_EXAMPLES`, a ``clip-indicator`` of exactly
    0 or 1 (adaptive clipping counts them); raises :class:`PayloadError`."""
    metrics = {k: _finite(k, v) for k, v in record.items()}
    for k in REQUIRED_METRICS:
        if k not in metrics:
            raise PayloadError(f"reply metrics lack {k!r}")
    if not 0 < metrics["num-examples"] < MAX_NUM_EXAMPLES or metrics["num-examples"] != int(metrics["num-examples"]):
        raise PayloadError(f"num-examples must be a positive integer below {MAX_NUM_EXAMPLES}, "
                           f"got {metrics['num-examples']}")
    if metrics.get("clip-indicator", 0.0) not in (0.0, 1.0):
        raise PayloadError(f"clip-indicator must be 0 or 1, got {metrics['clip-indicator']}")
    return metrics


def parse_reply(content: RecordDict) -> tuple[Payload, dict[str, float]]:
    """Validate a reply's structure and metrics; returns the payload and metrics (raises PayloadError)."""
    if set(content.keys()) != {UPDATE, METRICS}:
        raise PayloadError(f"reply must hold exactly {UPDATE!r} and {METRICS!r}, got {sorted(content.keys())}")
    metrics_rec = content[METRICS]
    if not isinstance(metrics_rec, MetricRecord):
        raise PayloadError("reply metrics are not a MetricRecord")
    metrics = parse_metrics(metrics_rec)
    return record_payload(content[UPDATE]), metrics


EVAL_METRICS = ("num-examples", "eval-weight", "eval-loss-sum")  # + "eval-correct" for classification


def evaluate_reply(counts: Mapping[str, float]) -> RecordDict:
    """The content of a client -> server evaluate reply (the sums of ``training.evaluate_counts``)."""
    metrics = {"num-examples": counts["examples"], "eval-weight": counts["weight"], "eval-loss-sum": counts["loss_sum"]}
    if "correct" in counts:
        metrics["eval-correct"] = counts["correct"]
    return RecordDict({METRICS: MetricRecord({k: float(v) for k, v in metrics.items()})})


def parse_evaluate_reply(content: RecordDict, classification: bool) -> dict[str, float]:
    """Validate an evaluate reply: exactly the expected counts, whole and in range (raises PayloadError)."""
    if set(content.keys()) != {METRICS} or not isinstance(content[METRICS], MetricRecord):
        raise PayloadError(f"evaluate reply must hold exactly a MetricRecord {METRICS!r}, got {sorted(content.keys())}")
    expected = set(EVAL_METRICS) | ({"eval-correct"} if classification else set())
    record = content[METRICS]
    if set(record.keys()) != expected:
        raise PayloadError(f"evaluate metrics must be {sorted(expected)}, got {sorted(record.keys())}")
    m: dict[str, float] = {}
    for k, v in record.items():
        m[k] = _finite(k, v)
        if m[k] < 0:
            raise PayloadError(f"evaluate metric {k!r} must be >= 0, got {v!r}")
    for k in ("num-examples", "eval-weight", "eval-correct"):
        if k in m and (m[k] != int(m[k]) or m[k] >= MAX_NUM_EXAMPLES):
            raise PayloadError(f"evaluate metric {k!r} must be a whole number below {MAX_NUM_EXAMPLES}, got {m[k]}")
    if m["num-examples"] < 1 or m["eval-weight"] < 1:
        raise PayloadError("an evaluate reply must count at least one example and one loss term")
    if m.get("eval-correct", 0.0) > m["num-examples"]:
        raise PayloadError(f"eval-correct {m['eval-correct']} exceeds num-examples {m['num-examples']}")
    if classification and m["eval-weight"] != m["num-examples"]:
        raise PayloadError("classification: eval-weight must equal num-examples")
    return m


# SecAgg+ rounds (fedpeft.server.secagg drives them, fedpeft.clients.secagg answers them)
PAYLOAD_TYPE = "fedpeft.payload"  # tensor_type of the legacy Parameters that carry our packed payload
DP_FLAG, WEIGHT_CAP, SLACK = "secagg-dp", "secagg-max-weight", "secagg-clip-slack"  # fit-config keys
HIDDEN_METRICS = ("clip-indicator", "update-norm")  # per-client values that must not travel in the clear
SUBSPACE_SEED = "secagg-subspace-seed"  # fit-config key: the round's shared random subspace
#: SecAgg+ key-exchange entries that travel compact under a packed field (one bytes value, or a list of them)
KEY_EXCHANGE = {Key.PUBLIC_KEY_1: "one", Key.PUBLIC_KEY_2: "one", Key.CIPHERTEXT_LIST: "list"}


@dataclass(frozen=True)
class SecureField:
    """How an update enters SecAgg+'s field; both apps derive it from the run config (nothing negotiated)."""

    clipping_range: float  # Flower clips each element to +-this
    quantization_range: int  # Flower's steps over [-clipping_range, clipping_range]
    modulus_range: int  # the field: masks and sums are mod this
    packed: bool  # masked elements travel as packed base-modulus digits (pack_field), not as int64 arrays
    keep: float  # fraction of coordinates summed (a per-round shared subspace)
    width: int  # elements each client sums (subspace size, + the clip indicator under adaptive clipping)
    ddp: DistributedDP | None  # distributed DP: integer grid and noise shares


def packs_masked(p: PrivacySection) -> bool:
    """Masked vectors travel bit-packed (secure integer uplink or distributed DP); dense SecAgg+ as Flower sends."""
    return p.secagg_bits > 0 or p.secagg_keep < 1 or p.mode == "distributed"


def secure_field(p: PrivacySection, total: int, clients: int) -> SecureField:
    """The SecAgg+ field for ``total`` adapter elements and at most ``clients`` updates per sum."""
    k = total if p.secagg_keep >= 1 else max(1, math.ceil(p.secagg_keep * total))
    packed = packs_masked(p)
    if p.mode == "distributed":
        ddp = DistributedDP(clip=p.clip_norm, dim=k, clients=clients, min_survivors=p.secagg_min_survivors,
                            noise_multiplier=p.server_noise_multiplier, grid=p.distributed_grid)
        return SecureField(float(ddp.half_range), ddp.levels, 2**ddp.modulus_bits, True, p.secagg_keep, k, ddp)
    width = k + (1 if p.mode in ("client", "both") else 0)
    if p.secagg_bits:
        levels = levels_for(p.secagg_bits)
        return SecureField(p.secagg_clipping_range, levels, field_modulus(clients, levels), True, p.secagg_keep,
                           width, None)
    return SecureField(p.secagg_clipping_range, p.secagg_quantization_range, p.secagg_modulus_range, packed,
                       p.secagg_keep, width, None)
