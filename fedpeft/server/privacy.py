"""Client-level DP on the server (DP-FedAvg): bound each decoded update, average with a fixed
denominator, add Gaussian noise, adapt the clip norm, and account epsilon with sampling amplification.

The order with compression is the one documented in :mod:`fedpeft.privacy.client_dp`: the server
clips every *decoded* update to the round's clip norm, so the sensitivity bound holds for what was
actually received whatever the codec did (a ternary vector can have a larger norm than its source).
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.config import Config
from fedpeft.models import AdapterState
from fedpeft.privacy import AdaptiveClipper, ClientLevelAccountant, add_server_noise, clip_to_norm, dp_average


class ServerPrivacy:
    """Server-side client-level DP for one run (inactive unless privacy.mode is 'client' or 'both')."""

    def __init__(self, cfg: Config) -> None:
        p = cfg.privacy
        self.cfg = p
        self.active = p.mode in ("client", "both")
        self.total_clients = cfg.data.num_clients
        self.expected = cfg.federation.clients_per_round or cfg.data.num_clients
        self.sample_rate = self.expected / self.total_clients
        self.accountant = ClientLevelAccountant(p.accountant)
        self.clipper = (AdaptiveClipper(p.clip_norm, expected_clients=self.expected,
                                        noise_multiplier=p.server_noise_multiplier, target_quantile=p.target_quantile,
                                        lr=p.clip_lr, count_noise_std=p.clip_count_noise or None)
                        if self.active and p.adaptive_clip else None)
        self.generator = torch.Generator().manual_seed(cfg.run.seed * 7919 + 17)

    @property
    def clip_norm(self) -> float:
        """The clip norm clients use this round."""
        return self.clipper.clip_norm if self.clipper else self.cfg.clip_norm

    @property
    def update_noise_multiplier(self) -> float:
        """Noise multiplier on the update (less than the total when the clip count shares the budget)."""
        return self.clipper.update_noise_multiplier if self.clipper else self.cfg.server_noise_multiplier

    def aggregate(self, deltas: list[AdapterState]) -> AdapterState:
        """Clip each decoded update, average over the planned m clients, add noise std z*C/m."""
        c = self.clip_norm
        mean = dp_average([clip_to_norm(d, c) for d in deltas], self.expected)
        return add_server_noise(mean, c, self.update_noise_multiplier, self.expected, self.generator)

    def release_secure(self, secure_mean: AdapterState, n: int) -> AdapterState:
        """DP-FedAvg on a SecAgg+ sum of ``n`` uniformly weighted updates the clients clipped already:
        sum / m (the planned clients) + noise std z*C/m."""
        mean = {k: v * (n / self.expected) for k, v in secure_mean.items()}
        return add_server_noise(mean, self.clip_norm, self.update_noise_multiplier, self.expected, self.generator)

    def end_round(self, indicators: list[float]) -> dict[str, float]:
        """Charge the round to the accountant, adapt the clip norm; returns the round's privacy metrics."""
        used_clip = self.clip_norm
        self.accountant.step(self.cfg.server_noise_multiplier, self.sample_rate)
        if self.clipper:
            self.clipper.update(indicators, self.generator)
        return {"epsilon_client": self.accountant.epsilon(self.cfg.delta), "clip_norm": used_clip}

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """JSON state and tensor state (the noise generator) for the checkpoint."""
        meta = {"accountant": self.accountant.state_dict(),
                "clipper": self.clipper.state_dict() if self.clipper else None}
        return meta, {"generator": self.generator.get_state()}

    def restore(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Continue from :meth:`state` (same epsilon curve, same clip norm, same noise stream)."""
        self.accountant.load_state_dict(meta["accountant"])
        if self.clipper and meta.get("clipper"):
            self.clipper.load_state_dict(meta["clipper"])
        self.generator.set_state(tensors["generator"])
