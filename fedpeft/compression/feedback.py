"""Error feedback: remember what compression dropped and add it to the next update.

Usage per round (on whoever owns the residual)::

    x = ef.compensate(delta)                  # delta + residual
    payload = codec.encode(x, layout)
    ef.update(x, codec.decode(payload, layout))  # residual = x - decoded

Over many rounds the sum of decoded updates tracks the sum of true deltas up to one residual.
Use it with biased, contractive codecs (``codec.biased``: compeft, topk, sign, int8, fp16, bf16).
Unbiased high-variance codecs (``qsgd`` with few levels) need none, and with it the residual can
grow without bound when ``||Q(x) - x|| > ||x||`` (e.g. qsgd:2 on a large tensor).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fedpeft import lazy
from fedpeft.errors import PayloadError

if TYPE_CHECKING:
    import torch
else:  # torch on first use: checking a configuration imports this module (fedpeft/lazy.py)
    torch = lazy.module("torch")

log = logging.getLogger(__name__)


class ErrorFeedback:
    """Per-client (or per-link) residual memory, float32, keyed by tensor name."""

    def __init__(self) -> None:
        self._residual: dict[str, torch.Tensor] = {}

    @property
    def residual(self) -> dict[str, torch.Tensor]:
        """The current residual (a shallow copy of the dict)."""
        return dict(self._residual)

    def norm(self) -> float:
        """L2 norm of the residual (0 when empty), handy as a metric."""
        return float(sum(float(r.double().pow(2).sum()) for r in self._residual.values())) ** 0.5

    def compensate(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``delta + residual`` as float32 (the residual is zero at first or where shapes changed)."""
        out = {}
        for name, t in delta.items():
            t = t.detach().to(torch.float32)
            r = self._residual.get(name)
            if r is not None and r.shape != t.shape:
                log.warning("error feedback: %s changed shape %s -> %s; residual dropped",
                            name, tuple(r.shape), tuple(t.shape))
                r = None
            out[name] = t.clone() if r is None else t + r.to(t.device)
        return out

    def update(self, compensated: Mapping[str, torch.Tensor], decoded: Mapping[str, torch.Tensor]) -> None:
        """Set the residual to ``compensated - decoded`` (what this round's compression dropped)."""
        if set(compensated) != set(decoded):
            raise ValueError("error feedback: compensated and decoded updates have different tensors")
        self._residual = {n: (compensated[n].detach().float() - decoded[n].detach().float()).cpu()
                          for n in compensated}

    def reset(self) -> None:
        """Forget the residual."""
        self._residual = {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The residual as float32 numpy arrays (for checkpoints / Flower ``context.state``)."""
        return {n: r.numpy().astype(np.float32, copy=True) for n, r in self._residual.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict`; raises :class:`PayloadError` on non-finite or non-float data."""
        residual = {}
        for n, a in state.items():
            a = np.asarray(a)
            if a.dtype.kind != "f":
                raise PayloadError(f"error-feedback state {n!r} has dtype {a.dtype}, expected float32")
            a = a.astype(np.float32, copy=True)
            if not np.isfinite(a).all():
                raise PayloadError(f"error-feedback state {n!r} contains NaN or inf")
            residual[n] = torch.from_numpy(a)
        self._residual = residual
