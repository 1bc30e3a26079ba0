"""``sign``: one bit per element plus a per-tensor scale ``mean|x|`` (signSGD with magnitude)."""

from __future__ import annotations

import numpy as np

from fedpeft.compression.base import Codec, Encoded, check_scales, per_element, per_tensor, register_codec
from fedpeft.compression.bits import nbytes_for, pack_bits, set_sign_bits, unpack_bits
from fedpeft.compression.payload import Layout, require

_EMPTY = np.zeros(0, np.uint8)


@register_codec("sign")
class SignCodec(Codec):
    """Decodes to ``+-mean|x|`` per tensor; zeros decode as ``+scale`` (the bit says "negative")."""

    codec_id = 6
    scale_gain = 1.0

    def _encode(self, flat: np.ndarray, layout: Layout, rng: np.random.Generator | None,
                fisher: np.ndarray | None) -> Encoded:
        sums = per_tensor(np.add, np.abs(flat), layout, dtype=np.float64)
        scales = (sums / np.maximum(np.asarray(layout.numels), 1)).astype(np.float32)
        return [], _EMPTY, pack_bits(flat < 0), scales

    def _decode(self, fields: tuple[int, ...], positions: np.ndarray, values: np.ndarray,
                scales: np.ndarray, layout: Layout) -> np.ndarray:
        require(positions.size == 0, "sign payload carries positions")
        check_scales(scales, layout)
        require(values.size == nbytes_for(layout.total), f"sign values: {values.size} bytes "
                                                         f"for {layout.total} elements")
        negative = unpack_bits(values, layout.total, "signs")
        out = per_element(scales, layout)
        return set_sign_bits(out, negative)
