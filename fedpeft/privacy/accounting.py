"""Privacy accounting with amplification by sampling, on top of ``opacus.accountants``.

:class:`ClientLevelAccountant` is the server's accountant for client-level DP: one sampled-Gaussian
step per round with sampling rate ``q = clients sampled / total clients``. Unlike Flower's built-in
fixed-clipping accountant (which assumes every client every round, q = 1: epsilon ~ 96 after 100 rounds
at z = 1, delta = 1e-5) this accounts for the amplification that client sampling gives
(q = 0.1: epsilon ~ 7.9 with RDP).

The analysis assumes Poisson sampling of clients (each independently with probability q). Sampling a
fixed number m of N clients without replacement is the usual approximation (as in DP-FedAvg); for a
strict guarantee under fixed-size sampling the server should sample clients with Poisson sampling.

The state is the composition history ``[[noise_multiplier, sample_rate, steps], ...]`` as plain JSON,
so a resumed run continues the exact same epsilon curve.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

from fedpeft.errors import PrivacyError

log = logging.getLogger(__name__)

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}


def make_accountant(kind: str) -> IAccountant:
    """A fresh opacus accountant of the given kind ("rdp" or "prv")."""
    try:
        return ACCOUNTANTS[kind]()
    except KeyError:
        raise PrivacyError(f"unknown accountant {kind!r}; known: {', '.join(sorted(ACCOUNTANTS))}") from None


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


class ClientLevelAccountant:
    """Server-side accountant for client-level DP: :meth:`step` once per round."""

    def __init__(self, kind: str = "rdp") -> None:
        self.kind = kind
        self._acc = make_accountant(kind)

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
        return sum(n for _, _, n in self._acc.history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The composition history (noise multiplier, sample rate, consecutive steps)."""
        return list(self._acc.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``."""
        return compute_epsilon(self._acc, delta)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: the accountant kind and its history."""
        return {"kind": self.kind, "history": history_to_json(self._acc.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the kind must match."""
        if state.get("kind") != self.kind:
            raise PrivacyError(f"accountant state is for {state.get('kind')!r}, this accountant is {self.kind!r}")
        self._acc.history = history_from_json(state.get("history"))
