"""The split-learning wire: the framed tensor format and the gRPC stream (real gRPC on loopback).

The body is the toy in ``split_toy_server.py`` (a deterministic per-client tanh(Linear) with SGD),
so these tests do not depend on the real model cut. The multi-process test runs that file as a
server process, kills it with SIGKILL twice (once between calls, once inside a call) and checks
that the client finishes with exactly the results of an uninterrupted in-process run.
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from split_toy_server import FINGERPRINT, ToyBody

from fedpeft import certs
from fedpeft.deploy.flower import free_port
from fedpeft.errors import SplitError
from fedpeft.split import frames
from fedpeft.split.frames import TOKEN_CHARS, ErrorCode, Kind, Limits, decode, encode, encoded_size, open_text
from fedpeft.split.guard import Refused, ServerLimits, identity_of
from fedpeft.split.server import build_body, serve
from fedpeft.split.service import BodyService
from fedpeft.split.transport import METHOD, REJOIN, GrpcBody, RetryPolicy

log = logging.getLogger(__name__)
FAST = RetryPolicy(initial=0.05, multiplier=2.0, max_delay=0.5, total=10.0)
TOKEN = "ab" * (TOKEN_CHARS // 2)  # a session token for raw frames
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


# ------------------------------------------------------------------------------------ helpers

def _bits(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


@st.composite
def tensor_dicts(draw: st.DrawFn, max_tensors: int = 4) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.text(min_size=1, max_size=12), max_size=max_tensors, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        n = int(np.prod(shape)) if shape else 1
        if dtype == torch.bool:
            out[name] = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
        else:
            raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
            out[name] = torch.frombuffer(bytearray(raw), dtype=dtype) if n else torch.empty(0, dtype=dtype)
        out[name] = out[name].reshape(shape)
    return out


def _batch(g: torch.Generator, batch: int = 2, seq: int = 5, dim: int = 16) -> dict[str, torch.Tensor]:
    return {"hidden": torch.randn(batch, seq, dim, generator=g),
            "attention_mask": (torch.rand(batch, seq, generator=g) > 0.2).long()}


def run_steps(body: BodyService, cid: str, steps: int, seed: int = 0,
              before_backward: Callable[[int], None] | None = None, **shape: int) -> list[tuple[torch.Tensor, ...]]:
    """A split client's loop against ``body``: loss 0.5 ||y - 0.5||^2; returns (y, dL/dx) per step."""
    g = torch.Generator().manual_seed(seed)
    body.open(cid, FINGERPRINT)
    out = []
    for step in range(steps):
        y = body.forward(cid, step, _batch(g, **shape))["hidden"]
        if before_backward:
            before_backward(step)
        gx = body.backward(cid, step, {"grad": y - 0.5})["grad"]
        out.append((y, gx))
    body.close(cid)
    return out


def assert_same(a: list[tuple[torch.Tensor, ...]], b: list[tuple[torch.Tensor, ...]]) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        for u, v in zip(x, y):
            assert u.dtype == v.dtype and torch.equal(u, v), f"step {step} differs"


