"""Aggregation of client deltas: example-weighted averaging and server optimizers.

Clients send *deltas* (local adapter - global adapter), so every strategy is "average the deltas,
then let a server optimizer turn the average into a step" (Reddi et al., *Adaptive Federated
Optimization*, Algorithm 2): FedAvg/FedProx step by ``server_lr * mean``; FedAvgM keeps momentum;
FedAdam / FedYogi / FedAdagrad keep first and second moments with adaptivity ``tau``. The state is a
dict of tensors so it goes into the checkpoint and a resumed run continues exactly.

Flower's own strategy classes hold this state inside their round loop on dense weight arrays;
our deltas arrive compressed and the loop owns sampling, DP and checkpoints, so the update rules
live here, on plain tensors.
"""

from __future__ import annotations

import torch

from fedpeft.config import FederationSection
from fedpeft.models import AdapterState
from fedpeft.registry import Registry


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


class ServerOptimizer:
    """Turns the averaged client delta into the global step: ``global + step(mean_delta)``."""

    def __init__(self, cfg: FederationSection) -> None:
        self.cfg = cfg
        self.state: dict[str, torch.Tensor] = {}
        self.t = 0

    def apply(self, global_state: AdapterState, mean_delta: AdapterState) -> AdapterState:
        self.t += 1
        return {k: global_state[k] + self.direction(k, mean_delta[k]) for k in global_state}

    def direction(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        return self.cfg.server_lr * delta

    def _buf(self, name: str, key: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        full = f"{name}/{key}"
        if full not in self.state:
            self.state[full] = torch.full_like(like, fill)
        return self.state[full]

    def state_dict(self) -> tuple[dict[str, torch.Tensor], int]:
        return dict(self.state), self.t

    def load_state_dict(self, state: dict[str, torch.Tensor], t: int) -> None:
        self.state, self.t = dict(state), t


OPTIMIZERS: Registry[type[ServerOptimizer]] = Registry("aggregation strategy")
OPTIMIZERS.register("fedavg")(ServerOptimizer)
OPTIMIZERS.register("fedprox")(ServerOptimizer)  # the proximal term is added by the clients


@OPTIMIZERS.register("fedavgm")
class FedAvgM(ServerOptimizer):
    """Server momentum: v = beta*v + delta; step = lr * v."""

    def direction(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        v = self._buf("v", key, delta)
        v.mul_(self.cfg.server_momentum).add_(delta)
        return self.cfg.server_lr * v


class _FedOpt(ServerOptimizer):
    """m = b1*m + (1-b1)*delta; v updated by the subclass; step = lr * m / (sqrt(v) + tau)."""

    def direction(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        m = self._buf("m", key, delta)
        m.mul_(self.cfg.beta1).add_((1 - self.cfg.beta1) * delta)
        v = self._buf("v", key, delta, fill=self.cfg.tau**2)
        self.second_moment(v, delta)
        return self.cfg.server_lr * m / (v.sqrt() + self.cfg.tau)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        raise NotImplementedError


@OPTIMIZERS.register("fedadagrad")
class FedAdagrad(_FedOpt):
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        v.add_(delta * delta)


@OPTIMIZERS.register("fedadam")
class FedAdam(_FedOpt):
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        v.mul_(self.cfg.beta2).add_((1 - self.cfg.beta2) * delta * delta)


@OPTIMIZERS.register("fedyogi")
class FedYogi(_FedOpt):
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        sq = delta * delta
        v.sub_((1 - self.cfg.beta2) * sq * torch.sign(v - sq))


def make_server_optimizer(cfg: FederationSection) -> ServerOptimizer:
    """The server optimizer named by ``federation.strategy``."""
    return OPTIMIZERS.get(cfg.strategy)(cfg)
