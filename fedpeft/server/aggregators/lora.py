"""LoRA-aware aggregators (``federation.lora_aggregation``): ``exact`` (FedEx-LoRA), ``svd`` (FlexLoRA),
``zeropad`` (HetLoRA) and ``stack`` (FLoRA).

All form the weighted mean of the clients' ``ΔW_i = B_i A_i`` per LoRA module from the individual decoded
updates (:func:`fedpeft.lora.pair_means`) and step the global model to ``ΔW + server_lr * (mean - ΔW)``;
tensors that are not a LoRA pair (a classification head) get FedAvg's weighted mean.

- ``exact``: the new factors are the FedAvg factors ``A + lr·mean(dA)``, ``B + lr·mean(dB)`` (rank r, as
  sent to clients), and what their product misses of the target goes into a frozen per-module correction
  ``C`` (float64, checkpointed as aggregator state) that every client folds into its base weight, so that
  ``B'A' + C`` equals the target to float64 rounding whatever the rank of the mean.
- ``svd``: the target is factored back to rank r by a truncated SVD (``B' = U_r S_r^½``, ``A' = S_r^½ V_r^T``);
  nothing else travels, so it is exact only when the target has rank <= r (``lora_svd_error`` reports the rest).
  A client of rank ``r_i`` receives the first ``r_i`` components: the target's best rank-``r_i`` approximation.
- ``svd_delta``: ``svd`` for clients of mixed ranks without erasing what they never held. The server keeps the
  exact dense global ``ΔW`` per module (float64 aggregator state) and steps it by each client's *change*,
  ``ΔW += lr · Σ w_i (B_i A_i - B_(r_i) A_(r_i))`` (``B_(r_i) A_(r_i)``: the best rank-``r_i`` approximation the
  client was sent); the global factors are its rank-r SVD, whose first ``r_i`` components each client gets. Under
  ``svd`` a rank-2 client's product lacks the global's components 3..r, so its weight's share of them is erased
  every round; here it leaves them as they are. All clients at rank r: identical to ``svd``.
- ``zeropad``: the new factors are the mean of the clients' zero-padded factors (FedAvg when all ranks are
  equal); ``lora_agg_error`` reports how far their product is from the target. Nothing else travels.
- ``stack``: the exact mean of the stacked ``[w_1 B_1 ... w_n B_n] [A_1; ...; A_n]`` (rank ``Σ r_i``) is kept
  bounded the FLoRA way: folded into the frozen correction (as ``exact``'s) while the factors go back to their
  seeded initialisation (``B = 0``) every round.

Mixed client ranks pad each client's factors with zeros to the server's rank first (:func:`fedpeft.lora.pair_means`).
All need every client's update (no SecAgg+) and do not noise the mean (no client-level DP);
:mod:`fedpeft.config_rules` refuses those combinations and any strategy other than fedavg or fedprox.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

from fedpeft import lazy, lora
from fedpeft.server.aggregators.base import LORA_AGGREGATORS, weighted_mean
from fedpeft.server.aggregators.fedavg import FedAvg

if TYPE_CHECKING:
    import torch

    from fedpeft.models import AdapterState
    from fedpeft.server.replies import RoundReplies
else:  # torch on first use: checking a configuration imports this module (fedpeft/lazy.py)
    torch = lazy.module("torch")

DENSE = "dense"  # state key prefix of svd_delta's exact global ΔW
CORRECTION = "correction"  # state key prefix of exact's (and stack's) per-module correction
INIT = "init"  # state key prefix of stack's initial factors


class LoraProductMean(FedAvg):
    """Steps the global ``ΔW = B·A`` of every LoRA module towards the weighted mean of the clients' products."""

    needs_individual_updates = True
    supports_client_dp = False

    @property
    def proximal_mu(self) -> float:
        return self.cfg.proximal_mu if self.cfg.strategy == "fedprox" else 0.0

    def aggregate(self, replies: RoundReplies, global_state: AdapterState) -> AdapterState:
        self.t += 1
        deltas, weights, lr = replies.deltas, replies.weights, self.cfg.server_lr
        self._ranks = [lora.adapter_rank(d) for d in deltas]
        self._w = lora.component_weights(weights, self._ranks, lora.adapter_rank(global_state),
                                         self.cfg.lora_rank_weighting)
        means = lora.pair_means(deltas, self._w, global_state)
        paired = set(means) | {b for b, _ in means.values()}
        others = [k for k in global_state if k not in paired]
        out = {}
        if others:
            mean = weighted_mean([{k: d[k] for k in others} for d in deltas], weights)
            out = {k: global_state[k] + lr * mean[k] for k in others}
        self.metrics = {"lora_agg_error": lora.agg_error(means)}
        for a, (b, m) in means.items():
            old = global_state[b].double() @ global_state[a].double()
            target = old + lr * (m.product - old)
            out[a], out[b] = self.factor(lora.module_of(a), target, global_state[a], global_state[b], m, lr)
        return {k: out[k] for k in global_state}

    @abstractmethod
    def factor(self, module: str, target: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, m: lora.PairMean,
               lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The new (A, B) of one module whose global ``ΔW`` should become ``target`` (float64)."""


@LORA_AGGREGATORS.register("zeropad")
class ZeroPadLoRA(LoraProductMean):
    """HetLoRA: the weighted mean of the clients' factors zero-padded to the server's rank (no correction)."""

    def factor(self, module: str, target: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, m: lora.PairMean,
               lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        return (ga.double() + lr * m.mean_da).to(ga.dtype), (gb.double() + lr * m.mean_db).to(gb.dtype)


@LORA_AGGREGATORS.register("exact")
class ExactLoRA(ZeroPadLoRA):
    """FedEx-LoRA: FedAvg's factors plus a frozen per-module correction holding the rest of the exact mean."""

    def factor(self, module: str, target: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, m: lora.PairMean,
               lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = super().factor(module, target, ga, gb, m, lr)
        self._correct(module, target, a, b)
        return a, b

    def _correct(self, module: str, target: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """The global model's ΔW was B·A + C; it becomes B'·A' + C' = target + C (rounded factors included)."""
        key = f"{CORRECTION}/{module}"
        self.state[key] = self.state.get(key, torch.zeros_like(target)) + target - b.double() @ a.double()

    def correction(self) -> dict[str, torch.Tensor] | None:
        """Module -> its correction C in ``B·A`` units (float64; None before the first aggregation)."""
        found = {k.split("/", 1)[1]: v for k, v in self.state.items() if k.startswith(CORRECTION + "/")}
        return found or None


@LORA_AGGREGATORS.register("stack")
class StackLoRA(ExactLoRA):
    """FLoRA: the exact mean product goes into the frozen correction; the factors restart at their init."""

    def factor(self, module: str, target: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, m: lora.PairMean,
               lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        # the global factors before the first aggregation are the seeded init (state: a resumed run keeps them)
        a0, b0 = (self.state.setdefault(f"{INIT}/{module}/{f}", x.clone()) for f, x in (("A", ga), ("B", gb)))
        self._correct(module, target, a0, b0)
        return a0.clone(), b0.clone()


@LORA_AGGREGATORS.register("svd")
class SvdLoRA(LoraProductMean):
    """FlexLoRA: the exact mean product, truncated back to rank r by SVD (lossy when its rank exceeds r)."""

    def aggregate(self, replies: RoundReplies, global_state: AdapterState) -> AdapterState:
        self._errors: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        out = super().aggregate(replies, global_state)
        self.metrics["lora_svd_error"] = lora.relative_error(self._errors, self._targets)
        return out

    def factor(self, module: str, target: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, m: lora.PairMean,
               lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        r = ga.shape[0]
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        root = s[:r].sqrt()
        b = u[:, :r] * root
        a = root.unsqueeze(1) * vh[:r]
        if b.shape[1] < r:  # rank r above min(out, in): pad with zero directions
            b = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1)
            a = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])], dim=0)
        a, b = a.to(ga.dtype), b.to(gb.dtype)
        self._errors.append(target - b.double() @ a.double())
        self._targets.append(target)
        return a, b


@LORA_AGGREGATORS.register("svd_delta")
class SvdDeltaLoRA(SvdLoRA):
    """``svd`` stepping an exact dense global ``ΔW`` by each client's change against what it was sent."""

    def factor(self, module: str, target: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, m: lora.PairMean,
               lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ga.double(), gb.double()
        key = f"{DENSE}/{module}"
        dense = self.state.get(key, b @ a)
        # what the clients started from, weighted as the product mean weighs them: component k counts by the
        # weight of its holders, and fully where nobody holds it (the product mean keeps it unchanged there)
        w = self._w
        held = lora.held(self._ranks, w.shape[1])
        sent = (b * ((w * held).sum(0) + 1 - w.sum(0))) @ a
        self.state[key] = dense + lr * (m.product - sent)
        return super().factor(module, self.state[key], ga, gb, m, lr)
