"""Integer codecs that sum inside SecAgg+'s field, and the plain ``sint`` codec they are compared with.

Secure aggregation adds masked integers modulo ``M``; any codec whose values are integers on a grid
shared by every client sums there. :func:`field_modulus` sizes the field for ``m`` clients of ``levels``
steps each (the smallest M with ``m * levels < M``: no wrap-around is possible, and M need not be a power of 2),
:func:`pack_field` / :func:`unpack_field` put each masked element on the wire at close to ``log2(M)`` bits (base-M
digits packed a few at a time) instead of Flower's int64, and
:func:`subspace` draws the coordinates every client of a round keeps (the same ones, from the server's
per-round seed, so masks and positions line up).

The key exchange travels compact too (:func:`compact_key_exchange`, :func:`expand_key_exchange`): Flower's SecAgg+
sends public keys as PEM text and the encrypted key shares as base64 Fernet tokens; the client sends their binary
forms (X9.62 compressed EC points, raw tokens) and the server restores the exact bytes Flower's workflow expects
(lossless; a key that is not a point on the curve is that client's :class:`PayloadError`). Where the field is not
packed, the server still checks what Flower's workflow would parse (:func:`check_key_exchange`,
:func:`check_dense_field`), so a malformed dense reply costs that client only.

``sint:b,range=r[,keep=f]`` is the same quantizer without secure aggregation: each element is clipped
to ``+-r`` and rounded stochastically (unbiased inside the range) onto ``2**b - 1`` points (``2**b - 2``
steps, 0 included, as Flower's SecAgg+ quantizer with ``quantization_range = 2**b - 2`` does), packed at
``b`` bits; ``keep < 1`` keeps a random subspace of that fraction (its seed is in the header, no
positions travel) and the decoder scales it by ``1 / keep``.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpeft.compression.base import Codec, Encoded, register_codec
from fedpeft.compression.bits import nbytes_for, pack_uint, unpack_uint
from fedpeft.compression.payload import Layout, require
from fedpeft.errors import PayloadError
from fedpeft.fields import option

_EMPTY = np.zeros(0, np.uint8)
_SEED_BOUND = 2**31  # header fields are int64; seeds stay positive and small


def levels_for(bits: int) -> int:
    """Quantization steps of a ``bits``-bit symmetric grid: ``2**bits - 1`` points, 0 among them."""
    return 2**bits - 2


def field_bits(clients: int, levels: int) -> int:
    """Bits of the smallest power-of-2 modulus M with ``clients * levels < M`` (the sum never wraps)."""
    return max(1, math.ceil(math.log2(clients * levels + 1)))


def field_modulus(clients: int, levels: int) -> int:
    """The smallest modulus M with ``clients * levels < M``: the sum never wraps and no value of M is unused."""
    return clients * levels + 1


def digit_groups(modulus: int) -> tuple[int, int]:
    """``(k, bits)``: masked elements travel ``k`` at a time as one ``bits``-bit number in base ``modulus`` (the
    ``k`` with the fewest bits per element among groups below ``2**63``; ``k = 1`` for a power of 2)."""
    best_k, best_bits = 1, (modulus - 1).bit_length()
    k = 2
    while modulus**k <= 2**63:
        bits = (modulus**k - 1).bit_length()
        if bits * best_k < best_bits * k:
            best_k, best_bits = k, bits
        k += 1
    return best_k, best_bits


def subspace(seed: int, total: int, keep: float) -> np.ndarray:
    """The sorted coordinates a round keeps: ``ceil(keep * total)`` of ``total``, drawn from ``seed``."""
    if keep >= 1.0:
        return np.arange(total)
    k = max(1, math.ceil(keep * total))
    return np.sort(np.random.default_rng(seed).permutation(total)[:k])


def stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round each element down or up with probabilities that make ``E[result] = x`` (int64)."""
    low = np.floor(x)
    return (low + (rng.random(x.shape) < (x - low))).astype(np.int64)


