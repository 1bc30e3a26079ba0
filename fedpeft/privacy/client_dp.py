"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018; adaptive clipping, Andrew et al. 2021).

The unit of privacy is a whole client: each round every sampled client's update is bounded to L2 norm
``C`` and the server adds Gaussian noise of std ``z * C / m`` to the *average* of the bounded updates,
where ``m`` is the planned (expected) number of clients per round. The accountant
(:class:`fedpeft.privacy.accounting.ClientLevelAccountant`) then charges one sampled-Gaussian step with
noise multiplier ``z`` and sampling rate ``q = m / num_clients`` per round.

The sensitivity bound must hold for exactly what the server aggregates, i.e. the *decoded* update.
Compression can break a bound applied before encoding: a ternary (sign x scale) vector, a quantized
vector or an error-feedback-corrected vector can have a larger norm than the vector it came from.
So the order is:

client::

    delta   = local_adapter - global_adapter             (+ error-feedback residual, if used)
    norm    = global_norm(delta)                         -> adaptive clipping indicator: norm <= C
    delta, _ = clip_update(delta, C)                     bound what goes into the codec
    decoded = decode(encode(delta))
    sent    = clip_to_norm(decoded, C)                   bound what is actually sent (AFTER encode->decode)
    residual = delta - sent                              (error feedback keeps what was dropped/shrunk)

The payload on the wire is ``encode(delta)`` unchanged: the client does not rescale it. ``sent`` is what
the server will make of it (decode, then ``clip_to_norm``); the client computes it only to keep its
error-feedback residual exact, and the server applies the same clip to every decoded reply.

server::

    each decoded reply -> clip_to_norm(decoded, C)       enforce the bound (a no-op for honest clients)
    sample = each of the N eligible clients with q = m / N (Poisson; or exactly m of N, privacy.client_sampling)
    mean  = dp_average(replies, expected_clients=q N)    uniform weights, fixed denominator q N
    noisy = add_server_noise(mean, C, z, q N, generator) (z_delta from AdaptiveClipper if adaptive)
    accountant.step(z, q)                                this round's real rate

Weighting by ``num_examples`` or dividing by the number of replies that arrived would change the
sensitivity; under client-level DP the average must be ``sum / (q N)`` with ``q N`` fixed before sampling.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedpeft import lazy
from fedpeft.errors import PayloadError, PrivacyError

if TYPE_CHECKING:
    import torch
else:  # torch on first use: checking a configuration imports this module (fedpeft/lazy.py)
    torch = lazy.module("torch")

log = logging.getLogger(__name__)

#: Andrew et al. 2021 recommend a count-noise std of m/20 (noise std 0.05 on the fraction b-bar).
COUNT_NOISE_FRACTION = 1.0 / 20.0


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise PrivacyError(f"{name} must be a positive finite number, got {value!r}")


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors taken together (as one flat vector), computed in float64."""
    total = 0.0
    for t in tensors.values():
        total += float(torch.sum(t.detach().to(torch.float64) ** 2))
    return math.sqrt(total)


def _factor(norm: float, clip_norm: float) -> float:
    _positive("clip_norm", clip_norm)
    if not math.isfinite(norm):
        raise PayloadError("update contains NaN or infinite values; it cannot be clipped to a bounded norm")
    return 1.0 if norm <= clip_norm else clip_norm / norm


def clip_factor(tensors: Mapping[str, torch.Tensor], clip_norm: float) -> float:
    """The factor ``min(1, C / norm)`` that brings ``tensors`` to global norm at most ``clip_norm``.

    Raises :class:`PayloadError` for non-finite values: such an update cannot be bounded and must be
    dropped (the server treats it like any invalid reply).
    """
    return _factor(global_norm(tensors), clip_norm)


def _scaled(tensors: Mapping[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    if factor == 1.0:
        return {k: v.detach().clone() for k, v in tensors.items()}
    return {k: (v.detach().to(torch.float64) * factor).to(v.dtype) for k, v in tensors.items()}


def clip_update(delta: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale ``delta`` to global L2 norm at most ``clip_norm``; return (clipped copy, pre-clip norm)."""
    norm = global_norm(delta)
    return _scaled(delta, _factor(norm, clip_norm)), norm


