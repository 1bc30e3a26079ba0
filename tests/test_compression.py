"""Behaviour of fedpeft.compression: specs, sizes, scopes, scales, error feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.compression import ErrorFeedback, Layout, Payload, codec_names, entropy_bound_bits, make_codec
from fedpeft.errors import ConfigError, PayloadError


def lora_like(seed: int = 0, n: int = 6) -> dict[str, torch.Tensor]:
    """A small LoRA-shaped delta: A/B pairs of different magnitudes, a bias and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(n):
        state[f"layer{i}.lora_A"] = torch.randn(8, 64, generator=g) * (0.1 * (i + 1))
        state[f"layer{i}.lora_B"] = torch.randn(64, 8, generator=g) * 0.01
    state["head.bias"] = torch.randn(5, generator=g)
    state["scalar"] = torch.tensor(0.5)
    state["empty"] = torch.zeros(0, 4)
    return state


def roundtrip(spec: str, delta: dict[str, torch.Tensor]) -> tuple[Payload, dict[str, torch.Tensor]]:
    layout = Layout.from_state(delta)
    codec = make_codec(spec)
    payload = codec.encode(delta, layout, rng=np.random.default_rng(0))
    return payload, codec.decode(Payload.from_arrays(payload.arrays()), layout)


# ---------------------------------------------------------------- specs and the registry

def test_registry_lists_every_codec() -> None:
    assert set(codec_names()) >= {"none", "fp16", "bf16", "int8", "topk", "sign", "qsgd", "compeft"}
    assert make_codec("none").lossless and not make_codec("compeft").lossless
    assert make_codec("compeft").biased and not make_codec("qsgd").biased  # who wants error feedback


@pytest.mark.parametrize("name", codec_names())
def test_canonical_spec_parses_back(name: str) -> None:
    codec = make_codec(name)
    again = make_codec(codec.spec)
    assert again.name == name and again.params == codec.params and again.spec == codec.spec


def test_spec_with_options() -> None:
    c = make_codec(" compeft:0.05, scale=std ,alpha=0.5,scope=per_tensor")
    assert (c.params.p, c.params.scale, c.params.alpha, c.params.scope) == (0.05, "std", 0.5, "per_tensor")
    assert make_codec("qsgd:4").params.s == 4
    assert make_codec("topk,p=0.2").params.p == 0.2


