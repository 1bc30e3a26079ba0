"""Distributed DP (``privacy.mode = "distributed"``): each client noises its own update on an integer grid,
inside SecAgg+, so the server only ever sees the noised sum (Kairouz, Liu & Steinke 2021, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation").

Per client and round (:meth:`DistributedDP.encode`), on the ``d`` elements that enter the sum:

1. clip the update to L2 norm ``C`` (``privacy.clip_norm``);
2. scale onto the integer grid: ``B = grid * sqrt(d)`` steps per ``C`` (``privacy.distributed_grid``);
3. round stochastically, *conditionally*: redraw until ``||k||_2 <= Delta`` with
   ``Delta^2 = min(B^2 + d/4 + (B + sqrt(d)/2), (B + sqrt(d))^2)`` (the paper's bound at beta = e^-1/2;
   each draw passes with probability >= 0.39), so the L2 sensitivity is ``Delta`` whatever the rounding;
4. add discrete Gaussian noise of std ``sigma_share = z * Delta / sqrt(n_min)`` per element
   (``z = privacy.server_noise_multiplier``, ``n_min = privacy.secagg_min_survivors``): any ``n_min``
   surviving shares already give the sum the target std ``z * Delta`` (the dropout noise margin); a round
   whose sum holds fewer is withheld by SecAgg+.

**Field.** SecAgg+ clips each element to ``+-c``, ``c = ceil(Delta + t * sigma_share)`` with
``t = sqrt(2 ln(2 m d / p))``, ``p = TAIL_PROBABILITY``: a discrete Gaussian is sub-Gaussian, so the chance
that any element of any of the ``m`` clients is clipped is below ``p`` per round. Each client's element
then lies in ``[0, 2c]`` and the modulus ``M > m * 2c`` (a power of 2): the sum cannot wrap around.

**Accounting.** A sum of ``n`` discrete Gaussians is not exactly discrete Gaussian; the paper's Theorem
bounds the mechanism as ``rho``-zCDP with ``2 rho = Delta'^2 / (n sigma^2) + 2 tau d`` (we take the larger
constant 2 on the ``tau d`` term), ``tau = 10 sum_{k<n} exp(-2 pi^2 sigma^2 k / (k + 1))`` (about 0 for
``sigma_share >= 2``). The server knows who is in the sum and samples them itself, so no amplification by
sampling applies against it: each round is charged as a Gaussian mechanism with sampling rate 1 under the
replace-one relation (``Delta' = 2 Delta``, :func:`fedpeft.privacy.accounting.rdp_fixed_size_gaussian`),
at the effective noise multiplier :attr:`DistributedDP.accounted_noise_multiplier` (the fewest shares' Gaussian
part with the most shares' ``tau``; a share std below 0.5 is refused). SecAgg+'s clipping of
a noised element (probability < ``p``) adds at most ``(1 + e^eps) p`` to delta per round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fedpeft.compression.secure import field_bits, stochastic_round
from fedpeft.errors import PrivacyError

#: per round: probability bound that any noised element leaves SecAgg+'s clipping range
TAIL_PROBABILITY = 1e-12
#: conditional rounding: redraws before giving up (each passes with probability >= 0.39)
MAX_REDRAWS = 200


def discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of the discrete Gaussian N_Z(0, sigma^2) (int64): Canonne, Kamath & Steinke (2020),
    Algorithm 3 (discrete Laplace proposals, rejection), vectorized in floating point."""
    if sigma <= 0:
        return np.zeros(size, np.int64)
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)
    out = np.empty(size, np.int64)
    todo = np.arange(size)
    while todo.size:
        y = rng.geometric(p, todo.size) - rng.geometric(p, todo.size)  # discrete Laplace, P(y) ~ exp(-|y|/t)
        accept = rng.random(todo.size) < np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2))
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out