def clip_to_norm(decoded: Mapping[str, torch.Tensor], clip_norm: float) -> dict[str, torch.Tensor]:
    """Bound a *decoded* update (what the server aggregates) to norm ``clip_norm``; see the module docstring."""
    return _scaled(decoded, clip_factor(decoded, clip_norm))


def dp_average(updates: Iterable[Mapping[str, torch.Tensor]], expected_clients: float,
               like: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Uniform average with a fixed denominator: ``sum(updates) / expected_clients``.

    ``expected_clients`` is the round's expected size fixed before sampling (``q N`` under Poisson sampling,
    the sample size under fixed-size sampling), *not* the number of replies that arrived, so the
    sensitivity of the average to one client stays ``C / m``. ``updates`` is read once (a generator keeps
    one update in memory at a time). With no update the sum is zeros shaped like ``like`` (a DP release
    happens whoever replied: the noise alone).
    """
    if expected_clients < 1:
        raise PrivacyError(f"expected_clients must be >= 1, got {expected_clients}")
    total = None if like is None else {k: torch.zeros_like(v, dtype=torch.float32) for k, v in like.items()}
    for u in updates:
        if total is None:
            total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in u.items()}
        if set(u) != set(total):
            raise PayloadError("updates do not have the same tensor names")
        for k, v in u.items():
            if v.shape != total[k].shape:
                raise PayloadError(f"update tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(total[k].shape)}")
            total[k] += v.detach().to(torch.float32)
    if total is None:
        raise PrivacyError("dp_average needs at least one update or a template (`like`) to average none")
    return {k: v / expected_clients for k, v in total.items()}


def add_server_noise(mean_delta: Mapping[str, torch.Tensor], clip_norm: float, noise_multiplier: float,
                     num_clients: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Add Gaussian noise of std ``noise_multiplier * clip_norm / num_clients`` to every coordinate.

    ``mean_delta`` is the uniform average of clipped updates (:func:`dp_average`) and ``num_clients``
    the same fixed denominator ``m``. Noise is drawn in sorted-key order so a seeded generator gives
    the same result regardless of dict order. (A seed known to others lets them remove the noise: seed
    only in simulations.)
    """
    _positive("clip_norm", clip_norm)
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise PrivacyError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if num_clients < 1:
        raise PrivacyError(f"num_clients must be >= 1, got {num_clients}")
    std = noise_multiplier * clip_norm / num_clients
    out: dict[str, torch.Tensor] = {}
    for k in sorted(mean_delta):
        v = mean_delta[k].detach()
        noise = torch.normal(0.0, std, size=tuple(v.shape), generator=generator, dtype=torch.float32,
                             device=v.device) if std > 0 else torch.zeros(v.shape, device=v.device)
        out[k] = (v.to(torch.float32) + noise).to(v.dtype)
    return {k: out[k] for k in mean_delta}


