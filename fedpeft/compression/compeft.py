"""``compeft:p``: sparse ternary compression of a delta (after ComPEFT, Yadav et al. 2023).

Keep the fraction ``p`` of elements (over all tensors or within each) and send only their positions
and signs; every kept element decodes to ``sign * scale`` of its tensor. Which elements:

* ``select=magnitude`` (default): the largest ``|x|``, as in the paper;
* ``select=fisher``: the largest ``sqrt(F) * |x|``, where ``F`` is the client's mean squared gradient
  of the round (:attr:`fedpeft.training.TrainResult.fisher`): the elements whose loss would grow most
  if dropped. Adam-trained adapter deltas are nearly flat in magnitude (Adam moves every element
  about ``lr`` per step), so magnitude alone says little about what matters: in the first round of
  the embedded default LoRA's ``A`` deltas are as large as the ``B`` deltas although changing ``A``
  does nothing while ``B`` is still zero, and the top 10% by magnitude hold only 24-37% of a
  client delta's energy (rounds 1-3). Senders without a Fisher (the server's downlink,
  split-learning clients) fall back to magnitude. On the embedded default it beat magnitude on
  every seed measured (``benchmarks/RESULTS.md``); it is not the default because on the tiny test
  model (Adam at lr 0.03, compeft both ways) it diverged in the fourth round where magnitude did
  not (a likely cause, not verified: small kept elements of high curvature decode to the tensor's
  larger scale, which overshoots where the loss is most sensitive).

The scale:

* ``scale=mean`` (default): ``alpha * mean|kept|`` per tensor, which preserves each tensor's
  kept L1 mass and fits LoRA deltas (whose tensors differ a lot in magnitude) better;
* ``scale=std``: ``alpha * std(delta)`` as in the paper (the whole delta for scope=global,
  each tensor for scope=per_tensor).

``alpha`` defaults to 1.5: on the embedded default (3 rounds, error feedback) it beat ``alpha = 1``
with magnitude ranking (p = 0.1 seeds 0 and 1: +1.8 and +7.5 accuracy points; p = 0.05: +14.4) and
with Fisher ranking (seeds 0, 1, 2: +2.0, -0.4, +1.3), as the ComPEFT paper found that scaling the
ternary vector up helps: the dropped mass that error feedback has not yet paid back is partly made up
for by the larger kept values. More is not better: ``alpha = 2`` (Fisher, seed 1) diverged in the
third round (accuracy 0.44): a kept element then decodes to about twice its size, and the residual
no longer shrinks.

The size is within about 1% of the entropy bound ``d * (H(p) + p)`` bits plus the header.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpeft.compression.base import Codec, Encoded, check_scales, per_tensor, register_codec
from fedpeft.compression.bits import nbytes_for, pack_bits, unpack_bits
from fedpeft.compression.payload import Layout, require
from fedpeft.compression.topk import N_SPARSE_FIELDS, SCOPES, select_param, sparse_decode, sparse_encode
from fedpeft.fields import option


@dataclass(frozen=True)
class CompeftParams:
    """ComPEFT configuration."""

    p: float = option(0.1, lo=0.0, hi=1.0, help="density: fraction of elements kept")
    scale: str = option("mean", choices=("mean", "std"), help="mean |kept| per tensor, or std of the delta")
    alpha: float = option(1.5, lo=0.0, lo_open=True, help="multiplier on the scale (1.5 measured best, see doc)")
    scope: str = option("global", choices=SCOPES, help="select over all tensors or within each")
    select: str = select_param()


def _std_scales(flat: np.ndarray, layout: Layout, scope: str) -> np.ndarray:
    """Population standard deviation of the whole delta (global) or of each tensor (float64 sums)."""
    if scope == "global":
        n = max(flat.size, 1)
        mean = float(flat.sum(dtype=np.float64)) / n
        var = float(np.square(flat).sum(dtype=np.float64)) / n - mean * mean
        return np.full(len(layout.names), np.sqrt(max(var, 0.0)))
    sizes = np.maximum(np.asarray(layout.numels, np.float64), 1.0)
    means = per_tensor(np.add, flat, layout, dtype=np.float64) / sizes
    variances = per_tensor(np.add, np.square(flat), layout, dtype=np.float64) / sizes - means * means
    return np.sqrt(np.maximum(variances, 0.0))


@register_codec("compeft")
class CompeftCodec(Codec):
    """Top-k positions + one sign bit per kept element + one float32 scale per tensor."""

    codec_id = 8
    scale_gain = 1.0
    Params = CompeftParams
    n_fields = N_SPARSE_FIELDS

    def _encode(self, flat: np.ndarray, layout: Layout, rng: np.random.Generator | None,
                fisher: np.ndarray | None) -> Encoded:
        prm = self.params
        fields, pos_bytes, pos, kept = sparse_encode(flat, layout, prm, fisher)
        if prm.scale == "mean":
            counts = layout.counts(pos)
            sums = np.zeros(counts.size)
            if counts.any():  # kept positions are sorted, so each tensor's are one contiguous run
                starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[counts > 0]
                sums[counts > 0] = np.add.reduceat(np.abs(kept), starts, dtype=np.float64)
            scales = sums / np.maximum(counts, 1)
        else:
            scales = _std_scales(flat, layout, prm.scope)
        scales = (prm.alpha * scales).astype(np.float32) if pos.size else None  # k = 0: header only
        return fields, pos_bytes, pack_bits(kept < 0), scales

    def _decode(self, fields: tuple[int, ...], positions: np.ndarray, values: np.ndarray,
                scales: np.ndarray, layout: Layout) -> np.ndarray:
        k = fields[0]
        if k:
            check_scales(scales, layout)
        else:
            require(scales.size == 0, "compeft payload without kept elements carries scales")
        require(k >= 0 and values.size == nbytes_for(k), f"compeft signs: {values.size} bytes for {k} elements")
        pos = sparse_decode(fields, positions, layout, self.params.p, self.params.scope)
        negative = unpack_bits(values, k, "compeft signs")
        if k == 0:
            return np.zeros(layout.total, np.float32)
        table = np.stack([scales, -scales])  # [sign bit, tensor] -> value: one gather
        out = np.zeros(layout.total, np.float32)
        out[pos] = table[negative, layout.tensor_ids(pos)] if len(scales) > 1 else table[negative, 0]
        return out
