"""Property tests (hypothesis): every registered codec round-trips within its error bound, and
corrupted payloads (bit flips, truncation, hostile header values, wrong dtypes/keys) fail only with
PayloadError, quickly, and without allocating more than a cap derived from the layout.

Specs are generated from the codec registry; a new codec needs one row in CHECKS.
"""

from __future__ import annotations

import dataclasses
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.compression import CODECS, Codec, Layout, Payload, codec_names, make_codec
from fedpeft.errors import PayloadError

SETTINGS = settings(max_examples=40, deadline=3000, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def registry_specs() -> list[str]:
    """Every codec's default plus each non-default choice and a sparse / dense density or level."""
    specs = []
    for name in codec_names():
        specs.append(name)
        for f in dataclasses.fields(CODECS.get(name).Params):
            for choice in f.metadata.get("choices") or ():
                if choice != f.default:
                    specs.append(f"{name},{f.name}={choice}")
            if f.name == "p":
                specs += [f"{name}:0.02", f"{name}:0.5"]
            if f.name == "s":
                specs += [f"{name}:1", f"{name}:1000"]
            if f.name == "bucket":
                specs += [f"{name},bucket=0", f"{name}:3,bucket=5"]
    return specs


SPECS = registry_specs()


@st.composite
def deltas(draw: st.DrawFn, max_tensors: int = 4, max_side: int = 24) -> dict[str, torch.Tensor]:
    """Small state dicts: several shapes (some empty) and value patterns (ties, zeros, sparse, wide)."""
    state = {}
    for i in range(draw(st.integers(1, max_tensors))):
        shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=1, max_size=2)))
        n = int(np.prod(shape))
        kind = draw(st.sampled_from(["normal", "ties", "sparse", "zeros", "floats"]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        scale = draw(st.sampled_from([1e-4, 1.0, 300.0]))
        if kind == "normal":
            x = rng.standard_normal(n) * scale
        elif kind == "ties":
            x = rng.integers(-1, 2, n) * scale
        elif kind == "sparse":
            x = rng.standard_normal(n) * scale * (rng.random(n) < 0.1)
        elif kind == "zeros":
            x = np.zeros(n)
        else:
            x = np.array(draw(st.lists(st.floats(-6e4, 6e4, width=32), min_size=n, max_size=n)))
        state[f"t{i}.w"] = torch.from_numpy(x.astype(np.float32).reshape(shape))
    return state


# ---------------------------------------------------------------- per-codec error bounds

def topk_reference(x: np.ndarray, layout: Layout, p: float, scope: str) -> np.ndarray:
    """Independent top-k: stable sort by -|x| (ties -> lowest index), zeros never kept."""
    def pick(v: np.ndarray, n: int) -> np.ndarray:
        k = min(n, int(np.floor(p * n + 0.5)))
        order = np.lexsort((np.arange(n), -np.abs(v)))[:k]
        return np.sort(order[v[order] != 0])
    if scope == "global":
        return pick(x, x.size)
    parts = [pick(x[a:b], b - a) + a for a, b in zip(layout.offsets[:-1], layout.offsets[1:])]
    return np.concatenate(parts).astype(np.int64)


def segments(layout: Layout) -> list[slice]:
    return [slice(int(a), int(b)) for a, b in zip(layout.offsets[:-1], layout.offsets[1:])]


def check_none(c: Codec, x: np.ndarray, d: np.ndarray, lay: Layout, pl: Payload) -> None:
    assert np.array_equal(x, d)


def check_fp16(c: Codec, x: np.ndarray, d: np.ndarray, lay: Layout, pl: Payload) -> None:
    assert np.all(np.abs(d - x) <= np.abs(x) * 2.0**-11 + 2.0**-25)


def check_bf16(c: Codec, x: np.ndarray, d: np.ndarray, lay: Layout, pl: Payload) -> None:
    assert np.all(np.abs(d - x) <= np.abs(x) * 2.0**-8 + 1e-38)


def check_int8(c: Codec, x: np.ndarray, d: np.ndarray, lay: Layout, pl: Payload) -> None:
    for s in segments(lay):
        scale = float(np.abs(x[s]).max(initial=0.0)) / 127
        assert np.all(np.abs(d[s] - x[s]) <= scale / 2 * (1 + 1e-5) + 1e-35)


def check_sign(c: Codec, x: np.ndarray, d: np.ndarray, lay: Layout, pl: Payload) -> None:
    for i, s in enumerate(segments(lay)):
        mean = float(np.abs(x[s].astype(np.float64)).mean()) if s.stop > s.start else 0.0
        assert pl.scales[i] == pytest.approx(mean, rel=1e-5, abs=1e-38)
        assert np.all(np.abs(d[s]) == pl.scales[i])
        assert pl.scales[i] == 0 or np.array_equal(d[s] < 0, x[s] < 0)


def check_qsgd(c: Codec, x: np.ndarray, d: np.ndarray, lay: Layout, pl: Payload) -> None:
    b = c.params.bucket
    for s in segments(lay) if b == 0 else [slice(i, i + b) for i in range(0, lay.total, b)]:
        norm = float(np.linalg.norm(x[s].astype(np.float64)))
        assert np.all(np.abs(d[s] - x[s]) <= norm / c.params.s * (1 + 1e-4) + 1e-30)
        assert np.all(d[s] * x[s] >= 0)


def check_topk(c: Codec, x: np.ndarray, d: np.ndarray, lay: Layout, pl: Payload) -> None:
    pos = topk_reference(x, lay, c.params.p, c.params.scope)
    expected = np.zeros_like(x)
    expected[pos] = x[pos].astype(np.float16)
    assert np.array_equal(d, expected)


def check_compeft(c: Codec, x: np.ndarray, d: np.ndarray, lay: Layout, pl: Payload) -> None:
    pos = topk_reference(x, lay, c.params.p, c.params.scope)
    assert np.array_equal(np.flatnonzero(d), pos)  # kept set = top-k (scales of kept tensors > 0)
    if pos.size == 0:
        assert pl.nbytes == pl.header.nbytes  # header only
        return
    tid = lay.tensor_ids(pos)
    assert np.array_equal(d[pos], np.where(x[pos] < 0, -pl.scales[tid], pl.scales[tid]))  # exactly +-scale
    if c.params.scale == "mean":
        for t in np.unique(tid):
            ref = c.params.alpha * np.abs(x[pos[tid == t]].astype(np.float64)).mean()
            assert pl.scales[t] == pytest.approx(ref, rel=1e-5)


def check_sint(c: Codec, x: np.ndarray, d: np.ndarray, lay: Layout, pl: Payload) -> None:
    r, step = c.params.range, 2 * c.params.range / (2**c.params.bits - 2)
    target = np.clip(x.astype(np.float64), -r, r)
    assert np.all(np.abs(d - target) <= step * (1 + 1e-4) + 1e-6 * r)  # one grid step of the clipped value


CHECKS: dict[str, Callable[..., None]] = {
    "none": check_none, "fp16": check_fp16, "bf16": check_bf16, "int8": check_int8, "sign": check_sign,
    "qsgd": check_qsgd, "topk": check_topk, "compeft": check_compeft, "sint": check_sint,
}


def test_every_registered_codec_has_a_check() -> None:
    assert set(CHECKS) == set(codec_names())


@pytest.mark.parametrize("spec", SPECS)
@SETTINGS
@given(delta=deltas())
def test_round_trip_within_bound(spec: str, delta: dict[str, torch.Tensor]) -> None:
    codec = make_codec(spec)
    layout = Layout.from_state(delta)
    payload = Payload.from_arrays(codec.encode(delta, layout, rng=np.random.default_rng(0)).arrays())
    out = codec.decode(payload, layout)
    assert set(out) == set(delta)
    assert all(out[k].dtype == torch.float32 and out[k].shape == delta[k].shape for k in delta)
    assert sum(payload.breakdown().values()) == payload.nbytes
    x = layout.flatten(delta)
    d = layout.flatten(out)
    CHECKS[codec.name](codec, x, d, layout, payload)


# ---------------------------------------------------------------- hostile payloads

HOSTILE_INTS = [-1, 0, 1, 2, 3, 7, 8, 2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]


def alloc_cap(layout: Layout) -> int:
    """Decoding may allocate a bounded multiple of the layout's size, never what a header asks for."""
    return 80 * layout.total + (1 << 20)


@st.composite
def mutations(draw: st.DrawFn, arrays: dict[str, np.ndarray]) -> dict[str, object]:
    out: dict[str, object] = {k: v.copy() for k, v in arrays.items()}
    header, buffer = out["header"], out["buffer"]
    kind = draw(st.sampled_from(["flip_buffer", "flip_header", "set_header", "truncate", "extend",
                                 "garbage", "scales", "dtype", "ndim", "keys", "many_flips"]))
    if kind in ("flip_buffer", "many_flips") and buffer.size:
        for _ in range(1 if kind == "flip_buffer" else draw(st.integers(2, 16))):
            buffer[draw(st.integers(0, buffer.size - 1))] ^= np.uint8(1 << draw(st.integers(0, 7)))
    elif kind == "flip_header":
        i, bit = draw(st.integers(0, header.size - 1)), draw(st.integers(0, 63))
        header.view(np.uint64)[i] ^= np.uint64(1) << np.uint64(bit)
    elif kind == "set_header":
        header[draw(st.integers(0, header.size - 1))] = draw(
            st.sampled_from(HOSTILE_INTS) | st.integers(-(2**63), 2**63 - 1))
    elif kind == "truncate":
        key = draw(st.sampled_from(sorted(out)))
        out[key] = out[key][: draw(st.integers(0, max(0, out[key].size - 1)))]
    elif kind == "extend":
        key = draw(st.sampled_from(sorted(out)))
        extra = np.zeros(draw(st.integers(1, 9)), out[key].dtype)
        out[key] = np.concatenate([out[key], extra + np.asarray(draw(st.integers(0, 255))).astype(extra.dtype)])
    elif kind == "garbage":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        out["buffer"] = rng.integers(0, 256, buffer.size, dtype=np.uint8)
    elif kind == "scales":
        value = draw(st.sampled_from([np.nan, np.inf, -1.0, 3e38, 0.0]))
        if "scales" in out and out["scales"].size:
            out["scales"][draw(st.integers(0, out["scales"].size - 1))] = value
        else:
            out["scales"] = np.full(draw(st.integers(1, 5)), value, np.float32)
    elif kind == "dtype":
        key = draw(st.sampled_from(sorted(out)))
        out[key] = out[key].astype(draw(st.sampled_from([np.int32, np.float64, np.int8, np.uint8, np.float32])))
    elif kind == "ndim":
        key = draw(st.sampled_from(sorted(out)))
        out[key] = out[key].reshape(1, -1)
    elif kind == "keys":
        if draw(st.booleans()):
            del out[draw(st.sampled_from(sorted(out)))]
        else:
            out[draw(st.sampled_from(["extra", "Header", "scales"]))] = np.zeros(3, np.float32)
    return out


def decode_safely(codec: Codec, arrays: dict[str, object], layout: Layout) -> None:
    """Decode hostile arrays: PayloadError or a valid result, fast, within the allocation cap."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    try:
        out = codec.decode(Payload.from_arrays(arrays), layout)  # type: ignore[arg-type]
    except PayloadError:
        out = None
    assert time.perf_counter() - start < 2.0
    assert tracemalloc.get_traced_memory()[1] - base <= alloc_cap(layout)
    if out is not None:
        assert all(out[n].shape == s and bool(torch.isfinite(out[n]).all())
                   for n, s in zip(layout.names, layout.shapes))


@pytest.fixture
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


@pytest.mark.parametrize("spec", SPECS)
@SETTINGS
@given(delta=deltas(max_tensors=3, max_side=40), data=st.data())
def test_corrupted_payloads_fail_cleanly(traced: None, spec: str, delta: dict[str, torch.Tensor],
                                         data: st.DataObject) -> None:
    codec = make_codec(spec)
    layout = Layout.from_state(delta)
    arrays = codec.encode(delta, layout, rng=np.random.default_rng(0)).arrays()
    decode_safely(codec, data.draw(mutations(arrays)), layout)


@pytest.mark.parametrize("spec", SPECS)
def test_every_header_field_rejects_hostile_values(traced: None, spec: str) -> None:
    delta = {"a": torch.randn(300), "b": torch.randn(20, 30)}
    codec, layout = make_codec(spec), Layout.from_state(delta)
    arrays = codec.encode(delta, layout, rng=np.random.default_rng(0)).arrays()
    for i in range(arrays["header"].size):
        for value in HOSTILE_INTS:
            if value == int(arrays["header"][i]):
                continue
            bad = dict(arrays, header=arrays["header"].copy())
            bad["header"][i] = value
            decode_safely(codec, bad, layout)


def test_not_a_mapping_or_not_arrays() -> None:
    with pytest.raises(PayloadError):
        Payload.from_arrays([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(PayloadError):
        Payload.from_arrays({"header": [1, 2], "buffer": b"xx"})  # type: ignore[dict-item]