def pack_field(values: list[np.ndarray], modulus: int) -> bytes:
    """Flower's masked arrays (int64 in ``[0, modulus)``) as one byte string: groups of base-``modulus`` digits
    (:func:`digit_groups`), so an element costs ``log2(modulus)`` bits, not the next whole bit."""
    flat = np.concatenate([np.asarray(v, dtype=np.int64).ravel() for v in values])
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= modulus):
        raise PayloadError(f"masked values outside [0, {modulus})")
    k, bits = digit_groups(modulus)
    digits = np.concatenate([flat, np.zeros(-flat.size % k, np.int64)]).reshape(-1, k).astype(np.uint64)
    groups = np.zeros(digits.shape[0], np.uint64)
    for j in range(k):
        groups = groups * np.uint64(modulus) + digits[:, j]
    return pack_uint(groups, bits).tobytes()


def unpack_field(data: bytes, sizes: list[int], modulus: int) -> list[np.ndarray]:
    """Inverse of :func:`pack_field` for arrays of ``sizes`` elements; :class:`PayloadError` on a bad length, a
    group that is not ``k`` digits below ``modulus`` or nonzero padding digits."""
    n = sum(sizes)
    k, bits = digit_groups(modulus)
    count = -(-n // k)
    require(len(data) == nbytes_for(count * bits), f"packed masked vector has {len(data)} bytes, expected "
                                                   f"{nbytes_for(count * bits)} for {n} elements mod {modulus}")
    groups = unpack_uint(np.frombuffer(data, np.uint8), count, bits, "masked vector")
    require(count == 0 or int(groups.max()) < modulus**k, f"masked vector: a group is not {k} digits mod {modulus}")
    digits = np.zeros((count, k), np.int64)
    for j in reversed(range(k)):
        digits[:, j] = groups % modulus
        groups //= modulus
    flat = digits.ravel()
    require(not flat[n:].any(), "masked vector: nonzero padding digits")
    bounds = np.cumsum([0, *sizes])
    return [flat[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


_CURVE = ec.SECP384R1()  # the curve of Flower's SecAgg+ key pairs
_POINT_BYTES = 1 + (_CURVE.key_size + 7) // 8  # X9.62 compressed point: parity byte 2 or 3, then x


def _point(pem: bytes) -> bytes:
    key = serialization.load_pem_public_key(pem)
    if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _CURVE.name):
        raise PayloadError(f"public key is not an EC key on {_CURVE.name}")
    point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    require(_pem(point) == pem, "public key is not in canonical PEM form")
    return point


def _pem(point: bytes) -> bytes:
    require(len(point) == _POINT_BYTES and point[0] in (2, 3),
            f"public key must be a {_POINT_BYTES}-byte compressed {_CURVE.name} point (first byte 02 or 03), got "
            f"{len(point)} bytes starting {point[:1].hex() or 'with nothing'}")
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, point)
    except ValueError as e:
        raise PayloadError(f"public key is not a point on {_CURVE.name}: {e}") from None
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _raw_token(token: bytes) -> bytes:
    raw = base64.urlsafe_b64decode(token)
    require(base64.urlsafe_b64encode(raw) == token, "ciphertext is not canonical base64")
    return raw


def _token(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw)


def _convert(values: dict[str, Any], keys: Mapping[str, str], single: Callable[[bytes], bytes],
             listed: Callable[[bytes], bytes]) -> None:
    """Apply ``single`` to the bytes value of each "one" key present and ``listed`` to each item of a "list" key."""
    for key, kind in keys.items():
        if key not in values:
            continue
        value = values[key]
        try:
            if kind == "one" and isinstance(value, bytes):
                values[key] = single(value)
            elif kind == "list" and isinstance(value, list) and all(isinstance(v, bytes) for v in value):
                values[key] = [listed(v) for v in value]
            else:
                raise PayloadError("wrong type")
        except (binascii.Error, ValueError, UnsupportedAlgorithm, PayloadError) as e:
            raise PayloadError(f"SecAgg+ {key!r}: {e}") from None


def compact_key_exchange(values: dict[str, Any], keys: Mapping[str, str]) -> None:
    """Client side, in place: PEM public keys ("one" keys) -> X9.62 compressed points (49 bytes, not 215),
    base64 Fernet tokens ("list" keys) -> raw."""
    _convert(values, keys, _point, _raw_token)


def expand_key_exchange(values: dict[str, Any], keys: Mapping[str, str]) -> None:
    """Server side, in place: the exact PEM and base64 bytes Flower sent; :class:`PayloadError` if malformed."""
    _convert(values, keys, _pem, _token)


def check_key_exchange(values: dict[str, Any], keys: Mapping[str, str]) -> None:
    """Server side, dense field: each public key is a canonical PEM key on Flower's curve and each key share a
    canonical base64 token (values unchanged); :class:`PayloadError` if not, before any neighbour is sent them."""
    def pem(value: bytes) -> bytes:
        _point(value)
        return value

    def token(value: bytes) -> bytes:
        _raw_token(value)
        return value

    _convert(values, keys, pem, token)


def check_dense_field(arrays: Any, shapes: list[tuple[int, ...]], modulus: int) -> None:
    """Server side: Flower's dense masked vector (one ``.npy`` byte string per array, as its SecAgg+ mod sends) has
    ``shapes``, an integer dtype and every element in ``[0, modulus)``; :class:`PayloadError` if not. Read with
    numpy's format reader, never unpickled; each header is checked before any element is read."""
    require(isinstance(arrays, list) and len(arrays) == len(shapes) and all(isinstance(a, bytes) for a in arrays),
            f"expected {len(shapes)} byte strings of masked parameters")
    for i, (data, shape) in enumerate(zip(arrays, shapes)):
        buf = io.BytesIO(data)
        try:
            version = np.lib.format.read_magic(buf)
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            require(version in header, f"masked array {i}: .npy version {version} is not 1.0 or 2.0")
            got, _, dtype = header[version](buf)
            require(tuple(got) == tuple(shape) and dtype.kind in "iu",
                    f"masked array {i} has shape {tuple(got)} and dtype {dtype}, expected {tuple(shape)} integers")
            buf.seek(0)
            values = np.lib.format.read_array(buf, allow_pickle=False)  # exactly the header's shape, or ValueError
        except (ValueError, TypeError, EOFError) as e:
            raise PayloadError(f"masked array {i} is not a .npy array: {e}") from None
        require(values.size == 0 or (int(values.min()) >= 0 and int(values.max()) < modulus),
                f"masked array {i}: values outside [0, {modulus})")


@dataclass(frozen=True)
class SintParams:
    """Stochastic integer quantizer configuration."""

    bits: int = option(8, lo=2, hi=16, help="bits per element (2**bits - 1 grid points)")
    range: float = option(0.01, lo=0.0, lo_open=True, help="elements are clipped to +-range")
    keep: float = option(1.0, lo=0.0, lo_open=True, hi=1.0,
                         help="fraction of coordinates kept (a seeded random subspace)")


@register_codec("sint")
class SintCodec(Codec):
    """Clip to ``+-range``, stochastic rounding onto ``2**bits - 1`` points; SecAgg+'s integer grid in the clear."""

    codec_id = 9
    Params = SintParams
    n_fields = 2  # bits, subspace seed

    def _encode(self, flat: np.ndarray, layout: Layout, rng: np.random.Generator | None,
                fisher: np.ndarray | None) -> Encoded:
        p = self.params
        rng = np.random.default_rng() if rng is None else rng
        seed = int(rng.integers(_SEED_BOUND))
        x = flat[subspace(seed, flat.size, p.keep)].astype(np.float64)
        steps = levels_for(p.bits)
        q = stochastic_round((np.clip(x, -p.range, p.range) + p.range) * (steps / (2 * p.range)), rng)
        return [p.bits, seed], _EMPTY, pack_uint(np.clip(q, 0, steps), p.bits), None

    def _decode(self, fields: tuple[int, ...], positions: np.ndarray, values: np.ndarray,
                scales: np.ndarray, layout: Layout) -> np.ndarray:
        p = self.params
        bits, seed = fields
        require(bits == p.bits, f"sint payload has {bits} bits, this decoder {p.bits}")
        require(0 <= seed < _SEED_BOUND, f"sint subspace seed {seed} out of range")
        require(positions.size == 0 and scales.size == 0, "sint payload carries positions or scales")
        idx = subspace(seed, layout.total, p.keep)
        require(values.size == nbytes_for(idx.size * bits), f"sint values: {values.size} bytes for {idx.size} "
                                                            f"elements of {bits} bits")
        steps = levels_for(bits)
        q = unpack_uint(values, idx.size, bits, "sint levels")
        require(idx.size == 0 or int(q.max()) <= steps, f"sint level above {steps}")
        out = np.zeros(layout.total, np.float64)
        out[idx] = (q * (2 * p.range / steps) - p.range) / p.keep
        return out.astype(np.float32)
