"""Always-on sanity (the ``[sanity]`` section): bounds on what one client can do to the federation.

Cheap checks that run every round, before and after aggregation (docs/robustness.md):

* :class:`ReplyChecks` (per reply, in :func:`fedpeft.server.replies.collect`): the decode bound handed to
  the uplink codec, the FedAvg weight (num-examples below an exclusive cap, then capped at the partition
  size the server knows, or uniform) and the reported metrics (allowed by this run's configuration and
  in range; a bad metric is dropped, the update stays).
* :func:`screen_norms` (the round's decoded updates, before aggregation): an update whose L2 norm, whole,
  per tensor or, for LoRA, of the change it makes to each module's ``delta-W = B A``, exceeds a multiple of
  the round's median or an absolute bound is dropped or scaled down.
* :func:`global_problem` (after aggregation): why a new global adapter must not be applied (non-finite, or
  a value beyond ``sanity.max_global_value``), or None.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from fedpeft.errors import PayloadError
from fedpeft.models import lora_pairs
from fedpeft.split.frames import Limits
from fedpeft.training import num_local_steps

if TYPE_CHECKING:
    from fedpeft.config import Config, SanitySection
    from fedpeft.models import AdapterState
    from fedpeft.server.replies import RoundReplies

log = logging.getLogger(__name__)

MAX_SECONDS = 1e6  # a reported duration (seconds) beyond this is not a duration
MIN_RELATIVE = 3  # the median of fewer updates says nothing about which one is out of line
Range = tuple[float, float]
Norms = dict[str, tuple[float, float]]  # name -> (norm, the part that scales linearly with a clip factor)


def metric_ranges(cfg: Config, largest_partition: int, model_elements: int) -> dict[str, Range]:
    """The reported metrics this run's configuration allows, each with its closed range; a key that is
    listed nowhere here passes unchecked (nothing logs or uses it), one allowed only by other settings
    (``epsilon-local`` without local DP, ``split-*`` without split learning, ...) is refused."""
    ranges: dict[str, Range] = {"train-loss": (0.0, cfg.sanity.max_loss),
                                "partition-id": (0.0, float(cfg.data.num_clients - 1)),
                                "encode-ms": (0.0, 1000 * MAX_SECONDS), "train-seconds": (0.0, MAX_SECONDS),
                                "client-seconds": (0.0, MAX_SECONDS)}
    if cfg.privacy.mode in ("local", "both"):
        ranges["epsilon-local"] = (0.0, math.inf)
    if cfg.privacy.mode in ("client", "both"):
        ranges.update({"clip-indicator": (0.0, 1.0), "update-norm": (0.0, math.inf)})
    if cfg.privacy.secure_aggregation == "secaggplus":
        ranges["secagg-clipped"] = (0.0, float(model_elements))
    if cfg.split.enabled:  # per step at most two frames each way, each within the transport's frame limit
        steps = num_local_steps(cfg.train, largest_partition) + cfg.split.local_loss_steps
        frames = float(4 * steps * Limits().max_frame_bytes)
        ranges.update({"split-bytes-up": (0.0, frames), "split-bytes-down": (0.0, frames),
                       "split-steps": (0.0, float(steps)), "split-local-steps": (0.0, float(steps)),
                       "fl-adapter-bytes-fp32": (0.0, 4.0 * model_elements)})
    return ranges


GATED = ("epsilon-local", "clip-indicator", "update-norm", "secagg-clipped", "split-bytes-up", "split-bytes-down",
         "split-steps", "split-local-steps", "fl-adapter-bytes-fp32")  # allowed only where a setting asks for them


@dataclass
class ReplyChecks:
    """The per-reply checks of one run; ``partition_size(node)`` is the size of the node's partition where
    the server knows it (the in-process engine), else None."""

    cfg: SanitySection
    ranges: dict[str, Range]
    largest_partition: int
    partition_size: Callable[[int], int | None] = lambda node: None
    eval_size: Callable[[int], int | None] = lambda node: None  # federated evaluation: the node's held-out split

    @property
    def decode_bound(self) -> float:
        return self.cfg.decode_bound

    def check_claim(self, metrics: Mapping[str, float]) -> None:
        """Raise :class:`PayloadError` when num-examples reaches the exclusive cap: an update claiming that
        much cannot be weighed, so it is dropped whole."""
        claim = metrics["num-examples"]
        if claim >= self.cfg.max_num_examples:
            raise PayloadError(f"num-examples {claim:g} is not below sanity.max_num_examples = "
                               f"{self.cfg.max_num_examples}")

    def metrics(self, metrics: Mapping[str, float], node: int, rnd: int) -> dict[str, float]:
        """``metrics`` without those this run does not allow or that are out of range (each logged)."""
        kept = {}
        for key, value in metrics.items():
            lo, hi = self.ranges.get(key, (-math.inf, math.inf))
            if key in GATED and key not in self.ranges:
                log.warning("round %d: node %s reported %r, which this run's configuration does not produce; "
                            "metric dropped", rnd, node, key)
            elif not lo <= value <= hi:
                log.warning("round %d: node %s reported %s = %g outside [%g, %g]; metric dropped", rnd, node, key,
                            value, lo, hi)
            else:
                kept[key] = value
        return kept

    def weight(self, metrics: Mapping[str, float], node: int, rnd: int) -> float:
        """The update's FedAvg weight from its (checked) num-examples claim and ``sanity.weights``."""
        claim = metrics["num-examples"]
        if self.cfg.weights == "uniform":
            return 1.0
        if self.cfg.weights == "claimed":
            return claim
        size = self.partition_size(node)
        cap = float(self.largest_partition if size is None else size)
        if claim > cap:
            log.warning("round %d: node %s claims %g examples; weighed as %g (its partition)", rnd, node, claim, cap)
        return min(claim, cap)

    def evaluation(self, counts: Mapping[str, float], node: int, rnd: int) -> dict[str, float]:
        """A federated-evaluation reply's counts as the server adds them up: :class:`PayloadError` when its claim
        reaches ``sanity.max_num_examples`` or its mean loss exceeds ``sanity.max_loss``; under ``sanity.weights =
        "partition"`` a claim beyond the held-out split the server knows for the node (the in-process engine's) is
        weighed as that split: every count scaled down alike, so the node's own accuracy and loss stay as reported.
        A deployed node's split is its own file's, which the server does not know: its claim stands."""
        claim = counts["num-examples"]
        self.check_claim(counts)
        loss = counts["eval-loss-sum"] / counts["eval-weight"]
        if loss > self.cfg.max_loss:
            raise PayloadError(f"mean evaluation loss {loss:g} is above sanity.max_loss = {self.cfg.max_loss:g}")
        size = self.eval_size(node)
        cap = None if size is None else max(1, size)
        if self.cfg.weights != "partition" or cap is None or claim <= cap:
            return dict(counts)
        log.warning("round %d: node %s claims %g evaluated examples; weighed as %g (its held-out split)", rnd, node,
                    claim, cap)
        return {k: v * cap / claim for k, v in counts.items()}


