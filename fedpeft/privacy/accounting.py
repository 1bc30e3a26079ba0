"""Privacy accounting with amplification by sampling, on top of ``opacus.accountants``.

:class:`ClientLevelAccountant` is the server's accountant for client-level DP: one sampled-Gaussian
step per round. Unlike Flower's built-in fixed-clipping accountant (which assumes every client every
round, q = 1: epsilon ~ 96 after 100 rounds at z = 1, delta = 1e-5) it accounts for the amplification
that client sampling gives (q = 0.1: epsilon ~ 7.9 with RDP). Each round is charged with its own
sampling rate, so rounds with different populations compose (both RDP and PRV take mixed histories).

Two sampling schemes, each with the neighbouring relation its analysis needs:

- ``poisson``: every eligible client joins a round independently with probability q; neighbouring
  federations differ by adding or removing one client (add/remove). opacus' sampled-Gaussian RDP or
  PRV accountant, sensitivity ``C`` of the clipped sum.
- ``fixed``: exactly m of N clients, uniformly without replacement; neighbouring federations have the
  same N and differ in one client's data (replace-one). The sensitivity of the clipped sum is then
  ``2C``, and the RDP of the subsampled Gaussian is bounded with Wang, Balle & Kasiviswanathan (2019,
  "Subsampled Renyi Differential Privacy and Analytical Moments Accountant", Theorem 9) at integer
  orders. Only ``accountant = "rdp"`` supports it.

The state is the composition history ``[[noise_multiplier, sample_rate, steps], ...]`` as plain JSON,
so a resumed run continues the exact same epsilon curve.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any

from fedpeft.errors import PrivacyError

if TYPE_CHECKING:  # opacus (and the scipy it loads) only when a run accounts privacy
    from opacus.accountants.accountant import IAccountant

log = logging.getLogger(__name__)

ACCOUNTANTS = ("rdp", "prv")
SAMPLING = ("poisson", "fixed")
#: integer RDP orders for fixed-size sampling (the without-replacement bound is stated at integer orders)
FIXED_ORDERS = [*range(2, 65), 80, 96, 128, 192, 256]


def make_accountant(kind: str) -> IAccountant:
    """A fresh opacus accountant of the given kind ("rdp" or "prv")."""
    _check_kind(kind)
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"rdp": RDPAccountant, "prv": PRVAccountant}[kind]()


def _check_kind(kind: str) -> None:
    if kind not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {kind!r}; known: {', '.join(sorted(ACCOUNTANTS))}")


def history_to_json(history: list[tuple[float, float, int]]) -> list[list[float | int]]:
    """Opacus history tuples -> JSON-able lists."""
    return [[float(z), float(q), int(n)] for z, q, n in history]


def history_from_json(raw: Any) -> list[tuple[float, float, int]]:
    """Validate and convert a JSON history back into opacus' tuple form."""
    if not isinstance(raw, list):
        raise PrivacyError(f"accountant history must be a list, got {type(raw).__name__}")
    out: list[tuple[float, float, int]] = []
    for entry in raw:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise PrivacyError(f"accountant history entry must be [noise, sample_rate, steps], got {entry!r}")
        z, q, n = float(entry[0]), float(entry[1]), entry[2]
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        if not (isinstance(n, int) and n >= 1 and z >= 0 and 0 < q <= 1 and math.isfinite(z)):
            raise PrivacyError(f"invalid accountant history entry {entry!r}")
        out.append((z, q, n))
    return out


def compute_epsilon(accountant: IAccountant, delta: float) -> float:
    """Epsilon spent so far at ``delta``; 0 before any step, inf if any step had no noise."""
    if not accountant.history:
        return 0.0
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    if any(z == 0 for z, _, _ in accountant.history):
        return math.inf
    return float(accountant.get_epsilon(delta=delta))


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def rdp_fixed_size_gaussian(noise_multiplier: float, sample_rate: float, order: int) -> float:
    """RDP at integer ``order`` >= 2 of one round: m = ``sample_rate`` * N clients drawn without replacement,
    Gaussian noise ``noise_multiplier * C`` on a sum of updates clipped to C, replace-one relation.

    Wang, Balle & Kasiviswanathan (2019), Theorem 9, for a base mechanism with eps(inf) = inf:
    (1/(a-1)) log(1 + g^2 C(a,2) min(4(e^eps(2) - 1), 2 e^eps(2)) + sum_{j=3..a} 2 g^j C(a,j) e^((j-1) eps(j))),
    where eps(j) = j (2C)^2 / (2 (zC)^2) = 2j / z^2 is the Gaussian mechanism's RDP at sensitivity 2C.
    """
    z, g, a = noise_multiplier, sample_rate, order
    if z <= 0:
        return math.inf

    def eps(j: int) -> float:
        return 2.0 * j / z**2

    if g >= 1.0:
        return eps(a)
    log_g = math.log(g)
    two = 2 * log_g + math.log(math.comb(a, 2)) + min(math.log(4) + eps(2) + math.log(-math.expm1(-eps(2))),
                                                      math.log(2) + eps(2))
    log_sum = _log_add(0.0, two)
    for j in range(3, a + 1):
        log_sum = _log_add(log_sum, math.log(2) + j * log_g + math.log(math.comb(a, j)) + (j - 1) * eps(j))
    return log_sum / (a - 1)


