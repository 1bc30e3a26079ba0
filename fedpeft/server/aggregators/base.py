"""The aggregator plug-in interface, its registry, and the shared mean every mean-based aggregator uses.

An :class:`Aggregator` turns one round's :class:`~fedpeft.server.replies.RoundReplies` and the current
global adapter into the next global adapter. Aggregators that need every client's update (robust,
LoRA-aware) read ``replies.deltas`` and set ``needs_individual_updates`` (they cannot run under
SecAgg+, where the server holds only the sum); those that step from the mean call :func:`mean_update`,
the one place that decides how the round's updates are averaged: example-weighted, SecAgg+'s secure
mean, or client-level DP (clip, fixed denominator, noise; :mod:`fedpeft.privacy.server_dp`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from fedpeft import lazy
from fedpeft.registry import Registry

if TYPE_CHECKING:
    import torch

    from fedpeft.config import FederationSection
    from fedpeft.models import AdapterState
    from fedpeft.privacy.server_dp import ServerPrivacy
    from fedpeft.server.replies import RoundReplies
else:  # torch on first use: checking a configuration imports this module (fedpeft/lazy.py)
    torch = lazy.module("torch")


class Aggregator(ABC):
    """Round replies + global adapter -> new global adapter; its tensor state and step count checkpoint."""

    needs_individual_updates: ClassVar[bool] = False  # True: refuses SecAgg+ (the server sees only the sum)
    supports_client_dp: ClassVar[bool] = True  # False: refuses client-level DP (not the mean DP-FedAvg noises)

    def __init__(self, cfg: FederationSection, privacy: ServerPrivacy | None = None) -> None:
        self.cfg = cfg
        self.privacy = privacy
        self.state: dict[str, torch.Tensor] = {}
        self.t = 0
        self.seed = 0  # run.seed (set by the server loop), for aggregators that draw random numbers
        self.metrics: dict[str, float | None] = {}  # this round's values for metrics.jsonl (set by aggregate)

    @property
    def proximal_mu(self) -> float:
        """Weight of the proximal term the clients add to their loss (FedProx); sent with each instruction."""
        return 0.0

    @abstractmethod
    def aggregate(self, replies: RoundReplies, global_state: AdapterState) -> AdapterState:
        """The next global adapter from this round's replies."""

    def correction(self) -> dict[str, torch.Tensor] | None:
        """A frozen per-module weight correction the clients fold into their base weights (LoRA ``exact``), or
        None."""
        return None

    def _buf(self, name: str, key: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """A persistent per-tensor state buffer (created on first use, saved by :meth:`state_dict`)."""
        full = f"{name}/{key}"
        if full not in self.state:
            self.state[full] = torch.full_like(like, fill)
        return self.state[full]

    def state_dict(self) -> tuple[dict[str, torch.Tensor], int]:
        """(tensor state, step count) for the checkpoint."""
        return dict(self.state), self.t

    def load_state_dict(self, state: dict[str, torch.Tensor], t: int) -> None:
        """Continue exactly from :meth:`state_dict`."""
        self.state, self.t = dict(state), t


AGGREGATORS: Registry[type[Aggregator]] = Registry("aggregation strategy")
#: ``federation.lora_aggregation`` modes that replace the strategy's mean (their own module: aggregators/lora.py)
LORA_AGGREGATORS: Registry[type[Aggregator]] = Registry("LoRA aggregation")


def make_aggregator(cfg: FederationSection, privacy: ServerPrivacy | None = None) -> Aggregator:
    """The aggregator of ``federation.lora_aggregation`` when that mode has one (exact, svd), else the one named
    by ``federation.strategy`` (averaging under ``privacy`` when it is active)."""
    if cfg.lora_aggregation in LORA_AGGREGATORS.names():
        return LORA_AGGREGATORS.get(cfg.lora_aggregation)(cfg, privacy)
    return AGGREGATORS.get(cfg.strategy)(cfg, privacy)


def weighted_mean(deltas: list[AdapterState], weights: list[float]) -> AdapterState:
    """Sum_i w_i * delta_i / sum_i w_i (float64 accumulation, float32 result)."""
    total = float(sum(weights))
    if not deltas or total <= 0:
        raise ValueError("need at least one delta with positive weight")
    out = {}
    for k in deltas[0]:
        acc = torch.zeros_like(deltas[0][k], dtype=torch.float64)
        for d, w in zip(deltas, weights):
            acc += d[k].to(torch.float64) * (w / total)
        out[k] = acc.to(torch.float32)
    return out


def mean_update(replies: RoundReplies, privacy: ServerPrivacy | None, global_state: AdapterState) -> AdapterState:
    """The round's mean update: SecAgg+'s secure mean or the example-weighted mean; under client-level DP
    the clipped fixed-denominator mean plus noise (of the secure sum, or of the decoded updates: the noise
    alone, shaped like ``global_state``, when no update arrived)."""
    dp = privacy if privacy is not None and privacy.active else None
    if replies.secure_mean is not None:
        return dp.release_secure(replies.secure_mean, len(replies.clients)) if dp else replies.secure_mean
    return dp.aggregate(replies.deltas, global_state) if dp else weighted_mean(replies.deltas, replies.weights)
