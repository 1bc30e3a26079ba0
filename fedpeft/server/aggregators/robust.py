"""Robust aggregators: coordinate-wise median, trimmed mean, norm-bounded mean and ternary sign majority.

Each turns the round's individual decoded updates into one robust aggregate and steps the global
adapter the way FedAvg steps with its mean (``global + server_lr * aggregate``, :class:`FedAvg.apply`).
They need every client's update, so they refuse SecAgg+ (the server holds only the sum) and
client-level DP (their rule is not the clipped, noised mean the accountant charges for);
:mod:`fedpeft.config_rules` refuses both combinations before a run starts.

**One vote per client.** The claimed ``num-examples`` is ignored: a weight is attacker-chosen, and
the breakdown points below count clients, not examples.

**Zeros are abstentions.** Decoded ``topk`` / ``compeft`` updates are dense tensors that are zero
wherever a client sent nothing. Taken as values, those zeros outvote the senders on almost every
coordinate and a median stalls. Median and trimmed mean therefore take their statistic over the
clients that sent a non-zero value there (the *reporters*, r of the round's n), scaled by r / n,
so a coordinate every client sends gets the plain statistic and a sparse one gets the mean's
expectation (r / n x the reporters' typical value). A coordinate moves only when at least
``min(2f + 1, n // 2 + 1)`` clients report it (f = ``federation.byzantine_clients``): with at most f
hostile reporters among 2f + 1 the median stays within the honest reporters' values.

All four act on the tensors as sent (LoRA's A and B factors separately; see docs/robust-aggregation.md for why
and for the measured difference to acting on ``ΔW = B·A``).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import TYPE_CHECKING

from fedpeft import lazy
from fedpeft.errors import ConfigError
from fedpeft.privacy.client_dp import global_norm
from fedpeft.server.aggregators.base import AGGREGATORS
from fedpeft.server.aggregators.defences import add_noise, noise_seed, robust_learning_rate
from fedpeft.server.aggregators.fedavg import FedAvg

if TYPE_CHECKING:
    import torch

    from fedpeft.config import FederationSection
    from fedpeft.models import AdapterState
    from fedpeft.privacy.server_dp import ServerPrivacy
    from fedpeft.server.replies import RoundReplies
else:  # torch on first use: checking a configuration imports this module (fedpeft/lazy.py)
    torch = lazy.module("torch")

log = logging.getLogger(__name__)


class RobustAggregator(FedAvg):
    """A robust aggregate of the individual updates, applied as FedAvg applies its mean."""

    needs_individual_updates = True
    supports_client_dp = False

    def __init__(self, cfg: FederationSection, privacy: ServerPrivacy | None = None) -> None:
        if privacy is not None and privacy.active:  # config_rules refuses this first; never drop DP silently
            raise ConfigError(f"federation.strategy = {cfg.strategy!r} does not apply client-level DP")
        super().__init__(cfg, privacy)
        self.left_out: dict[int, str] = {}
        self.bound: float | None = None  # this round's clip bound, for rules that clip every update

    def aggregate(self, replies: RoundReplies, global_state: AdapterState) -> AdapterState:
        self.left_out, self.bound = {}, None
        step = self.combine(replies.deltas, global_state)
        nodes = replies.delta_nodes
        replies.excluded.update({nodes[i]: why for i, why in self.left_out.items()})
        return self.apply(global_state, self.defended(step, replies.deltas))

    def defended(self, step: AdapterState, deltas: list[AdapterState]) -> AdapterState:
        """``step`` after the backdoor defences configured (:mod:`.defences`): the robust learning rate, then
        server noise of std ``robust_noise`` x bound / n, where the bound is this round's clip bound when the rule
        clips (``self.bound``), else the round's median update norm; the noise is seeded by the run seed and the
        step count, so a resumed run adds the same noise. The fraction of coordinates reversed and the noise std
        go to ``metrics.jsonl`` (``sign_reversed``, ``robust_noise_std``)."""
        if self.cfg.sign_threshold:
            step, self.metrics["sign_reversed"] = robust_learning_rate(step, deltas, self.cfg.sign_threshold)
        if self.cfg.robust_noise > 0:
            bound = self.bound if self.bound is not None else float(median(torch.tensor(
                [global_norm(d) for d in deltas], dtype=torch.float64)))
            sigma = self.cfg.robust_noise * bound / len(deltas)
            log.info("%s: noise std %.4g (robust_noise %g x bound %.4g / %d updates)", self.cfg.strategy, sigma,
                     self.cfg.robust_noise, bound, len(deltas))
            step = add_noise(step, sigma, noise_seed(self.seed, self.t))
            self.metrics["robust_noise_std"] = sigma
        return step

    @abstractmethod
    def combine(self, deltas: list[AdapterState], global_state: AdapterState) -> AdapterState:
        """The round's robust aggregate (the pseudo-gradient the server steps along); a rule that leaves whole
        updates out records them in ``self.left_out`` (index into ``deltas`` -> why) for ``metrics.jsonl``."""


def stacked(deltas: list[AdapterState], key: str) -> torch.Tensor:
    """One tensor of every client as the columns of a (elements, clients) float32 matrix."""
    return torch.stack([d[key].reshape(-1).to(torch.float32) for d in deltas], dim=1)


def middle(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per row, the median of the first ``count`` entries of ascending ``values`` (the mean of the two middle
    ones when ``count`` is even; 0 where ``count`` is 0)."""
    lo = ((count - 1) // 2).clamp_min(0).unsqueeze(1)
    hi = (count // 2).clamp_max(values.shape[1] - 1).unsqueeze(1)
    med = (values.gather(1, lo) + values.gather(1, hi)).squeeze(1) / 2
    return torch.where(count > 0, med, torch.zeros_like(med))


def median(values: torch.Tensor) -> torch.Tensor:
    """The median of a 1-D tensor (the mean of the two middle values for an even count; 0 when empty)."""
    if values.numel() == 0:
        return torch.zeros((), dtype=values.dtype)
    return middle(values.sort().values.unsqueeze(0), torch.tensor([values.numel()]))[0]


class ReporterStatistic(RobustAggregator):
    """A per-coordinate statistic over the clients that reported the coordinate, scaled by r / n."""

    def combine(self, deltas: list[AdapterState], global_state: AdapterState) -> AdapterState:
        n = len(deltas)
        quorum = min(2 * self.cfg.byzantine_clients + 1, n // 2 + 1)
        out = {}
        for key, like in deltas[0].items():
            x = stacked(deltas, key)
            sent = x != 0
            r = sent.sum(dim=1)
            ordered = x.masked_fill(~sent, float("nan")).sort(dim=1).values  # abstentions sort last
            value = self.statistic(ordered, r) * (r / n)
            out[key] = torch.where(r >= quorum, value, torch.zeros_like(value)).reshape(like.shape)
        return out

    @abstractmethod
    def statistic(self, ordered: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Per row, the statistic of the ``r`` reported values, which come first in ``ordered`` (ascending)."""


@AGGREGATORS.register("median")
class CoordinateMedian(ReporterStatistic):
    """Coordinate-wise median (Yin et al., 2018): breakdown point 1/2 of the reporters."""

    def statistic(self, ordered: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return middle(ordered, r)


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean(ReporterStatistic):
    """Coordinate-wise trimmed mean (Yin et al., 2018): drop the ``max(floor(trim_fraction * r),
    byzantine_clients)`` smallest and largest reported values (at most ``(r - 1) // 2``), average the rest;
    tolerates that many hostile reporters per side. The ``byzantine_clients`` floor keeps a small round from
    trimming nothing (4 clients at 0.2 would otherwise be a plain mean)."""

    def statistic(self, ordered: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        k = (self.cfg.trim_fraction * r).floor().long().clamp_min(self.cfg.byzantine_clients)
        k = torch.minimum(k, (r - 1).clamp_min(0) // 2)
        pos = torch.arange(ordered.shape[1]).unsqueeze(0)
        keep = (pos >= k.unsqueeze(1)) & (pos < (r - k).unsqueeze(1))
        total = torch.where(keep, ordered, torch.zeros_like(ordered)).sum(dim=1)
        return total / (r - 2 * k).clamp_min(1)


@AGGREGATORS.register("norm_bounded")
class NormBoundedMean(RobustAggregator):
    """Clip each update to an L2 norm bound, then average (Sun et al., 2019, *Can you really backdoor FL?*).

    The bound is ``federation.norm_bound``, or (0) the round's median update norm, which fewer than half
    hostile clients cannot raise above an honest norm. Bounded influence, not a robust location: each
    client moves the aggregate by at most bound / n. Norms are of the update as sent (all tensors, LoRA
    factors included), as client-level DP clips; that bounds the ΔW step too, by
    ``(|A| + |B|) * bound + bound**2`` for the global factors A, B.
    """

    def combine(self, deltas: list[AdapterState], global_state: AdapterState) -> AdapterState:
        norms = torch.tensor([global_norm(d) for d in deltas], dtype=torch.float64)
        self.bound = bound = self.cfg.norm_bound or float(median(norms))
        scales = [min(1.0, bound / float(v)) if v > 0 else 1.0 for v in norms]
        clipped = sum(1 for s in scales if s < 1.0)
        if clipped:
            log.info("norm_bounded: clipped %d of %d updates to norm %.4g", clipped, len(deltas), bound)
        weights = torch.tensor(scales) / len(deltas)
        return {k: torch.einsum("n,n...->...", weights, torch.stack([d[k] for d in deltas])) for k in deltas[0]}


@AGGREGATORS.register("sign_majority")
class SignMajority(RobustAggregator):
    """Per-coordinate sign vote with one robust magnitude per tensor, fitted to ternary (``compeft``) updates.

    Each client votes the sign of its value (0 where it sent nothing); the aggregate is
    ``M * (sum of votes) / n``: the majority sign, scaled by the net vote. ``M`` is the median over
    clients of each client's mean non-zero magnitude in that tensor: a compeft update's non-zeros share
    one per-tensor scale, which that mean recovers exactly, and the median across clients keeps a
    x100 client from setting it (the mean of all magnitudes would not). Honest ternary updates with a
    common scale aggregate to exactly their mean; any one client moves any coordinate by at most M / n.
    """

    def combine(self, deltas: list[AdapterState], global_state: AdapterState) -> AdapterState:
        n = len(deltas)
        out = {}
        for key, like in deltas[0].items():
            x = stacked(deltas, key)
            nonzero = (x != 0).sum(dim=0)
            mags = (x.abs().sum(dim=0) / nonzero.clamp_min(1))[nonzero > 0]
            out[key] = (median(mags) * torch.sign(x).sum(dim=1) / n).reshape(like.shape)
        return out
