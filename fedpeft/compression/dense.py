"""Dense codecs: ``none`` (fp32, lossless), ``fp16``, ``bf16`` (raw uint16) and ``int8``.

All values go into the values section; none has positions. Decoders reject non-finite values
(fp32/fp16/bf16 bit patterns for NaN/inf) and out-of-range int8 codes.
"""

from __future__ import annotations

import numpy as np

from fedpeft.compression.base import Codec, Encoded, check_scales, per_element, per_tensor, register_codec
from fedpeft.compression.payload import Layout, require

FP16_MAX = float(np.finfo(np.float16).max)
_EMPTY = np.zeros(0, np.uint8)


def _values(values: np.ndarray, n: int, itemsize: int, what: str) -> np.ndarray:
    require(values.size == n * itemsize, f"{what} values: {values.size} bytes for {n} elements")
    return values


@register_codec("none")
class NoneCodec(Codec):
    """Plain little-endian float32: the lossless reference."""

    codec_id = 1
    biased = False
    lossless = True

    def _encode(self, flat: np.ndarray, layout: Layout, rng: np.random.Generator | None,
                fisher: np.ndarray | None) -> Encoded:
        return [], _EMPTY, flat.astype("<f4", copy=False), None

    def _decode(self, fields: tuple[int, ...], positions: np.ndarray, values: np.ndarray,
                scales: np.ndarray, layout: Layout) -> np.ndarray:
        require(positions.size == 0 and scales.size == 0, "fp32 payload carries positions or scales")
        out = _values(values, layout.total, 4, "fp32").view("<f4").astype(np.float32)  # a copy
        require(bool(np.isfinite(out).all()), "fp32 values contain NaN or inf")
        return out


@register_codec("fp16")
class Fp16Codec(Codec):
    """IEEE half precision (values beyond +-65504 are clamped)."""

    codec_id = 2

    def _encode(self, flat: np.ndarray, layout: Layout, rng: np.random.Generator | None,
                fisher: np.ndarray | None) -> Encoded:
        return [], _EMPTY, np.clip(flat, -FP16_MAX, FP16_MAX).astype("<f2"), None

    def _decode(self, fields: tuple[int, ...], positions: np.ndarray, values: np.ndarray,
                scales: np.ndarray, layout: Layout) -> np.ndarray:
        require(positions.size == 0 and scales.size == 0, "fp16 payload carries positions or scales")
        out = _values(values, layout.total, 2, "fp16").view("<f2").astype(np.float32)
        require(bool(np.isfinite(out).all()), "fp16 values contain NaN or inf")
        return out


@register_codec("bf16")
class Bf16Codec(Codec):
    """bfloat16 as raw uint16 (the top half of float32, rounded to nearest even)."""

    codec_id = 3

    def _encode(self, flat: np.ndarray, layout: Layout, rng: np.random.Generator | None,
                fisher: np.ndarray | None) -> Encoded:
        u = flat.astype(np.float32, copy=False).view(np.uint32)
        top = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype("<u2")
        overflow = (top & 0x7F80) == 0x7F80  # rounded up to inf: clamp to the largest finite bf16
        top[overflow] = (top[overflow] & 0x8000) | 0x7F7F
        return [], _EMPTY, top, None

    def _decode(self, fields: tuple[int, ...], positions: np.ndarray, values: np.ndarray,
                scales: np.ndarray, layout: Layout) -> np.ndarray:
        require(positions.size == 0 and scales.size == 0, "bf16 payload carries positions or scales")
        top = _values(values, layout.total, 2, "bf16").view("<u2")
        require(not bool(((top & 0x7F80) == 0x7F80).any()), "bf16 values contain NaN or inf")
        return (top.astype(np.uint32) << 16).view(np.float32)


@register_codec("int8")
class Int8Codec(Codec):
    """Per-tensor symmetric int8: ``round(x / s)`` with ``s = max|x| / 127``; error <= s/2."""

    codec_id = 4
    scale_gain = 127.0

    def _encode(self, flat: np.ndarray, layout: Layout, rng: np.random.Generator | None,
                fisher: np.ndarray | None) -> Encoded:
        scales = per_tensor(np.maximum, np.abs(flat), layout) / np.float32(127)
        inv = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales > 0)
        codes = np.rint(flat * per_element(inv, layout))
        np.clip(codes, -127, 127, out=codes)
        return [], _EMPTY, codes.astype(np.int8), scales

    def _decode(self, fields: tuple[int, ...], positions: np.ndarray, values: np.ndarray,
                scales: np.ndarray, layout: Layout) -> np.ndarray:
        require(positions.size == 0, "int8 payload carries positions")
        check_scales(scales, layout)
        codes = _values(values, layout.total, 1, "int8").view(np.int8)
        require(not bool((codes == -128).any()), "int8 code -128 is outside the symmetric range")
        return codes.astype(np.float32) * per_element(scales, layout)
