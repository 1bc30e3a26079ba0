"""``topk:p``: keep the fraction ``p`` of largest-magnitude elements (or, with ``select=fisher``, of
largest ``sqrt(F) * |x|``; see :func:`fedpeft.compression.select.select`) as fp16 values.

The sparse-position helpers here are shared with ``compeft``: header fields ``[k, p as float64
bits, scope, *position fields]`` and the checks a decoder makes on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedpeft.compression.base import Codec, Encoded, register_codec
from fedpeft.compression.bits import N_POS_FIELDS, decode_positions, encode_positions
from fedpeft.compression.payload import Layout, require
from fedpeft.compression.select import k_for, max_kept, select
from fedpeft.fields import option

SCOPES = ("global", "per_tensor")
RANKINGS = ("magnitude", "fisher")
FP16_MAX = float(np.finfo(np.float16).max)
N_SPARSE_FIELDS = 3 + N_POS_FIELDS


def _p_bits(p: float) -> int:
    return int(np.float64(p).view(np.int64))


def select_param() -> Any:
    """The ``select`` field of a sparsifying codec's parameters."""
    return option("magnitude", choices=RANKINGS, help="rank by |x|, or by sqrt(Fisher) * |x| where the sender "
                 "has a Fisher estimate (clients do; see the README's compressed transport section)")


def sparse_encode(flat: np.ndarray, layout: Layout, prm: Any,
                  fisher: np.ndarray | None) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Select the top ``prm.p`` positions (by ``sqrt(fisher) * |x|`` when a Fisher is given, see
    :func:`select`); returns (header fields, positions bytes, positions, kept values)."""
    p, scope = prm.p, prm.scope
    pos, kept = select(flat, layout.offsets, p, scope, fisher)
    pos_fields, pos_bytes = encode_positions(pos, layout.total)
    return [pos.size, _p_bits(p), SCOPES.index(scope), *pos_fields], pos_bytes, pos, kept


def sparse_decode(fields: tuple[int, ...], positions: np.ndarray, layout: Layout, p: float,
                  scope: str) -> np.ndarray:
    """Validate the sparse header fields against the decoder's own p / scope; decode positions."""
    k, p_bits, scope_id, *pos_fields = fields
    require(p_bits == _p_bits(p), f"payload density differs from the decoder's p = {p}")
    require(0 <= scope_id < len(SCOPES) and SCOPES[scope_id] == scope,
            f"payload scope id {scope_id} differs from the decoder's scope {scope!r}")
    cap = max_kept(layout.numels, layout.total, p, scope)
    require(0 <= k <= cap, f"payload keeps {k} elements; at most {cap} at p = {p}")
    pos = decode_positions(positions, tuple(pos_fields), k, layout.total)
    if scope == "per_tensor" and k:
        counts = layout.counts(pos)
        caps = np.asarray([k_for(n, p) for n in layout.numels])
        require(bool((counts <= caps).all()), "payload keeps more elements in a tensor than p allows")
    return pos


@dataclass(frozen=True)
class TopkParams:
    """Top-k configuration."""

    p: float = option(0.1, lo=0.0, hi=1.0, help="density: fraction of elements kept")
    scope: str = option("global", choices=SCOPES, help="select over all tensors or within each")
    select: str = select_param()


@register_codec("topk")
class TopkCodec(Codec):
    """Largest-magnitude fraction ``p``, values in fp16, positions Golomb- or bitmap-coded."""

    codec_id = 5
    Params = TopkParams
    n_fields = N_SPARSE_FIELDS

    def _encode(self, flat: np.ndarray, layout: Layout, rng: np.random.Generator | None,
                fisher: np.ndarray | None) -> Encoded:
        fields, pos_bytes, _, kept = sparse_encode(flat, layout, self.params, fisher)
        values = np.clip(kept, -FP16_MAX, FP16_MAX).astype("<f2")
        return fields, pos_bytes, values, None

    def _decode(self, fields: tuple[int, ...], positions: np.ndarray, values: np.ndarray,
                scales: np.ndarray, layout: Layout) -> np.ndarray:
        require(scales.size == 0, "topk payload carries scales")
        k = fields[0]
        require(values.size == 2 * k, f"topk values: {values.size} bytes for {k} elements")
        pos = sparse_decode(fields, positions, layout, self.params.p, self.params.scope)
        vals = values.view("<f2").astype(np.float32)
        require(bool(np.isfinite(vals).all()), "topk values contain NaN or inf")
        out = np.zeros(layout.total, np.float32)
        out[pos] = vals
        return out