@pytest.mark.parametrize("spec, words", [
    ("", ["empty", "compeft"]),
    ("zip:0.1", ["'zip'", "compeft", "qsgd"]),
    ("compeft:abc", ["'abc'", "number"]),
    ("compeft:1.5", ["1.5", "<= 1"]),
    ("compeft:0.1,foo=1", ["'foo'", "p, scale, alpha, scope"]),
    ("compeft:0.1,scale=max", ["'max'", "mean, std"]),
    ("compeft:0.1,alpha=0", ["alpha", "> 0"]),
    ("compeft:0.1,p=0.2", ["'p'", "twice"]),
    ("topk:0.1,scope", ["'scope'", "key=value"]),
    ("none:3", ["none", "no parameters"]),
    ("qsgd:0", ["0", ">= 1"]),
    ("qsgd:1.5", ["'1.5'", "integer"]),
    ("compeft:nan", ["nan", "finite"]),
])
def test_bad_specs_name_the_bad_part(spec: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        make_codec(spec)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# ---------------------------------------------------------------- payload format

@pytest.mark.parametrize("name", codec_names())
def test_breakdown_sums_to_nbytes_and_arrays_are_flat(name: str) -> None:
    payload, _ = roundtrip(name, lora_like())
    assert sum(payload.breakdown().values()) == payload.nbytes
    arrays = payload.arrays()
    assert set(arrays) <= {"header", "buffer", "scales"} and {"header", "buffer"} <= set(arrays)
    assert sum(a.nbytes for a in arrays.values()) == payload.nbytes
    assert all(a.ndim == 1 for a in arrays.values())
    assert arrays["header"].dtype == np.int64 and arrays["buffer"].dtype == np.uint8


@pytest.mark.parametrize("name", codec_names())
def test_read_only_arrays_and_other_float_dtypes(name: str) -> None:
    delta = {k: v.to(torch.bfloat16) for k, v in lora_like().items()}
    layout = Layout.from_state(delta)
    codec = make_codec(name)
    arrays = codec.encode(delta, layout, rng=np.random.default_rng(1)).arrays()
    for a in arrays.values():
        a.setflags(write=False)
    out = codec.decode(Payload.from_arrays(arrays), layout)
    assert all(out[k].dtype == torch.float32 and out[k].shape == delta[k].shape for k in delta)


def test_layout_is_sorted_and_checks_names_and_shapes() -> None:
    delta = {"b": torch.zeros(2, 3), "a": torch.zeros(4)}
    layout = Layout.from_state(delta)
    assert layout.names == ("a", "b") and layout.shapes == ((4,), (2, 3))
    assert layout.numels == (4, 6) and layout.total == 10
    with pytest.raises(PayloadError, match="missing"):
        layout.check({"a": torch.zeros(4)})
    with pytest.raises(PayloadError, match="shape"):
        layout.check({"a": torch.zeros(4), "b": torch.zeros(3, 2)})
    other = Layout.from_state({"a": torch.zeros(4), "b": torch.zeros(3, 2)})
    payload = make_codec("fp16").encode(delta, layout)
    with pytest.raises(PayloadError, match="names/shapes"):
        make_codec("fp16").decode(payload, other)


def test_decoding_with_another_codec_or_settings_is_refused() -> None:
    delta = lora_like()
    layout = Layout.from_state(delta)
    payload = make_codec("compeft:0.1").encode(delta, layout)
    with pytest.raises(PayloadError, match="compeft"):
        make_codec("topk:0.1").decode(payload, layout)
    with pytest.raises(PayloadError, match="density"):
        make_codec("compeft:0.2").decode(payload, layout)
    with pytest.raises(PayloadError, match="scope"):
        make_codec("compeft:0.1,scope=per_tensor").decode(payload, layout)


@pytest.mark.parametrize("name", codec_names())
def test_non_finite_delta_is_refused(name: str) -> None:
    delta = lora_like()
    delta["head.bias"][1] = float("nan")
    with pytest.raises(PayloadError, match="NaN"):
        make_codec(name).encode(delta, Layout.from_state(delta))


# ---------------------------------------------------------------- compeft

@pytest.mark.parametrize("p", [0.2, 0.1, 0.05, 0.01])
def test_compeft_size_near_entropy_bound(p: float) -> None:
    d = 1_000_000
    x = torch.from_numpy(np.random.default_rng(7).standard_normal(d).astype(np.float32))
    payload, out = roundtrip(f"compeft:{p}", {"w": x})
    bound_bytes = entropy_bound_bits(d, p) / 8
    assert payload.nbytes <= 1.02 * bound_bytes, (payload.nbytes, bound_bytes, payload.breakdown())
    assert int((out["w"] != 0).sum()) == round(p * d)


def test_entropy_bound_values() -> None:
    assert entropy_bound_bits(100, 0.0) == 0.0
    assert entropy_bound_bits(100, 0.5) == pytest.approx(150.0)
    assert 32 / (entropy_bound_bits(1, 0.01)) == pytest.approx(352.5, abs=0.5)
    with pytest.raises(ValueError):
        entropy_bound_bits(10, 1.5)


def test_compeft_global_vs_per_tensor_scope() -> None:
    delta = {"big": torch.randn(1000) * 10.0, "small": torch.randn(1000) * 0.01}
    _, glob = roundtrip("compeft:0.1", delta)
    _, per = roundtrip("compeft:0.1,scope=per_tensor", delta)
    assert int((glob["big"] != 0).sum()) == 200 and int((glob["small"] != 0).sum()) == 0
    assert int((per["big"] != 0).sum()) == 100 and int((per["small"] != 0).sum()) == 100


def test_compeft_scales() -> None:
    delta = lora_like(3)
    layout = Layout.from_state(delta)
    _, out = roundtrip("compeft:0.1", delta)
    for name in layout.names:
        kept = out[name] != 0
        if kept.any():  # alpha (default 1.5) x mean |kept| per tensor, the sign of the original
            expected = 1.5 * delta[name][kept].abs().mean()
            assert torch.allclose(out[name][kept].abs(), expected.expand(int(kept.sum())))
            assert torch.equal(out[name][kept].sign(), delta[name][kept].sign())
    _, out = roundtrip("compeft:0.1,scale=std,alpha=2.0", delta)
    flat = torch.cat([delta[n].reshape(-1) for n in layout.names]).double()
    expected = 2.0 * flat.std(unbiased=False)
    nonzero = torch.cat([out[n].reshape(-1) for n in layout.names])
    assert torch.allclose(nonzero[nonzero != 0].abs().double(), expected.expand(int((nonzero != 0).sum())),
                          rtol=1e-5)


@pytest.mark.parametrize("spec", ["compeft:0.1", "topk:0.1", "compeft:0.1,scope=per_tensor"])
def test_fisher_selection_keeps_what_the_loss_is_sensitive_to(spec: str) -> None:
    g = torch.Generator().manual_seed(5)
    delta = {"flat": torch.randn(500, generator=g), "steep": 0.2 * torch.randn(500, generator=g)}
    fisher = {"flat": torch.full((500,), 1e-4), "steep": torch.ones(500)}  # a 100x larger sqrt(F) on "steep"
    layout = Layout.from_state(delta)
    magnitude, ranked = make_codec(spec + ",select=magnitude"), make_codec(spec + ",select=fisher")
    assert ranked.wants_fisher and not magnitude.wants_fisher and not make_codec("int8").wants_fisher
    by_size = magnitude.decode(magnitude.encode(delta, layout), layout)
    ignored = magnitude.decode(magnitude.encode(delta, layout, fisher=fisher), layout)
    assert all(torch.equal(by_size[n], ignored[n]) for n in delta)  # select=magnitude ignores the Fisher
    payload = ranked.encode(delta, layout, fisher=fisher)
    out = magnitude.decode(payload, layout)  # the wire format is the same: any decoder of the codec reads it
    score = torch.cat([delta[n].abs() * fisher[n].sqrt() for n in layout.names])
    expected = torch.zeros(1000, dtype=torch.bool)
    if "per_tensor" in spec:
        expected[score[:500].topk(50).indices] = True
        expected[500 + score[500:].topk(50).indices] = True
    else:
        expected[score.topk(100).indices] = True
    kept = torch.cat([out[n] != 0 for n in layout.names])
    assert torch.equal(kept, expected)  # the top-k of sqrt(F) * |x|, exactly
    if "per_tensor" not in spec:
        assert int((by_size["steep"] != 0).sum()) < 10 and int((out["steep"] != 0).sum()) > 90
    bad = {"flat": fisher["flat"], "steep": -fisher["steep"]}
    for wrong, words in [(bad, "non-negative"), ({**fisher, "steep": torch.full((500,), float("nan"))}, "finite"),
                         ({"flat": fisher["flat"]}, "")]:
        with pytest.raises(PayloadError, match=words):
            ranked.encode(delta, layout, fisher=wrong)


def test_compeft_ties_zeros_and_empty() -> None:
    delta = {"w": torch.ones(100), "z": torch.zeros(10)}
    payload, out = roundtrip("compeft:0.1,alpha=1", delta)
    assert torch.equal(out["w"][:11], torch.ones(11)) and not out["w"][11:].any()  # ties: lowest index
    payload, out = roundtrip("compeft:0.5", {"w": torch.zeros(64)})
    assert payload.breakdown() == {"positions": 0, "values": 0, "scales": 0, "header": payload.header.nbytes}
    assert not out["w"].any()
    payload, out = roundtrip("compeft:0.00005", lora_like())  # k rounds to 0: header only
    assert payload.nbytes == payload.header.nbytes
    payload, out = roundtrip("compeft:0.1", {"e": torch.zeros(0)})
    assert out["e"].shape == (0,)


def test_compeft_bitmap_at_high_density() -> None:
    x = torch.from_numpy(np.random.default_rng(2).standard_normal(20000).astype(np.float32))
    for p, mode in [(0.05, 1), (0.45, 0)]:  # 1 = Golomb gaps, 0 = bitmap
        payload, out = roundtrip(f"compeft:{p}", {"w": x})
        assert payload.fields[3] == mode
        assert int((out["w"] != 0).sum()) == round(p * 20000)


# ---------------------------------------------------------------- other codecs

@pytest.mark.parametrize("spec", ["qsgd:2,bucket=0", "qsgd:2,bucket=16"])
def test_qsgd_is_unbiased(spec: str) -> None:
    delta = {"w": torch.randn(200), "v": torch.randn(3, 5)}
    layout = Layout.from_state(delta)
    codec = make_codec(spec)
    rng = np.random.default_rng(0)
    mean = {k: torch.zeros_like(v) for k, v in delta.items()}
    rounds = 400
    for _ in range(rounds):
        out = codec.decode(codec.encode(delta, layout, rng=rng), layout)
        for k in mean:
            mean[k] += out[k] / rounds
    for k in delta:  # per element: |decoded - x| <= norm / s, so the mean's std <= norm / s / sqrt(rounds)
        norm = float(delta[k].norm())
        assert float((mean[k] - delta[k]).abs().max()) < 4 * norm / 2 / rounds**0.5


def test_qsgd_buckets_shrink_the_error() -> None:
    delta = {"w": torch.randn(20000)}
    errors = []
    for spec in ["qsgd:16,bucket=0", "qsgd:16", "qsgd:16,bucket=64"]:
        _, out = roundtrip(spec, delta)
        errors.append(float((out["w"] - delta["w"]).norm() / delta["w"].norm()))
    assert errors[0] > errors[1] > errors[2], errors


def test_fp16_and_bf16_clamp_instead_of_overflowing() -> None:
    delta = {"w": torch.tensor([1e6, -1e6, 3.4e38, 1.0])}
    _, out = roundtrip("fp16", delta)
    assert out["w"].tolist()[:2] == [65504.0, -65504.0]
    _, out = roundtrip("bf16", delta)
    assert torch.isfinite(out["w"]).all() and out["w"][3] == 1.0


# ---------------------------------------------------------------- error feedback

def test_error_feedback_carries_what_was_dropped() -> None:
    delta = lora_like(1)
    layout = Layout.from_state(delta)
    codec = make_codec("compeft:0.05")
    ef = ErrorFeedback()
    x = ef.compensate(delta)
    assert all(torch.equal(x[k], delta[k]) for k in delta)  # no residual yet
    decoded = codec.decode(codec.encode(x, layout), layout)
    ef.update(x, decoded)
    for k in delta:
        assert torch.allclose(ef.residual[k], delta[k] - decoded[k])
    x2 = ef.compensate(delta)
    for k in delta:
        assert torch.allclose(x2[k], 2 * delta[k] - decoded[k])


@pytest.mark.parametrize("spec", ["compeft:0.05", "topk:0.05", "sign", "int8", "qsgd:64"])
def test_error_feedback_sum_of_decoded_tracks_sum_of_deltas(spec: str) -> None:
    g = torch.Generator().manual_seed(0)
    drift = {"a": torch.randn(50, 20, generator=g), "b": torch.randn(300, generator=g) * 0.1}
    layout = Layout.from_state(drift)
    codec, ef, rng = make_codec(spec), ErrorFeedback(), np.random.default_rng(0)
    total = {k: torch.zeros_like(v) for k, v in drift.items()}
    sent = {k: torch.zeros_like(v) for k, v in drift.items()}
    rounds = 200
    for _ in range(rounds):
        delta = {k: v + 0.5 * torch.randn(v.shape, generator=g) * v.std() for k, v in drift.items()}
        x = ef.compensate(delta)
        decoded = codec.decode(codec.encode(x, layout, rng=rng), layout)
        ef.update(x, decoded)
        for k in delta:
            total[k] += delta[k]
            sent[k] += decoded[k]
    gap = sum(float((total[k] - sent[k]).pow(2).sum()) for k in total) ** 0.5
    assert gap == pytest.approx(ef.norm(), rel=1e-3, abs=1e-3)  # the residual is exactly what is missing
    scale = sum(float(total[k].pow(2).sum()) for k in total) ** 0.5
    assert gap < 0.1 * scale, (gap, scale)


def test_error_feedback_state_dict_round_trip() -> None:
    ef = ErrorFeedback()
    delta = lora_like()
    x = ef.compensate(delta)
    ef.update(x, {k: torch.zeros_like(v) for k, v in x.items()})
    state = ef.state_dict()
    assert all(a.dtype == np.float32 for a in state.values())
    other = ErrorFeedback()
    other.load_state_dict(state)
    assert all(torch.equal(other.residual[k], ef.residual[k]) for k in delta)
    with pytest.raises(PayloadError):
        other.load_state_dict({"a": np.array([1, 2])})
    with pytest.raises(PayloadError):
        other.load_state_dict({"a": np.array([np.nan], np.float32)})
    other.reset()
    assert other.norm() == 0.0 and other.state_dict() == {}


def test_error_feedback_drops_residual_on_shape_change() -> None:
    ef = ErrorFeedback()
    ef.update({"a": torch.ones(3)}, {"a": torch.zeros(3)})
    assert torch.equal(ef.compensate({"a": torch.ones(4)})["a"], torch.ones(4))


# ---------------------------------------------------------------- bit-level coding

@pytest.mark.parametrize("width", [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 62])
def test_fixed_width_packing_round_trips(width: int) -> None:
    from fedpeft.compression.bits import nbytes_for, pack_uint, unpack_uint
    rng = np.random.default_rng(width)
    values = rng.integers(0, 2**width, 1001, dtype=np.int64)
    values[:2] = [0, 2**width - 1]
    buf = pack_uint(values, width)
    assert buf.size == nbytes_for(1001 * width)
    assert np.array_equal(unpack_uint(buf, 1001, width, "test"), values)


@pytest.mark.parametrize("positions, total", [
    ([0], 1), ([0], 1000), ([999], 1000), (list(range(1000)), 1000), (list(range(10, 500)), 1000),
    ([0, 1, 2, 900, 901, 999], 1000), (list(range(0, 100000, 7)), 100000), ([5, 2**20], 2**20 + 1),
])
def test_position_coding_round_trips(positions: list[int], total: int) -> None:
    from fedpeft.compression.bits import decode_positions, encode_positions, nbytes_for
    pos = np.asarray(positions, np.int64)
    fields, buf = encode_positions(pos, total)
    assert buf.size <= nbytes_for(total)  # never worse than a bitmap
    assert np.array_equal(decode_positions(buf, tuple(fields), pos.size, total), pos)