def raw_exchange(address: str, requests: list[bytes]) -> list[frames.Frame]:
    """Send raw frames on one stream (no GrpcBody) and decode every answer."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
        return [decode(r) for r in call(iter(requests), timeout=10)]


# ------------------------------------------------------------------------------------ frames

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=tensor_dicts(), kind=st.sampled_from(list(Kind)), step=st.integers(-(1 << 63), (1 << 63) - 1),
       cid=st.text(max_size=20), text=st.text(max_size=30))
def test_frame_round_trip_is_bit_exact(tensors: dict, kind: Kind, step: int, cid: str, text: str) -> None:
    data = encode(kind, cid, step, tensors, text=text, code=7)
    assert len(data) == encoded_size(tensors, None, cid, text)
    f = decode(data)
    assert (f.kind, f.client_id, f.step, f.text, f.code, f.wire_dtype) == (kind, cid, step, text, 7, None)
    assert list(f.tensors) == list(tensors)
    for name, t in tensors.items():
        got = f.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape and _bits(got) == _bits(t)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_bf16_wire_rounds_to_bf16_and_restores_the_dtype(values: list[float], dtype: torch.dtype) -> None:
    t = torch.tensor(values, dtype=dtype)
    ids = torch.arange(len(values))
    data = encode(Kind.FORWARD, "c", 1, {"x": t, "ids": ids}, wire_dtype="bf16")
    assert len(data) == encoded_size({"x": t, "ids": ids}, "bf16", "c")
    f = decode(data)
    assert f.wire_dtype == "bf16" and f.tensors["x"].dtype == dtype
    assert torch.equal(f.tensors["x"], t.to(torch.bfloat16).to(dtype))  # round-to-nearest-even, inf/0 kept
    assert torch.equal(f.tensors["ids"], ids)  # integer tensors are never rounded
    finite = torch.isfinite(f.tensors["x"]) & (t.abs() > 1e-30)
    rel = ((f.tensors["x"] - t).abs() / t.abs())[finite]
    assert rel.numel() == 0 or rel.max() <= 2.0 ** -8


@st.composite
def damaged_frames(draw: st.DrawFn) -> bytes:
    data = bytearray(encode(draw(st.sampled_from(list(Kind))), draw(st.text(max_size=8)), draw(st.integers(0, 99)),
                            draw(tensor_dicts(max_tensors=3)), wire_dtype=draw(st.sampled_from([None, "bf16"]))))
    how = draw(st.sampled_from(["truncate", "flip", "overwrite", "append"]))
    if how == "truncate":
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    if how == "append":
        return bytes(data + draw(st.binary(min_size=1, max_size=16)))
    pos = draw(st.integers(0, len(data) - 1))
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    else:
        junk = draw(st.binary(min_size=1, max_size=12))
        data[pos:pos + len(junk)] = junk
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=damaged_frames())
def test_damaged_frames_only_ever_raise_split_error(data: bytes) -> None:
    limits = Limits(max_frame_bytes=1 << 16, max_decoded_bytes=1 << 18)
    try:
        decode(data, limits)  # a flipped bit in tensor data is still a valid frame
    except SplitError:
        pass


@settings(max_examples=200, deadline=None)
@given(tail=st.binary(max_size=200), prefix=st.sampled_from([b"", b"FPSF\x01", b"FPSF\x01\x02\x00\x00"]))
def test_random_bytes_only_ever_raise_split_error(tail: bytes, prefix: bytes) -> None:
    try:
        decode(prefix + tail)
    except SplitError:
        pass


def _header(kind: int = 2, n: int = 1, cid: bytes = b"c", text: bytes = b"", magic: bytes = b"FPSF",
            version: int = 1, flags: int = 0) -> bytes:
    return struct.pack("<4sBBBBqHHI", magic, version, kind, flags, 0, 0, n, len(cid), len(text)) + cid + text


def _tensor(name: bytes = b"x", dtype: int = 1, wire: int = 1, dims: tuple[int, ...] = (2,),
            nbytes: int | None = None, data: bytes | None = None, name_len: int | None = None) -> bytes:
    data = b"\0" * (8 * int(np.prod(dims))) if data is None else data
    nbytes = len(data) if nbytes is None else nbytes
    head = struct.pack("<HBBB", len(name) if name_len is None else name_len, dtype, wire, len(dims))
    return head + name + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<Q", nbytes) + data


HOSTILE = {
    "magic": _header(magic=b"GIF8") + _tensor(),
    "version": _header(version=9) + _tensor(),
    "kind": _header(kind=42) + _tensor(),
    "flags": _header(flags=0x80) + _tensor(),
    "tensors": _header(n=60000),
    "client id": _header(cid=b"c" * 300, n=0),
    "truncated": _header(n=2) + _tensor(dims=(2,), data=b"\0" * 8),
    "UTF-8": _header(cid=b"\xff\xfe", n=0),
    "name length": _header() + _tensor(name=b""),
    "dtype code": _header() + _tensor(dtype=42, wire=42),
    "cannot carry": _header() + _tensor(dtype=5, wire=3, data=b"\0" * 4),
    "dims, at most": _header() + _tensor(dims=(1,) * 20, data=b"\0" * 4),
    "declares": _header() + _tensor(dims=(1 << 20, 1 << 20), data=b"\0" * 16),
    "dimension 9223372036854775808 exceeds": _header() + _tensor(dims=(0, 1 << 63), nbytes=0, data=b""),
    "needs 4611686018427387904 bytes": _header() + _tensor(dims=(1 << 30, 1 << 30), nbytes=1 << 62, data=b""),
    "appears twice": _header(n=2) + _tensor(data=b"\0" * 8) + _tensor(data=b"\0" * 8),
    "unexpected bytes": _header() + _tensor(data=b"\0" * 8) + b"\0",
    "bool values": _header() + _tensor(dtype=10, wire=10, dims=(3,), data=b"\x00\x01\x02"),
    "name is not valid": _header() + _tensor(name=b"\xc3"),
}


@pytest.mark.parametrize("match", sorted(HOSTILE))
def test_hostile_headers_are_rejected_before_allocation(match: str) -> None:
    with pytest.raises(SplitError, match=match):
        decode(HOSTILE[match])


def test_size_limits_and_finite_check() -> None:
    x = {"x": torch.ones(40)}
    with pytest.raises(SplitError, match="exceeds the limit"):
        decode(encode(Kind.FORWARD, "c", 0, x), Limits(max_frame_bytes=100))
    with pytest.raises(SplitError, match="decoded tensors would take"):  # 80 wire bytes, 160 decoded
        decode(encode(Kind.FORWARD, "c", 0, x, wire_dtype="bf16"), Limits(max_decoded_bytes=100))
    nan = encode(Kind.FORWARD, "c", 0, {"x": torch.tensor([1.0, float("nan")])})
    assert torch.isnan(decode(nan).tensors["x"][1])
    with pytest.raises(SplitError, match="NaN"):
        decode(nan, Limits(require_finite=True))
    with pytest.raises(SplitError, match="dtype complex64"):
        encode(Kind.FORWARD, "c", 0, {"z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(SplitError, match="wire dtype"):
        encode(Kind.FORWARD, "c", 0, {}, wire_dtype="fp8")


def test_token_bounds_are_checked_from_the_header() -> None:
    """The sequence and token caps read only the declared shape: a frame whose data is missing fails on them."""
    limits = Limits(max_seq_len=48, max_tokens=256)
    ok = encode(Kind.FORWARD, "c", 0, {"hidden": torch.zeros(5, 48, 8), "attention_mask": torch.ones(5, 48)})
    assert decode(ok, limits).tensors["hidden"].shape == (5, 48, 8)
    long = encode(Kind.FORWARD, "c", 0, {"hidden": torch.zeros(1, 49, 8)})
    with pytest.raises(SplitError, match="sequence of 49 tokens"):
        decode(long[:-100], limits)  # truncated: the shape alone decides
    with pytest.raises(SplitError, match="6 x 48 = 288 tokens"):
        decode(encode(Kind.BACKWARD, "c", 0, {"grad": torch.zeros(6, 48, 8)}), limits)
    assert decode(encode(Kind.FORWARD, "c", 0, {"flat": torch.zeros(1000)}), limits)  # 1-D tensors carry no tokens


def test_frame_overhead_is_small() -> None:
    t = {"hidden": torch.zeros(8, 48, 64), "attention_mask": torch.ones(8, 48, dtype=torch.int64)}
    size = encoded_size(t, None, "client-0", TOKEN)  # a request carries its session token
    payload = sum(v.numel() * v.element_size() for v in t.values())
    log.info("forward frame: %d bytes, payload %d, overhead %d", size, payload, size - payload)
    assert size - payload == 24 + 8 + TOKEN_CHARS + (5 + 6 + 3 * 8 + 8) + (5 + 14 + 2 * 8 + 8)
    assert size == 101_526  # docs/split-transport.md


# ------------------------------------------------------------------------------------ transport

@pytest.fixture
def toy_server():
    servers = []

    def start(body: BodyService | None = None, **kw: object):
        server = serve(body or ToyBody(), "127.0.0.1", kw.pop("port", 0), **kw)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop(grace=0)


def test_loopback_round_trips_equal_in_process_calls_exactly(toy_server) -> None:
    server = toy_server()
    with GrpcBody(server.address, retry=FAST) as remote:
        got = run_steps(remote, "alice", 5, seed=1)
        stats = remote.stats
    assert_same(got, run_steps(ToyBody(), "alice", 5, seed=1))
    g = torch.Generator().manual_seed(1)
    fwd = encoded_size(_batch(g), None, "alice", TOKEN)  # a request carries the session token
    assert stats.calls == 12 and stats.retries == 0
    assert stats.by_kind["forward"] == [5 * fwd, 5 * encoded_size({"hidden": torch.zeros(2, 5, 16)}, None, "alice")]
    assert stats.by_kind["backward"][0] == 5 * encoded_size({"grad": torch.zeros(2, 5, 16)}, None, "alice", TOKEN)
    log.info("per step: %d bytes up, %d down", *(a + b for a, b in zip(stats.by_kind["forward"],
                                                                      stats.by_kind["backward"])))


def test_bf16_wire_halves_the_bytes_and_rounds_both_ways(toy_server) -> None:
    server = toy_server()
    shape = {"batch": 8, "seq": 48}
    bytes_by_wire = {}
    for wire in (None, "bf16"):
        with GrpcBody(server.address, wire_dtype=wire, retry=FAST) as remote:
            got = run_steps(remote, f"c-{wire}", 3, seed=2, **shape)
            bytes_by_wire[wire] = (remote.stats.by_kind["forward"], remote.stats.by_kind["backward"])
    fp32, bf16 = bytes_by_wire[None], bytes_by_wire["bf16"]
    log.info("fp32 wire %s, bf16 wire %s", fp32, bf16)
    assert bf16[0][1] / fp32[0][1] < 0.51 and bf16[1][0] / fp32[1][0] < 0.51  # hidden down, grad up
    assert bf16[1][1] / fp32[1][1] < 0.51 and bf16[0][0] / fp32[0][0] < 0.6  # grad down; hidden + int mask up

    def r(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).to(t.dtype)

    ref, g, want = ToyBody(), torch.Generator().manual_seed(2), []
    ref.open("c-bf16", FINGERPRINT)
    for step in range(3):
        batch = _batch(g, **shape)
        y = r(ref.forward("c-bf16", step, {**batch, "hidden": r(batch["hidden"])})["hidden"])
        want.append((y, r(ref.backward("c-bf16", step, {"grad": r(y - 0.5)})["grad"])))
    assert_same(got, want)


def test_mutual_tls_with_fedpeft_certificates(toy_server, tmp_path: Path) -> None:
    pki = certs.make_certs("localhost", tmp_path / "pki")
    alice = certs.make_client_cert(pki.ca_cert.parent, "alice")
    body = ToyBody()
    server = toy_server(body, certs=pki)
    with GrpcBody(f"localhost:{server.port}", ca_cert=pki.ca_cert, client_cert=alice.cert, client_key=alice.key,
                  retry=FAST) as remote:
        assert_same(run_steps(remote, "tls", 2), run_steps(ToyBody(), "alice/tls", 2))
    assert list(body.weights) == ["alice/tls"]  # the body keeps the session under the certificate's identity
    quick = RetryPolicy(initial=0.05, total=0.6)
    with pytest.raises(SplitError, match="gave up"), GrpcBody(server.address, retry=quick) as plain:
        plain.open("p", FINGERPRINT)
    with pytest.raises(SplitError, match="gave up"), GrpcBody(server.address, ca_cert=pki.ca_cert,
                                                              retry=quick) as no_client_cert:
        no_client_cert.open("n", FINGERPRINT)
    rogue = certs.make_client_cert(certs.make_certs("localhost", tmp_path / "rogue").ca_cert.parent, "alice")
    with pytest.raises(SplitError, match="gave up"), GrpcBody(server.address, ca_cert=pki.ca_cert, retry=quick,
                                                              client_cert=rogue.cert, client_key=rogue.key) as forged:
        forged.open("tls", FINGERPRINT)  # the right name, signed by another CA
    with pytest.raises(SplitError, match="both the client certificate and its key"):
        GrpcBody(server.address, ca_cert=pki.ca_cert, client_cert=alice.cert)
    other = certs.make_certs("localhost", tmp_path / "other")
    with pytest.raises(SplitError, match="gave up"), GrpcBody(server.address, ca_cert=other.ca_cert,
                                                              retry=quick) as wrong_ca:
        wrong_ca.open("w", FINGERPRINT)
    with pytest.raises(SplitError, match="CA certificate"):
        GrpcBody(server.address, ca_cert=tmp_path / "missing.crt")
    mtls = {"ca_cert": pki.ca_cert, "client_cert": alice.cert, "client_key": alice.key, "retry": FAST}
    with GrpcBody(f"localhost:{server.port}", **mtls) as old, GrpcBody(f"localhost:{server.port}", **mtls) as new:
        old.open("again", FINGERPRINT)
        new.open("again", FINGERPRINT)  # the same identity may start over (e.g. its process restarted) ...
        with pytest.raises(SplitError, match="DENIED"):
            old.forward("again", 0, _batch(torch.Generator().manual_seed(0)))  # ... and the old session is gone
        new.close("again")


def test_an_identity_is_a_common_name_without_a_slash() -> None:
    class Context:
        def __init__(self, name: bytes) -> None:
            self.name = name

        def auth_context(self) -> dict[str, list[bytes]]:
            return {"x509_common_name": [self.name]} if self.name else {}

        def peer(self) -> str:
            return "ipv4:127.0.0.1:5555"

    assert identity_of(Context(b"hospital-a"), True) == "hospital-a"  # type: ignore[arg-type]
    assert identity_of(Context(b""), False) == "peer:ipv4:127.0.0.1:5555"  # type: ignore[arg-type]
    for bad in (b"", b"a/b"):  # "a/b" + client "c" would be the body's "a/b/c", like "a" + client "b/c"
        with pytest.raises(Refused, match="common name"):
            identity_of(Context(bad), True)  # type: ignore[arg-type]


def test_plaintext_sessions_are_bound_to_their_token(toy_server) -> None:
    """Without certificates anyone on loopback may name a client id; only its token's holder may use it."""
    body = ToyBody()
    server = toy_server(body)
    with pytest.raises(SplitError, match="plaintext"):
        serve(ToyBody(), "0.0.0.0", 0)
    g = torch.Generator().manual_seed(0)
    with GrpcBody(server.address, retry=FAST) as victim:
        victim.open("vic", FINGERPRINT)
        y = victim.forward("vic", 0, _batch(g))["hidden"]
        guess = "cd" * (TOKEN_CHARS // 2)
        answers = raw_exchange(server.address, [
            encode(Kind.BACKWARD, "vic", 0, {"grad": torch.ones(2, 5, 16)}, text=guess),
            encode(Kind.CLOSE, "vic", 0, text=guess),
            encode(Kind.OPEN, "vic", 0, text=open_text(guess, FINGERPRINT)),
            encode(Kind.OPEN, "vic", 0, text=open_text(guess, FINGERPRINT), code=REJOIN)])
        assert [(a.kind, a.code) for a in answers] == [(Kind.ERROR, ErrorCode.DENIED)] * 4
        assert "another session" in answers[0].text and body.backward_calls == 0
        victim.backward("vic", 0, {"grad": y - 0.5})
        victim.close("vic")
    assert body.backward_calls == 1 and victim.stats.replays == 0


def test_the_session_caps_refuse_one_more_open_with_a_clear_error(toy_server, tmp_path: Path) -> None:
    server = toy_server(server_limits=ServerLimits(max_sessions=3, max_sessions_per_identity=10))
    answers = raw_exchange(server.address, [encode(Kind.OPEN, f"s{i}", 0, text=open_text(TOKEN, FINGERPRINT))
                                            for i in range(4)])
    assert [(a.kind, a.code) for a in answers] == [(Kind.REPLY, Kind.OPEN)] * 3 + [(Kind.ERROR, ErrorCode.LIMIT)]
    assert server.sessions == 3  # the stream ended: they wait for their clients to rejoin (until idle_timeout)
    with pytest.raises(SplitError, match="split.max_sessions"), GrpcBody(server.address, retry=FAST) as late:
        late.open("s4", FINGERPRINT)
    # one identity opens and closes new client ids one after the other: each may cost a set of server adapters
    pki = certs.make_certs("localhost", tmp_path / "pki")
    mallory = certs.make_client_cert(pki.ca_cert.parent, "mallory")
    body = ToyBody()
    server = toy_server(body, certs=pki, server_limits=ServerLimits(max_clients_per_identity=3))
    with GrpcBody(f"localhost:{server.port}", ca_cert=pki.ca_cert, client_cert=mallory.cert,
                  client_key=mallory.key, retry=FAST) as remote:
        for i in range(3):
            remote.open(f"c{i}", FINGERPRINT)
            remote.close(f"c{i}")
        with pytest.raises(SplitError, match="split.max_clients_per_identity"):
            remote.open("c3", FINGERPRINT)
        remote.open("c0", FINGERPRINT)  # a client id it already has is fine
    assert sorted(body.weights) == ["mallory/c0", "mallory/c1", "mallory/c2"]


def test_malformed_frames_get_error_frames_and_the_server_stays_up(toy_server) -> None:
    server = toy_server()
    g = torch.Generator().manual_seed(0)
    answers = raw_exchange(server.address, [
        b"\x00garbage" * 4,
        encode(Kind.FORWARD, "bob", 0, _batch(g), text=TOKEN),   # no session yet
        encode(Kind.OPEN, "bob", 0, text=open_text(TOKEN, FINGERPRINT)),
        encode(Kind.REPLY, "bob", 0),                            # not a request
        encode(Kind.FORWARD, "bob", 0, {"x": torch.zeros(2)}, text=TOKEN),   # the body raises KeyError
        encode(Kind.FORWARD, "bob", 1, {"hidden": torch.full((1, 2, 16), float("inf")),
                                        "attention_mask": torch.ones(1, 2)}, text=TOKEN),
        encode(Kind.OPEN, "eve", 0, text=open_text(TOKEN, "another-model")),
        encode(Kind.OPEN, "eve", 0, text=FINGERPRINT),           # no session token
        encode(Kind.FORWARD, "bob", 2, _batch(g), text=TOKEN),
    ])
    kinds = [(a.kind, a.code) for a in answers]
    assert kinds == [(Kind.ERROR, ErrorCode.MALFORMED), (Kind.ERROR, ErrorCode.NOT_OPEN), (Kind.REPLY, Kind.OPEN),
                     (Kind.ERROR, ErrorCode.MALFORMED), (Kind.ERROR, ErrorCode.INTERNAL),
                     (Kind.ERROR, ErrorCode.MALFORMED), (Kind.ERROR, ErrorCode.REJECTED),
                     (Kind.ERROR, ErrorCode.REJECTED), (Kind.REPLY, Kind.FORWARD)]
    assert "not a fedpeft split frame" in answers[0].text and "KeyError" in answers[4].text
    assert "NaN or infinite" in answers[5].text and "fingerprint" in answers[6].text
    assert "session token" in answers[7].text
    with GrpcBody(server.address, retry=FAST) as remote:
        with pytest.raises(SplitError, match="fingerprint"):
            remote.open("eve", "another-model")
        with pytest.raises(SplitError, match="open"):
            remote.forward("nobody", 0, _batch(g))
        assert len(run_steps(remote, "carol", 2)) == 2


def test_a_repeated_request_is_answered_from_the_cache(toy_server) -> None:
    body = ToyBody()
    server = toy_server(body)
    g = torch.Generator().manual_seed(0)
    fwd = encode(Kind.FORWARD, "dan", 0, _batch(g), text=TOKEN)
    bwd = encode(Kind.BACKWARD, "dan", 0, {"grad": torch.ones(2, 5, 16)}, text=TOKEN)
    a = raw_exchange(server.address, [encode(Kind.OPEN, "dan", 0, text=open_text(TOKEN, FINGERPRINT)), fwd, fwd,
                                      bwd, bwd,
                                      encode(Kind.BACKWARD, "dan", 7, {"grad": torch.ones(2, 5, 16)}, text=TOKEN)])
    assert torch.equal(a[1].tensors["hidden"], a[2].tensors["hidden"])
    assert torch.equal(a[3].tensors["grad"], a[4].tensors["grad"]) and body.backward_calls == 1
    assert (a[5].kind, a[5].code) == (Kind.ERROR, ErrorCode.STATE_LOST)


def test_two_clients_run_concurrently(toy_server) -> None:
    server = toy_server(ToyBody(barrier=threading.Barrier(2)))  # forward waits until both clients are in it
    results: dict[str, list] = {}

    def client(cid: str) -> None:
        with GrpcBody(server.address, retry=FAST) as remote:
            results[cid] = run_steps(remote, cid, 3, seed=len(cid))

    threads = [threading.Thread(target=client, args=(cid,)) for cid in ("ann", "benedict")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for cid in ("ann", "benedict"):
        assert_same(results[cid], run_steps(ToyBody(), cid, 3, seed=len(cid)))


def test_restart_loses_the_forward_state_and_the_client_replays_it(toy_server, tmp_path: Path) -> None:
    port = free_port()
    servers = [toy_server(ToyBody(), port=port, state_dir=tmp_path / "state", save_every=1)]
    with pytest.raises(SplitError, match="cannot listen"):  # no silent second server on a busy port
        serve(ToyBody(), "127.0.0.1", port)

    def restart(step: int) -> None:
        if step == 3:
            servers[-1].stop(grace=0)
            servers.append(toy_server(ToyBody(), port=port, state_dir=tmp_path / "state"))

    with GrpcBody(f"127.0.0.1:{port}", retry=FAST) as remote:
        got = run_steps(remote, "erin", 6, before_backward=restart)
        assert remote.stats.replays == 1 and remote.stats.reconnects == 1 and remote.stats.retries >= 1
    assert_same(got, run_steps(ToyBody(), "erin", 6))


def test_a_timed_out_call_reconnects_and_is_answered_once(toy_server) -> None:
    body = ToyBody(delay=1.0, slow_steps={1})  # the backward of step 1 outlasts the client's call timeout
    server = toy_server(body)
    with GrpcBody(server.address, retry=FAST, call_timeout=0.4) as remote:
        got = run_steps(remote, "ida", 3)
        assert remote.stats.reconnects >= 1 and remote.stats.replays == 0
    assert body.backward_calls == 3  # the resent backward waited for the first one and got its cached reply
    assert_same(got, run_steps(ToyBody(), "ida", 3))


def test_a_stream_broken_between_forward_and_backward_applies_the_step_once(toy_server) -> None:
    """The server frees a stream's forward state when the stream ends; the client rejoins and replays it
    (unless its rejoin beat the server to noticing the end: then the state was still there)."""
    body = ToyBody()
    server = toy_server(body)
    with GrpcBody(server.address, retry=FAST) as remote:
        got = run_steps(remote, "jo", 3, before_backward=lambda step: remote.shutdown())  # drop the stream
        assert remote.stats.reconnects == 3 and remote.stats.replays <= 3
    assert body.backward_calls == 3
    assert_same(got, run_steps(ToyBody(), "jo", 3))


def test_a_saved_reply_answers_a_repeated_backward_after_restart(toy_server, tmp_path: Path) -> None:
    first = toy_server(ToyBody(), state_dir=tmp_path / "state", save_every=1)
    g = torch.Generator().manual_seed(0)
    bwd = encode(Kind.BACKWARD, "fay", 0, {"grad": torch.ones(2, 5, 16)}, text=TOKEN)
    a = raw_exchange(first.address, [encode(Kind.OPEN, "fay", 0, text=open_text(TOKEN, FINGERPRINT)),
                                     encode(Kind.FORWARD, "fay", 0, _batch(g), text=TOKEN), bwd])
    first.stop(grace=0)
    body = ToyBody()
    second = toy_server(body, state_dir=tmp_path / "state")
    b = raw_exchange(second.address, [encode(Kind.OPEN, "fay", 0, text=open_text(TOKEN, FINGERPRINT), code=REJOIN),
                                      bwd])
    assert b[1].kind == Kind.REPLY and torch.equal(a[2].tensors["grad"], b[1].tensors["grad"])
    assert body.backward_calls == 0  # the step was not applied a second time


def test_the_client_gives_up_after_its_retry_budget() -> None:
    t0 = time.monotonic()
    with pytest.raises(SplitError, match="gave up after") as err, \
            GrpcBody(f"127.0.0.1:{free_port()}", retry=RetryPolicy(initial=0.05, total=1.0)) as remote:
        remote.open("gus", FINGERPRINT)
    assert time.monotonic() - t0 < 3.0 and "attempts" in str(err.value)


def test_build_body_from_a_config_serves_a_cut_tiny_bert(tiny_cfg, toy_server, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fedpeft.runtime import Runtime
    from fedpeft.split.cut import cut_model

    cfg = tiny_cfg(**{"run.device": "cpu"})
    cfg.split = SimpleNamespace(front_layers=1, back_layers=0, server_adapters="per_client")  # until [split] exists
    body = build_body(cfg)
    server = toy_server(body, state_dir=tmp_path / "state")
    fingerprint = cut_model(Runtime(cfg).model, cfg.model.task, 1, 0).fingerprint
    hidden = torch.randn(2, 7, cfg.model.tiny_hidden_size, generator=torch.Generator().manual_seed(0))
    with GrpcBody(server.address, retry=FAST) as remote:
        with pytest.raises(SplitError, match="fingerprint"):
            remote.open("kim", fingerprint + "x")
        remote.open("kim", fingerprint)
        out = remote.forward("kim", 1, {"hidden": hidden, "attention_mask": torch.ones(2, 7, dtype=torch.int64)})
        grad = remote.backward("kim", 1, {"grad": torch.ones_like(out["hidden"])})["grad"]
        remote.close("kim")
    assert out["hidden"].shape == hidden.shape and grad.shape == hidden.shape and torch.isfinite(grad).all()
    restarted = build_body(cfg)
    assert not all(torch.equal(v, restarted.adapter_state("kim")[k]) for k, v in body.adapter_state("kim").items())
    toy_server(restarted, state_dir=tmp_path / "state")  # loads what the close saved: the stepped adapters
    for k, v in body.adapter_state("kim").items():
        assert torch.equal(v, restarted.adapter_state("kim")[k]), k


# ------------------------------------------------------------------------------------ multi-process

class ToyServerProcess:
    """``split_toy_server.py`` in its own session on a fixed port; kill() SIGKILLs its group."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp, self.port, self.proc, self.starts = tmp, port, None, 0

    def start(self) -> None:
        self.starts += 1
        log_file = open(self.tmp / f"server-{self.starts}.log", "wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("split_toy_server.py")), "--port", str(self.port),
             "--state-dir", str(self.tmp / "state"), "--save-every", "1", "--delay", "0.2"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log_file.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def logs(self) -> str:
        return "\n".join((self.tmp / f"server-{i}.log").read_text(errors="replace")[-1500:]
                         for i in range(1, self.starts + 1))


@pytest.mark.slow
def test_server_process_killed_twice_and_the_client_recovers_exactly(tmp_path: Path) -> None:
    server = ToyServerProcess(tmp_path, free_port())
    killer: list[threading.Thread] = []

    def chaos(step: int) -> None:
        if step == 4:  # between forward and backward: the restarted server lost the forward
            server.kill()
            server.start()
        if step == 9:  # while the backward runs (the toy body sleeps 0.2 s in it)
            def kill_and_restart() -> None:
                time.sleep(0.1)
                server.kill()
                server.start()
            killer.append(threading.Thread(target=kill_and_restart))
            killer[-1].start()

    try:
        server.start()
        with GrpcBody(f"127.0.0.1:{server.port}", retry=RetryPolicy(initial=0.1, max_delay=1.0, total=45.0),
                      call_timeout=20.0) as remote:
            got = run_steps(remote, "hal", 12, before_backward=chaos)
            stats = remote.stats
        for t in killer:
            t.join()
    finally:
        server.kill()
    log.info("stats after two kills: %s", stats)
    # the second kill may land just before the backward arrives or inside it: a replay either way
    assert server.starts == 3 and stats.reconnects >= 2 and stats.replays >= 1, server.logs()
    assert_same(got, run_steps(ToyBody(), "hal", 12))
