"""``qsgd:s``: stochastic quantization to ``s`` levels of ``|x| / ||x||`` (unbiased; Alistarh et al.).

Each element becomes ``sign * l / s * ||x||`` with ``l`` in ``0..s`` rounded up with probability
equal to the fractional part, so ``E[decoded] = x`` and ``|decoded - x| <= ||x|| / s``. The norm is
taken per bucket of ``bucket`` consecutive elements (default 512, as in the paper; the variance
grows with the bucket size) or per tensor with ``bucket=0``. Levels are packed at
``bit_length(s)`` bits, signs at one bit, norms are float32 scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpeft.compression.base import Codec, Encoded, check_scales, per_element, per_tensor, register_codec
from fedpeft.compression.bits import nbytes_for, pack_bits, pack_uint, set_sign_bits, unpack_bits, unpack_uint
from fedpeft.compression.payload import Layout, require
from fedpeft.fields import option

_EMPTY = np.zeros(0, np.uint8)


@dataclass(frozen=True)
class QsgdParams:
    """QSGD configuration."""

    s: int = option(16, lo=1, hi=65535, help="quantization levels")
    bucket: int = option(512, lo=0, hi=1 << 24, help="elements per norm (0 = one norm per tensor)")


def _norms(flat: np.ndarray, layout: Layout, bucket: int) -> np.ndarray:
    """float32 L2 norm per bucket (or per tensor), accumulated in float64."""
    sq = np.square(flat)
    if bucket == 0:
        return np.sqrt(per_tensor(np.add, sq, layout, dtype=np.float64)).astype(np.float32)
    if flat.size == 0:
        return np.zeros(0, np.float32)
    return np.sqrt(np.add.reduceat(sq, np.arange(0, flat.size, bucket), dtype=np.float64)).astype(np.float32)


def _per_element(scales: np.ndarray, layout: Layout, bucket: int) -> np.ndarray:
    if bucket == 0:
        return per_element(scales, layout)
    return np.repeat(scales, bucket)[: layout.total]


@register_codec("qsgd")
class QsgdCodec(Codec):
    """Stochastic ``s``-level quantizer; pass ``rng`` to :meth:`encode` for reproducible runs."""

    codec_id = 7
    biased = False
    Params = QsgdParams
    n_fields = 2

    def _encode(self, flat: np.ndarray, layout: Layout, rng: np.random.Generator | None,
                fisher: np.ndarray | None) -> Encoded:
        s, bucket = self.params.s, self.params.bucket
        rng = np.random.default_rng() if rng is None else rng
        norms = _norms(flat, layout, bucket)
        inv = np.divide(np.float32(s), norms, out=np.zeros_like(norms), where=norms > 0)
        levels = np.abs(flat) * _per_element(inv, layout, bucket)
        levels += rng.random(flat.size, dtype=np.float32)
        np.floor(levels, out=levels)
        np.clip(levels, 0, s, out=levels)
        levels = levels.astype(np.int64)
        negative = (flat < 0) & (levels > 0)
        values = np.concatenate([pack_uint(levels, s.bit_length()), pack_bits(negative)])
        return [s, bucket], _EMPTY, values, norms

    def _decode(self, fields: tuple[int, ...], positions: np.ndarray, values: np.ndarray,
                scales: np.ndarray, layout: Layout) -> np.ndarray:
        s, bucket = self.params.s, self.params.bucket
        require(fields == (s, bucket), f"qsgd payload uses s, bucket = {fields}, this decoder {s, bucket}")
        require(positions.size == 0, "qsgd payload carries positions")
        n, width = layout.total, s.bit_length()
        if bucket == 0:
            check_scales(scales, layout, "norms")
        else:
            require(scales.size == -(-n // bucket), f"{scales.size} norms for {n} elements in buckets of {bucket}")
            require(bool((scales >= 0).all()), "negative norms")
        n_levels = nbytes_for(n * width)
        require(values.size == n_levels + nbytes_for(n), f"qsgd values: {values.size} bytes for {n} elements")
        levels = unpack_uint(values[:n_levels], n, width, "qsgd levels")
        require(n == 0 or int(levels.max()) <= s, f"qsgd level above s = {s}")
        negative = unpack_bits(values[n_levels:], n, "qsgd signs")
        out = levels.astype(np.float32) * _per_element(scales / np.float32(s), layout, bucket)
        return set_sign_bits(out, negative)
