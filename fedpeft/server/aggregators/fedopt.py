"""The adaptive server optimizers of Reddi et al., *Adaptive Federated Optimization*: FedAdagrad,
FedAdam, FedYogi. First and second moments per tensor, adaptivity ``tau``; the moments are the
aggregator's checkpointed state, so a resumed run continues exactly."""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

from fedpeft import lazy
from fedpeft.server.aggregators.base import AGGREGATORS
from fedpeft.server.aggregators.fedavg import FedAvg

if TYPE_CHECKING:
    import torch
else:  # torch on first use: checking a configuration imports this module (fedpeft/lazy.py)
    torch = lazy.module("torch")


class FedOpt(FedAvg):
    """m = b1*m + (1-b1)*delta; v updated by the subclass; step = lr * m / (sqrt(v) + tau)."""

    def direction(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        m = self._buf("m", key, delta)
        m.mul_(self.cfg.beta1).add_((1 - self.cfg.beta1) * delta)
        v = self._buf("v", key, delta, fill=self.cfg.tau**2)
        self.second_moment(v, delta)
        return self.cfg.server_lr * m / (v.sqrt() + self.cfg.tau)

    @abstractmethod
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        """Update the second moment ``v`` in place from this round's mean delta."""


@AGGREGATORS.register("fedadagrad")
class FedAdagrad(FedOpt):
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        v.add_(delta * delta)


@AGGREGATORS.register("fedadam")
class FedAdam(FedOpt):
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        v.mul_(self.cfg.beta2).add_((1 - self.cfg.beta2) * delta * delta)


@AGGREGATORS.register("fedyogi")
class FedYogi(FedOpt):
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        sq = delta * delta
        v.sub_((1 - self.cfg.beta2) * sq * torch.sign(v - sq))