def fixed_size_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of a fixed-size-sampling history (RDP composition, then opacus' conversion)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = [sum(n * rdp_fixed_size_gaussian(z, q, a) for z, q, n in history) for a in FIXED_ORDERS]
    return float(get_privacy_spent(orders=FIXED_ORDERS, rdp=rdp, delta=delta)[0])


class ClientLevelAccountant:
    """Server-side accountant for client-level DP: :meth:`step` once per round, with that round's q."""

    def __init__(self, kind: str = "rdp", sampling: str = "poisson") -> None:
        if sampling not in SAMPLING:
            raise PrivacyError(f"unknown client sampling {sampling!r}; known: {', '.join(SAMPLING)}")
        if sampling == "fixed" and kind != "rdp":
            raise PrivacyError(f"fixed-size client sampling is accounted with RDP only (replace-one bound); "
                               f"privacy.accountant = {kind!r} works with poisson sampling")
        _check_kind(kind)
        self.kind = kind
        self.sampling = sampling

    @cached_property
    def _acc(self) -> IAccountant:
        """The opacus accountant, built on first use: a run that charges nothing never imports opacus."""
        return make_accountant(self.kind)

    def _history(self) -> list[tuple[float, float, int]]:
        return self._acc.history if "_acc" in self.__dict__ else []

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Charge one round: Gaussian noise multiplier ``z`` on a client sample of rate ``q``."""
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise PrivacyError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
        if not 0 < sample_rate <= 1:
            raise PrivacyError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self._acc.step(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate))

    @property
    def rounds(self) -> int:
        """Number of rounds charged so far."""
        return sum(n for _, _, n in self._history())

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The composition history (noise multiplier, sample rate, consecutive steps)."""
        return list(self._history())

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``."""
        if self.sampling == "poisson" or not self._acc.history:
            return compute_epsilon(self._acc, delta)
        if not 0 < delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {delta}")
        return fixed_size_epsilon(self.history, delta)

    def epsilons(self, deltas: Sequence[float]) -> list[float]:
        """Epsilon at each of ``deltas`` (one RDP curve for all of them under Poisson RDP accounting)."""
        if self.kind != "rdp" or self.sampling != "poisson" or not self._acc.history:
            return [self.epsilon(d) for d in deltas]
        if any(z == 0 for z, _, _ in self._acc.history):
            return [math.inf] * len(deltas)
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        orders = self._acc.DEFAULT_ALPHAS
        rdp = sum(compute_rdp(q=q, noise_multiplier=z, steps=n, orders=orders) for z, q, n in self._acc.history)
        return [float(get_privacy_spent(orders=orders, rdp=rdp, delta=d)[0]) for d in deltas]

    def with_noise(self, noise_multiplier: float) -> ClientLevelAccountant:
        """The same rounds and sampling rates charged at another noise multiplier (the empirical audit's
        family of mechanisms: "this run, had its noise been ``noise_multiplier``")."""
        other = ClientLevelAccountant(self.kind, self.sampling)
        other._acc.history = [(float(noise_multiplier), q, n) for _, q, n in self._acc.history]
        return other

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: the accountant kind, the sampling scheme and the history."""
        return {"kind": self.kind, "sampling": self.sampling, "history": history_to_json(self._history())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; kind and sampling scheme must match."""
        if state.get("kind") != self.kind or state.get("sampling", "poisson") != self.sampling:
            raise PrivacyError(f"accountant state is for {state.get('kind')!r} with {state.get('sampling')!r} "
                               f"sampling, this accountant is {self.kind!r} with {self.sampling!r}")
        history = history_from_json(state.get("history"))
        if history or "_acc" in self.__dict__:
            self._acc.history = history


@lru_cache(maxsize=64)  # a config derives it on every load (tuning.apply_target_epsilon): seconds each
def noise_for_epsilon(target_epsilon: float, delta: float, rounds: int, sample_rate: float = 1.0,
                      sampling: str = "poisson", kind: str = "rdp", max_noise: float = 100.0) -> float:
    """The smallest server noise multiplier whose :class:`ClientLevelAccountant` epsilon after ``rounds``
    rounds at rate ``sample_rate`` is at most ``target_epsilon`` (bisection on the accountant itself, so
    client-level (``poisson``) and distributed DP (``fixed``, rate 1: replace-one) are charged as they run)."""
    if not (target_epsilon > 0 and 0 < delta < 1 and rounds >= 1 and 0 < sample_rate <= 1):
        raise PrivacyError(f"cannot derive a noise multiplier from target_epsilon={target_epsilon}, "
                           f"delta={delta}, rounds={rounds}, sample_rate={sample_rate}")

    def epsilon(z: float) -> float:
        acc = ClientLevelAccountant(kind, sampling)
        for _ in range(rounds):
            acc.step(z, sample_rate)
        with warnings.catch_warnings():  # opacus: "optimal order is the largest alpha" at large z, expected
            warnings.simplefilter("ignore", UserWarning)
            return acc.epsilon(delta)

    if epsilon(max_noise) > target_epsilon:
        raise PrivacyError(f"target epsilon {target_epsilon:g} is unreachable over {rounds} round(s) even at noise "
                           f"multiplier {max_noise:g}: raise the target or train fewer rounds")
    lo, hi = 0.0, max_noise
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if epsilon(mid) <= target_epsilon else (mid, hi)
    return hi