def update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier for the update when the clipped-count query shares the budget (Andrew et al. Thm 1).

    The two Gaussian queries (update: sensitivity C, noise ``z_delta*C``; centered count: sensitivity
    1/2, noise ``sigma_b``) compose to one Gaussian mechanism with
    ``z = (z_delta**-2 + (2*sigma_b)**-2) ** -0.5``; solved for ``z_delta`` given the budget ``z``.
    """
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_noise_std <= noise_multiplier:
        raise PrivacyError(
            f"adaptive clipping: count noise std {count_noise_std:.4g} is too small for noise multiplier "
            f"{noise_multiplier:.4g} (needs 2*sigma_b > z, i.e. sigma_b > {noise_multiplier / 2:.4g}); with the "
            f"default sigma_b = m/20 this means more than {10 * noise_multiplier:.4g} clients per round. "
            "Sample more clients per round, set privacy.clip_count_noise above z/2, or turn adaptive clipping off.")
    return (noise_multiplier ** -2 - (2 * count_noise_std) ** -2) ** -0.5


class AdaptiveClipper:
    """Quantile-based adaptive clipping (Andrew et al. 2021), server side.

    Each round clients clip with the current :attr:`clip_norm` and report the indicator
    ``norm <= clip_norm`` of their *pre-clip* norm. The server noises the centered count
    ``sum(b_i - 1/2) + N(0, sigma_b^2)``, estimates the fraction ``b = count / m + 1/2`` and updates
    ``C <- C * exp(-lr * (b - target_quantile))``. Use :attr:`update_noise_multiplier` for the update
    noise and :attr:`noise_multiplier` (the total) for the accountant.
    """

    def __init__(self, initial_clip: float, *, expected_clients: int, noise_multiplier: float,
                 target_quantile: float = 0.5, lr: float = 0.2, count_noise_std: float | None = None) -> None:
        _positive("initial_clip", initial_clip)
        if not 0.0 < target_quantile < 1.0:
            raise PrivacyError(f"target_quantile must be in (0, 1), got {target_quantile}")
        if not lr > 0:
            raise PrivacyError(f"adaptive clipping learning rate must be > 0, got {lr}")
        if expected_clients < 1:
            raise PrivacyError(f"expected_clients must be >= 1, got {expected_clients}")
        self.clip_norm = float(initial_clip)
        self.expected_clients = int(expected_clients)
        self.noise_multiplier = float(noise_multiplier)
        self.target_quantile = float(target_quantile)
        self.lr = float(lr)
        self.count_noise_std = (float(count_noise_std) if count_noise_std is not None
                                else COUNT_NOISE_FRACTION * expected_clients)
        self.update_noise_multiplier = update_noise_multiplier(self.noise_multiplier, self.count_noise_std)
        self.rounds = 0

    @staticmethod
    def indicator(norm: float, clip_norm: float) -> float:
        """Client side: 1.0 if the pre-clip update norm is within the clip norm, else 0.0."""
        return 1.0 if norm <= clip_norm else 0.0

    def update(self, indicators: Sequence[float], generator: torch.Generator) -> float:
        """Noise the count of the round's indicators, update and return the new clip norm."""
        for b in indicators:
            if b not in (0.0, 1.0):
                raise PayloadError(f"clip indicator must be 0 or 1, got {b!r}")
        count = sum(b - 0.5 for b in indicators)
        if self.count_noise_std > 0 and self.noise_multiplier > 0:
            count += float(torch.normal(0.0, self.count_noise_std, size=(1,), generator=generator))
        fraction = count / self.expected_clients + 0.5
        self.clip_norm *= math.exp(-self.lr * (fraction - self.target_quantile))
        self.rounds += 1
        log.debug("adaptive clip: fraction %.3f -> clip norm %.5g", fraction, self.clip_norm)
        return self.clip_norm

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state (for the server checkpoint)."""
        return {"clip_norm": self.clip_norm, "expected_clients": self.expected_clients,
                "noise_multiplier": self.noise_multiplier, "target_quantile": self.target_quantile,
                "lr": self.lr, "count_noise_std": self.count_noise_std, "rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the clip norm continues where it was)."""
        try:
            clip = float(state["clip_norm"])
            self.__init__(clip, expected_clients=int(state["expected_clients"]),  # type: ignore[misc]
                          noise_multiplier=float(state["noise_multiplier"]),
                          target_quantile=float(state["target_quantile"]), lr=float(state["lr"]),
                          count_noise_std=float(state["count_noise_std"]))
            self.rounds = int(state["rounds"])
        except (KeyError, TypeError, ValueError) as e:
            raise PrivacyError(f"invalid adaptive clipper state: {e}") from None