# ---- norms -------------------------------------------------------------------------------------------


def _gram_norm(u: torch.Tensor, v: torch.Tensor) -> float:
    """||u @ v||_F from the small Gram matrices (u: out x r, v: r x in), never forming the product."""
    return math.sqrt(max(float(((u.T @ u) * (v @ v.T)).sum()), 0.0))


def delta_w_norms(delta: AdapterState, global_state: AdapterState,
                  pairs: list[tuple[str, str]]) -> Norms:
    """Per LoRA module: (||dW||, ||L|| + ||Q||) where dW = (B+dB)(A+dA) - BA = L + Q, L = dB A + B dA and
    Q = dB dA. The first is the change the update makes to the module's weight; the second bounds
    ||dW(s)|| <= s (||L|| + ||Q||) for the update scaled by s <= 1, which is what clipping needs.
    alpha / r is left out: a constant factor per run, so relative checks do not see it."""
    out = {}
    for ka, kb in pairs:
        da, db = delta[ka].double(), delta[kb].double()
        # the client's own rank (adapter.client_ranks: it changed the first r_i components)
        a, b = global_state[ka].double()[:da.shape[0]], global_state[kb].double()[:, :db.shape[1]]
        change = _gram_norm(torch.cat([db, b], 1), torch.cat([a + da, da], 0))
        linear = _gram_norm(torch.cat([db, b], 1), torch.cat([a, da], 0))
        out[ka.replace(".lora_A.", ".lora_AB.")] = (change, linear + _gram_norm(db, da))
    return out


