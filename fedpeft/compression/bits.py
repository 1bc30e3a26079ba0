"""Bit-level coding, all vectorized numpy: fixed-width packing and sparse position sets.

Positions of a sparse vector are coded either as a **bitmap** (one bit per element) or as
**Golomb gaps** (the Rice code when the parameter is a power of two). The Golomb code is split into
three byte-aligned streams so that decoding needs no sequential scan:

* unary quotients: ``q`` zeros then a one per gap (decoded with ``flatnonzero``),
* the first ``b-1`` bits of each truncated-binary remainder (fixed width),
* one extra bit for the remainders that need ``b`` bits.

The encoder measures both codings and keeps the smaller; the header records which.
"""

from __future__ import annotations

import math

import numpy as np

from fedpeft.compression.payload import require

POS_BITMAP, POS_GOLOMB = 0, 1
N_POS_FIELDS = 4  # mode, golomb m, unary bit count, extra bit count
GOLOMB_SAMPLE = 65536


def entropy_bound_bits(d: int, p: float) -> float:
    """``d * (H(p) + p)`` bits: the ideal size of a sparse ternary vector (positions + signs)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"density p = {p} must be in [0, 1]")
    h = 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return d * (h + p)


def nbytes_for(bits: int) -> int:
    """Bytes holding ``bits`` bits."""
    return (bits + 7) // 8


def set_sign_bits(values: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Negate float32 ``values`` in place where the 0/1 vector ``negative`` is 1 (sets the sign bit)."""
    raw = values.view(np.uint32)
    raw |= negative.astype(np.uint32) << np.uint32(31)
    return values


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a 0/1 (or bool) vector MSB-first into bytes."""
    return np.packbits(bits.view(np.uint8) if bits.dtype == np.bool_ else bits.astype(np.uint8))


def unpack_bits(buf: np.ndarray, count: int, what: str) -> np.ndarray:
    """Unpack exactly ``count`` bits; the byte length and zero padding are checked."""
    require(buf.size == nbytes_for(count), f"{what}: {buf.size} bytes for {count} bits")
    if count % 8:
        require(int(buf[-1]) & ((1 << (8 - count % 8)) - 1) == 0, f"{what}: nonzero padding bits")
    return np.unpackbits(buf, count=count)


def _big_endian(width: int) -> tuple[np.dtype, int]:
    nb = 1 if width <= 8 else 2 if width <= 16 else 4 if width <= 32 else 8
    return np.dtype(f">u{nb}"), nb


def pack_uint(values: np.ndarray, width: int) -> np.ndarray:
    """Pack non-negative integers below ``2**width`` at ``width`` bits each (MSB first)."""
    if width == 0 or values.size == 0:
        return np.zeros(0, np.uint8)
    if width == 1:
        return np.packbits(values.astype(np.uint8))
    dtype, nb = _big_endian(width)
    bits = np.unpackbits(values.astype(dtype).view(np.uint8)).reshape(-1, 8 * nb)
    return np.packbits(bits[:, 8 * nb - width:].reshape(-1))


def unpack_uint(buf: np.ndarray, n: int, width: int, what: str) -> np.ndarray:
    """Inverse of :func:`pack_uint`: ``n`` int64 values of ``width`` bits."""
    bits = unpack_bits(buf, n * width, what)
    if width == 0:
        return np.zeros(n, np.int64)
    if width == 1:
        return bits.astype(np.int64)
    dtype, nb = _big_endian(width)
    full = np.zeros((n, 8 * nb), np.uint8)
    full[:, 8 * nb - width:] = bits.reshape(n, width)
    return np.packbits(full.reshape(-1)).view(dtype).astype(np.int64)


def _golomb_shape(m: int) -> tuple[int, int, int]:
    """(b, u, w): remainder bits, truncated-binary cutoff, fixed-width part for parameter ``m``."""
    b = (m - 1).bit_length()
    return b, (1 << b) - m, max(b - 1, 0)


def _golomb_nbytes(k: int, unary_bits: int, n_extra: int, m: int) -> int:
    return nbytes_for(unary_bits) + nbytes_for(k * _golomb_shape(m)[2]) + nbytes_for(n_extra)


def _golomb_size(gaps: np.ndarray, m: int) -> int:
    q = gaps // m
    b, u, _ = _golomb_shape(m)
    n_extra = int(np.count_nonzero(gaps - q * m >= u)) if b else 0
    return _golomb_nbytes(gaps.size, gaps.size + int(q.sum()), n_extra, m)


def _golomb_candidates(gaps: np.ndarray) -> list[int]:
    """Golomb parameters near the optimum for a geometric gap distribution of the same mean."""
    mean = float(gaps.mean())
    if mean < 1e-9:
        return [1]
    q = mean / (mean + 1.0)
    m0 = max(1, math.ceil(math.log1p(q) / -math.log(q)))
    return sorted({max(1, m0 - 1), m0, m0 + 1})


def encode_positions(positions: np.ndarray, total: int) -> tuple[list[int], np.ndarray]:
    """Code strictly increasing positions in ``[0, total)``; returns (header fields, bytes)."""
    k = positions.size
    if k == 0:
        return [POS_GOLOMB, 0, 0, 0], np.zeros(0, np.uint8)
    gaps = np.empty(k, np.int32)  # total < 2**31, and int32 halves the memory traffic
    gaps[0] = positions[0]
    np.subtract(positions[1:], positions[:-1], out=gaps[1:], casting="unsafe")
    gaps[1:] -= 1
    sample = gaps[:: max(1, k // GOLOMB_SAMPLE)]  # choose m on a strided sample of the gaps
    m = min(_golomb_candidates(sample), key=lambda c: (_golomb_size(sample, c), c))
    q, r = np.divmod(gaps, np.int32(m))
    b, u, w = _golomb_shape(m)
    small = r < u
    n_extra = k - int(np.count_nonzero(small)) if b else 0
    unary_bits = k + int(q.sum())
    if nbytes_for(total) <= _golomb_nbytes(k, unary_bits, n_extra, m):
        bitmap = np.zeros(total, np.bool_)
        bitmap[positions] = True
        return [POS_BITMAP, 0, 0, 0], pack_bits(bitmap)
    unary = np.zeros(unary_bits, np.bool_)
    q += 1
    np.cumsum(q, out=q)
    q -= 1
    unary[q] = True
    parts = [pack_bits(unary)]
    if b:
        v = r + np.int32(u)  # truncated binary: r < u in b-1 bits, else r + u in b bits
        extra = np.compress(~small, (v & 1).astype(np.uint8))
        v >>= 1
        np.copyto(v, r, where=small)
        parts += [pack_uint(v, w), pack_bits(extra)]
    return [POS_GOLOMB, m, unary_bits, n_extra], np.concatenate(parts)


def positions_nbytes(fields: tuple[int, ...], k: int, total: int) -> int:
    """Validate position fields against ``k`` and ``total``; the byte length they imply."""
    mode, m, unary_bits, n_extra = fields
    require(0 <= k <= total, f"{k} kept elements for {total} elements")
    if mode == POS_BITMAP:
        require(m == unary_bits == n_extra == 0, "bitmap positions carry Golomb fields")
        return nbytes_for(total)
    require(mode == POS_GOLOMB, f"unknown positions coding {mode}")
    if k == 0:
        require(m == unary_bits == n_extra == 0, "empty positions carry Golomb fields")
        return 0
    require(1 <= m <= max(total, 1), f"Golomb parameter {m} outside 1..{total}")
    require(k <= unary_bits <= k + (total - k) // m, f"unary length {unary_bits} impossible for {k} gaps")
    b = _golomb_shape(m)[0]
    require(0 <= n_extra <= (k if b else 0), f"extra bit count {n_extra} impossible for {k} gaps")
    return _golomb_nbytes(k, unary_bits, n_extra, m)


def decode_positions(buf: np.ndarray, fields: tuple[int, ...], k: int, total: int) -> np.ndarray:
    """Decode and validate positions (strictly increasing, in range, exactly ``k``)."""
    require(buf.size == positions_nbytes(fields, k, total), "positions section has the wrong length")
    mode, m, unary_bits, n_extra = fields
    if k == 0:
        return np.zeros(0, np.int64)
    if mode == POS_BITMAP:
        pos = np.flatnonzero(unpack_bits(buf, total, "position bitmap").view(np.bool_))
        require(pos.size == k, f"position bitmap has {pos.size} set bits, header says {k}")
        return pos.astype(np.int64, copy=False)
    b, u, w = _golomb_shape(m)
    n_unary, n_fixed = nbytes_for(unary_bits), nbytes_for(k * w)
    ends = np.flatnonzero(unpack_bits(buf[:n_unary], unary_bits, "unary gaps").view(np.bool_))
    require(ends.size == k and int(ends[-1]) == unary_bits - 1, "unary gaps: terminator count mismatch")
    if b:
        v = unpack_uint(buf[n_unary:n_unary + n_fixed], k, w, "gap remainders")
        big = v >= u
        require(int(np.count_nonzero(big)) == n_extra, "gap remainders: extra bit count mismatch")
        extra = unpack_bits(buf[n_unary + n_fixed:], n_extra, "gap extra bits")
        r = v
        r[big] = ((v[big] << 1) | extra) - u
    else:
        r = np.zeros(k, np.int64)
    # ends[i] = (q_0 + ... + q_i) + i, so the quotients sum to unary_bits - k
    require(m * (unary_bits - k) + int(r.sum()) + k <= total, "gaps run past the last element")
    steps = np.arange(k, dtype=np.int64)
    pos = ends - steps  # cumulative quotients
    pos *= m
    pos += steps
    pos += np.cumsum(r, out=r)
    return pos
