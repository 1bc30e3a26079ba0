"""An outside attacker's client: fedpeft train replies built by hand from the wire format in docs/robustness.md.

numpy, hashlib and Flower records only: nothing here imports fedpeft, so the server's checks meet replies that
fedpeft's encoders never produced. ``hostile_app`` is the attacker's ClientApp for the in-process engine;
``app`` is the same attacker as a node of a real deployment: a hostile node whose Python path finds a
``fedpeft.clients.app`` module that re-exports it (Flower loads the app's ``clientapp`` reference from the
node's own path), configured by its ``--node-config`` (``layout-file``, ``forge``, ``p``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

BOUND = 1e4  # the default sanity.decode_bound and sanity.max_global_value
HUGE_SCALE = 3e38  # finite in float32 (its largest is 3.4e38): scale x level passes no float check by itself
FP16_MAX = 65504.0  # the largest finite float16: topk's largest value
MAGIC = 0x46504546544301
CODEC_IDS = {"none": 1, "int8": 4, "topk": 5, "sign": 6, "compeft": 8}
BITMAP, GOLOMB = 0, 1  # the positions codings of the sparse codecs
Layout = list[tuple[str, tuple[int, ...]]]
# (layout, the run's density p, round) -> (packed payload, claimed num-examples)
Forge = Callable[[Layout, float, int], tuple[bytes, float]]


def fingerprint(layout: Layout) -> int:
    """BLAKE2b-64 of the "name:shape" lines, read as a little-endian signed int64 (the documented recipe)."""
    text = "\n".join(f"{name}:{shape}" for name, shape in layout).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)


def total_of(layout: Layout) -> int:
    """All elements of the layout."""
    return sum(int(np.prod(shape)) for _, shape in layout)


def pack(codec: str, layout: Layout, values: np.ndarray, scales: np.ndarray | None = None,
         positions: np.ndarray | None = None, fields: tuple[int, ...] = ()) -> bytes:
    """Preamble (three uint32 section lengths) + int64 header (+ the codec's fields) + positions and values +
    float32 scales, little-endian."""
    scales = np.zeros(0, "<f4") if scales is None else scales.astype("<f4")
    positions = np.zeros(0, "u1") if positions is None else positions
    header = np.array([MAGIC, CODEC_IDS[codec], len(layout), total_of(layout), fingerprint(layout), positions.nbytes,
                       values.nbytes, scales.size, *fields], dtype="<i8").tobytes()
    sections = [header, positions.tobytes() + values.tobytes(), scales.tobytes()]
    return np.array([len(s) for s in sections], dtype="<u4").tobytes() + b"".join(sections)


def kept(total: int, p: float) -> int:
    """How many elements a sparse payload may keep at density p (global scope): p x total, rounded half up."""
    return min(total, int(np.floor(p * total + 0.5)))


def bitmap(total: int, idx: np.ndarray) -> np.ndarray:
    """Bitmap positions: one bit per element, most significant bit first, zero padding."""
    bits = np.zeros(total, "u1")
    bits[idx] = 1
    return np.packbits(bits)


def golomb(positions: np.ndarray, m: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Golomb-coded positions: (the four coding fields, the unary, fixed and extra streams, each byte-aligned)."""
    gaps = np.diff(positions, prepend=-1) - 1
    q, r = np.divmod(gaps, m)
    b = (m - 1).bit_length()
    u, w = (1 << b) - m, max(b - 1, 0)
    unary = np.concatenate([np.r_[np.zeros(n, "u1"), 1] for n in q]).astype("u1")
    if b == 0:
        return (GOLOMB, m, unary.size, 0), np.packbits(unary)
    fixed = np.where(r < u, r, (r + u) >> 1)
    fixed_bits = ((fixed[:, None] >> np.arange(w - 1, -1, -1)) & 1).reshape(-1).astype("u1")
    extra = ((r + u) & 1)[r >= u].astype("u1")
    streams = [np.packbits(unary), np.packbits(fixed_bits), np.packbits(extra)]
    return (GOLOMB, m, unary.size, extra.size), np.concatenate(streams)


def sparse(codec: str, layout: Layout, p: float, k: int, positions: np.ndarray, values: np.ndarray,
           scales: np.ndarray | None = None, coding: tuple[int, int, int, int] = (BITMAP, 0, 0, 0)) -> bytes:
    """A topk / compeft payload: fields k, p as float64 bits, scope 0 (global), then the positions coding's four."""
    p_bits = int(np.float64(p).view("<i8"))
    return pack(codec, layout, values, scales, positions, (k, p_bits, 0, *coding))


def spread(total: int, k: int) -> np.ndarray:
    """k distinct positions spread over the whole adapter."""
    return np.linspace(0, total - 1, k).astype(np.int64)


# ---- the attacks: dense and int8 layouts

def int8_huge_scale(layout: Layout, p: float, rnd: int) -> tuple[bytes, float]:
    """Every code 127 with a finite scale of 3e38: 127 x scale is no float32."""
    return pack("int8", layout, np.full(total_of(layout), 127, "i1"), np.full(len(layout), HUGE_SCALE)), 100.0


def int8_at_the_bound(layout: Layout, p: float, rnd: int) -> tuple[bytes, float]:
    """Every element 127 x scale just inside the decode bound: decodes, but its norm is far beyond the honest."""
    return pack("int8", layout, np.full(total_of(layout), 127, "i1"), np.full(len(layout), 0.99 * BOUND / 127)), 100.0


def dense_poison(layout: Layout, p: float, rnd: int) -> tuple[bytes, float]:
    """An update of +-1e6 (an honest one's entries are ~1e-2, so this is x1e6 and more)."""
    values = np.where(np.arange(total_of(layout)) % 2 == 0, 1e6, -1e6).astype("<f4")
    return pack("none", layout, values), 100.0


def dense_takeover(layout: Layout, p: float, rnd: int) -> tuple[bytes, float]:
    """A small update (0.01 everywhere) with the largest weight the wire format allows."""
    return pack("none", layout, np.full(total_of(layout), 0.01, "<f4")), 1e9 - 1


# ---- compressed layouts: compeft (sparse ternary), sign, topk

def compeft_scaled(layout: Layout, p: float, scale: float) -> bytes:
    """As many kept elements as p allows, alternating signs, every tensor's scale ``scale``."""
    total = total_of(layout)
    k = kept(total, p)
    signs = np.packbits(np.arange(k) % 2)  # 1 = negative
    return sparse("compeft", layout, p, k, bitmap(total, spread(total, k)), signs, np.full(len(layout), scale))


def compeft_huge_scale(layout: Layout, p: float, rnd: int) -> tuple[bytes, float]:
    """ComPEFT with a finite per-tensor scale of 3e38: each kept element decodes to +-3e38."""
    return compeft_scaled(layout, p, HUGE_SCALE), 100.0


def compeft_at_the_bound(layout: Layout, p: float, rnd: int) -> tuple[bytes, float]:
    """A well-formed ComPEFT update whose kept elements are +-0.99 x the decode bound: it decodes."""
    return compeft_scaled(layout, p, 0.99 * BOUND), 100.0


def sign_huge_scale(layout: Layout, p: float, rnd: int) -> tuple[bytes, float]:
    """One sign bit per element (alternating) and a finite per-tensor scale of 3e38."""
    signs = np.packbits(np.arange(total_of(layout)) % 2)
    return pack("sign", layout, signs, np.full(len(layout), HUGE_SCALE)), 100.0


def topk_huge_values(layout: Layout, p: float, rnd: int) -> tuple[bytes, float]:
    """Top-k values of +-65504, the largest finite float16, at as many positions as p allows."""
    total = total_of(layout)
    k = kept(total, p)
    values = np.where(np.arange(k) % 2 == 0, FP16_MAX, -FP16_MAX).astype("<f2")
    return sparse("topk", layout, p, k, bitmap(total, spread(total, k)), values), 100.0


def topk_bad_positions(layout: Layout, p: float, rnd: int) -> tuple[bytes, float]:
    """Round 1: a Golomb-coded position one past the last element; round 2: one position twice (the bitmap
    has one bit for it, the header counts two); round 3: one more position than p allows."""
    total = total_of(layout)
    ones = np.full(2, 1.0, "<f2")
    if rnd == 1:  # Golomb m = 1: a gap g is g zero bits then a one; the gap to position `total` is `total`
        unary = np.zeros(total + 1, "u1")
        unary[-1] = 1
        return sparse("topk", layout, p, 1, np.packbits(unary), ones[:1], coding=(GOLOMB, 1, total + 1, 0)), 100.0
    if rnd == 2:
        return sparse("topk", layout, p, 2, bitmap(total, np.array([5])), ones), 100.0
    k = kept(total, p) + 1
    return sparse("topk", layout, p, k, bitmap(total, spread(total, k)), np.ones(k, "<f2")), 100.0


FORGES: dict[str, Forge] = {f.__name__: f for f in (
    int8_huge_scale, int8_at_the_bound, dense_poison, dense_takeover, compeft_huge_scale, compeft_at_the_bound,
    sign_huge_scale, topk_huge_values, topk_bad_positions)}


# ---- the ClientApp

def received_header(msg: Message) -> np.ndarray:
    """The int64 header of the global adapter the server sent (unpacked by the same documented layout)."""
    data = msg.content["global"]["payload"].data
    header_bytes = int(np.frombuffer(data[:4], dtype="<u4")[0])
    return np.frombuffer(data[12:12 + header_bytes], dtype="<i8")


def forged_reply(msg: Message, layout: Layout, forge: Forge, p: float) -> Message:
    """Check the layout against the server's header (the docs were enough to match it), reply with ``forge``."""
    header = received_header(msg)
    assert header[0] == MAGIC and header[4] == fingerprint(layout), "the documented layout does not match"
    data, claim = forge(layout, p, int(msg.metadata.group_id))  # the group id is the round
    array = Array(dtype="uint8", shape=(len(data),), stype="raw", data=data)
    content = RecordDict({"update": ArrayRecord({"payload": array}),
                          "metrics": MetricRecord({"num-examples": claim, "train-loss": 0.1})})
    return Message(content, reply_to=msg)


def hostile_app(layout: Layout, forge: Forge, p: float = 0.0) -> ClientApp:
    """A ClientApp of the attacker's own that answers every train message with ``forge``."""
    attacker = ClientApp()

    @attacker.train()
    def train(msg: Message, context: Context) -> Message:
        return forged_reply(msg, layout, forge, p)

    return attacker


def read_layout(path: str) -> Layout:
    """A layout saved as JSON [[name, [dims...]], ...]."""
    with open(path) as f:
        return [(name, tuple(shape)) for name, shape in json.load(f)]


app = ClientApp()  # the hostile node's app: what its node config names


@app.train()
def node_train(msg: Message, context: Context) -> Message:
    cfg = context.node_config
    return forged_reply(msg, read_layout(str(cfg["layout-file"])), FORGES[str(cfg["forge"])], float(cfg["p"]))