def measure(delta: AdapterState, global_state: AdapterState, pairs: list[tuple[str, str]]) -> Norms:
    """The whole update's L2 norm (name ``""``), each tensor's, and each LoRA module's delta-W change."""
    per_tensor = {k: float(torch.linalg.vector_norm(v.double())) for k, v in delta.items()}
    total = math.sqrt(sum(n * n for n in per_tensor.values()))
    return {"": (total, total), **{k: (n, n) for k, n in per_tensor.items()},
            **delta_w_norms(delta, global_state, pairs)}


def _limits(measured: list[Norms], cfg: SanitySection, relative: bool) -> dict[str, float]:
    """Per norm name: the largest value allowed this round (multiple x the lower median when ``relative``, the
    absolute bound)."""
    limits: dict[str, float] = {}
    if relative and cfg.norm_multiple > 0 and len(measured) >= MIN_RELATIVE:
        for name in measured[0]:
            median = sorted(m[name][0] for m in measured)[(len(measured) - 1) // 2]
            if median > 0:  # a tensor no honest client changed (LoRA A in the first round) has no scale
                limits[name] = cfg.norm_multiple * median
    if cfg.max_update_norm > 0:
        limits[""] = min(limits.get("", math.inf), cfg.max_update_norm)
    return limits


def screen_norms(replies: RoundReplies, global_state: AdapterState, cfg: SanitySection, rnd: int,
                 relative: bool = True) -> dict[str, int]:
    """Drop (or, with ``norm_action = clip``, scale down into bounds) every update whose norms exceed this
    round's limits; edits ``replies`` in place and returns the counts for the round's row. ``relative = False``
    keeps only the absolute bound: under client-level DP a limit drawn from the other clients' updates would
    let one client decide whether another's update is in the noised sum (a sensitivity far above C)."""
    updates = [(c, c.delta) for c in replies.clients if c.delta is not None]
    if cfg.norm_action == "off" or not updates:
        return {}
    pairs = list(lora_pairs(sorted(global_state)).items())
    measured = [measure(delta, global_state, pairs) for _, delta in updates]
    limits = _limits(measured, cfg, relative)
    kept, dropped, clipped = [], 0, 0
    for (c, delta), m in zip(updates, measured):
        over = {name: (m[name], limit) for name, limit in limits.items() if m[name][0] > limit}
        if not over:
            kept.append(c)
            continue
        name, ((norm, _), limit) = next(iter(over.items()))
        what = f"norm {norm:.3g} of {name or 'the whole update'} exceeds {limit:.3g}"
        if cfg.norm_action == "drop":
            replies.dropped[c.node] = f"out of bounds: {what}"
            log.warning("round %d: dropped the update of node %s: %s", rnd, c.node, what)
            dropped += 1
            continue
        scale = min(limit / linear for (_, linear), limit in over.values())
        log.warning("round %d: scaled the update of node %s by %.3g: %s", rnd, c.node, scale, what)
        kept.append(replace(c, delta={k: v * scale for k, v in delta.items()}))
        clipped += 1
    replies.clients = kept
    return {"sanity_dropped": dropped, "sanity_clipped": clipped}


def global_problem(state: AdapterState, bound: float) -> str | None:
    """Why ``state`` must not become the global adapter (a NaN/inf or a value beyond ``bound``), or None."""
    for name, t in state.items():
        if t.numel() == 0:
            continue
        peak = float(t.detach().abs().max())
        if not math.isfinite(peak):
            return f"{name} holds NaN or inf"
        if peak > bound:
            return f"{name} holds a value of magnitude {peak:.3g}, beyond sanity.max_global_value = {bound:g}"
    return None
