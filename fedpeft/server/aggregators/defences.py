"""Backdoor defences applied to a robust aggregate before the server steps along it.

A backdoor trained on mostly clean data is an update of ordinary size that agrees with the honest
direction, so the robust rules (median, Krum, clipping) let most of it through: they bound how far a client
moves the aggregate, not what it writes there. These two post-steps, each an option of every robust
strategy (:class:`~fedpeft.server.aggregators.robust.RobustAggregator`), act on that:

- **server noise** (``federation.robust_noise``; Sun et al., 2019, *Can you really backdoor federated
  learning?*): Gaussian noise added to the round's aggregate, std ``robust_noise x bound / n`` with the clip
  bound of a clipping rule (else the round's median update norm). The weak-DP form of the paper's defence,
  but nothing is accounted: it is not differential privacy.
- **robust learning rate** (``federation.sign_threshold``; Ozdayi et al., 2021, *Defending against backdoors
  in federated learning with robust learning rate*): per coordinate, when fewer than ``sign_threshold``
  clients' signs net out the same way (``|sum_i sign(delta_i)| < sign_threshold``), the step along that
  coordinate is reversed. Coordinates the honest clients agree on keep their step; those moved mainly by a
  minority are unlearned instead. A zero (a sparse codec's coordinate not sent) abstains from the vote.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from fedpeft import lazy

if TYPE_CHECKING:
    import torch

    from fedpeft.models import AdapterState
else:  # torch on first use: checking a configuration imports this module (fedpeft/lazy.py)
    torch = lazy.module("torch")

log = logging.getLogger(__name__)
NOISE_SALT = 0x5EED  # keeps the aggregate's noise apart from the other streams seeded by run.seed


def noise_seed(*parts: int) -> int:
    """A 63-bit generator seed from integers (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(repr((NOISE_SALT, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def add_noise(step: AdapterState, sigma: float, seed: int) -> AdapterState:
    """``step`` plus N(0, sigma^2) on every element, drawn in float64 from a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + (torch.randn(v.shape, generator=g, dtype=torch.float64) * sigma).to(v.dtype)
            for k, v in step.items()}


def robust_learning_rate(step: AdapterState, deltas: list[AdapterState],
                         threshold: int) -> tuple[AdapterState, float]:
    """``step`` with every coordinate reversed where ``|sum_i sign(delta_i)| < threshold`` (Ozdayi et al.), and
    the fraction of coordinates reversed."""
    out, reversed_, total = {}, 0, 0
    for k, v in step.items():
        agree = torch.stack([torch.sign(d[k]) for d in deltas]).sum(dim=0).abs() >= threshold
        out[k] = torch.where(agree, v, -v)
        reversed_ += int((~agree).sum())
        total += agree.numel()
    log.info("robust learning rate: reversed %d of %d coordinates (sign agreement < %d of %d clients)",
             reversed_, total, threshold, len(deltas))
    return out, reversed_ / max(total, 1)