@dataclass(frozen=True)
class DistributedDP:
    """The distributed discrete Gaussian of one run: grid, sensitivity, noise share and field."""

    clip: float  # C, L2 bound of an update (float units)
    dim: int  # d, elements in the sum
    clients: int  # m, most clients in one sum
    min_survivors: int  # n_min, fewest shares a released sum holds
    noise_multiplier: float  # z: the sum's std is z * Delta (integer units) with n_min shares
    grid: float  # B / sqrt(d)

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.dim > 0 and self.noise_multiplier > 0 and self.grid > 0):
            raise PrivacyError("distributed DP needs clip_norm, server_noise_multiplier and distributed_grid > 0")
        if not 1 <= self.min_survivors <= self.clients:
            raise PrivacyError(f"secagg_min_survivors = {self.min_survivors} must be between 1 and the "
                               f"{self.clients} clients per round")
        if self.sigma_share < 0.5:
            raise PrivacyError(f"distributed DP: each client's noise share has std {self.sigma_share:.3g} grid steps; "
                               "the accounting of a sum of discrete Gaussians needs >= 0.5: raise "
                               "privacy.server_noise_multiplier or privacy.distributed_grid")
        if self.modulus_bits > 32:
            raise PrivacyError(f"distributed DP needs a {self.modulus_bits}-bit field for {self.clients} clients of "
                               f"{self.levels} steps; SecAgg+ allows 32: lower privacy.distributed_grid or "
                               "privacy.server_noise_multiplier, or sample fewer clients per round")

    @cached_property
    def norm_bound(self) -> float:
        """B: the clip norm in grid steps."""
        return self.grid * math.sqrt(self.dim)

    @cached_property
    def scale(self) -> float:
        """Float value of one grid step."""
        return self.clip / self.norm_bound

    @cached_property
    def sensitivity(self) -> float:
        """Delta: L2 norm bound of a conditionally rounded update (integer units)."""
        b, d = self.norm_bound, self.dim
        return math.sqrt(min(b * b + d / 4 + (b + math.sqrt(d) / 2), (b + math.sqrt(d)) ** 2))

    @cached_property
    def sigma_share(self) -> float:
        """Std of one client's discrete Gaussian share (integer units)."""
        return self.noise_multiplier * self.sensitivity / math.sqrt(self.min_survivors)

    def mean_noise_std(self, n: int) -> float:
        """Float std per element of the noise on the mean of ``n`` noised updates (n shares summed, divided by n)."""
        return self.sigma_share * math.sqrt(n) * self.scale / n

    @cached_property
    def half_range(self) -> int:
        """c: SecAgg+ clips each element of a noised update to +-c (exceeded with probability < p)."""
        tail = math.sqrt(2 * math.log(2 * self.clients * self.dim / TAIL_PROBABILITY))
        return math.ceil(self.sensitivity + tail * self.sigma_share)

    @cached_property
    def levels(self) -> int:
        """Steps of one client's shifted element, [0, 2c]."""
        return 2 * self.half_range

    @cached_property
    def modulus_bits(self) -> int:
        """log2 of the SecAgg+ modulus M: m * 2c < M, so the sum never wraps."""
        return field_bits(self.clients, self.levels)

    def tau(self, shares: int) -> float:
        """The paper's closeness of a sum of ``shares`` discrete Gaussians to one discrete Gaussian."""
        s2 = self.sigma_share**2
        return 10 * sum(math.exp(-2 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, shares))

    def noise_multiplier_for(self, shares: int) -> float:
        """Effective Gaussian noise multiplier of a sum of ``shares`` noise shares (std / Delta, tau charged)."""
        z_raw = math.sqrt(shares) * self.sigma_share / self.sensitivity
        return 1.0 / math.sqrt(1.0 / z_raw**2 + self.tau(shares) * self.dim / 2)

    @cached_property
    def accounted_noise_multiplier(self) -> float:
        """What every released round is charged: the weakest sum SecAgg+ releases. Its Gaussian part is weakest
        with the fewest shares (n_min), its tau term largest with the most (m): both worst cases are charged at once
        (with ``sigma_share`` of 2 or more tau is about 0 and this is ``noise_multiplier_for(n_min)``)."""
        z_raw = math.sqrt(self.min_survivors) * self.sigma_share / self.sensitivity
        return 1.0 / math.sqrt(1.0 / z_raw**2 + self.tau(self.clients) * self.dim / 2)

    def encode(self, update: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One client's noised integer vector: clip to C, scale, conditional stochastic rounding, + noise."""
        x = np.asarray(update, dtype=np.float64)
        norm = float(np.linalg.norm(x))
        if norm > self.clip:
            x = x * (self.clip / norm)
        x = x / self.scale
        bound = self.sensitivity**2
        for _ in range(MAX_REDRAWS):
            k = stochastic_round(x, rng)
            if float(k @ k) <= bound:
                return k + discrete_gaussian(self.sigma_share, k.size, rng)
        raise PrivacyError(f"conditional rounding failed {MAX_REDRAWS} times (norm bound {self.sensitivity:.1f})")
