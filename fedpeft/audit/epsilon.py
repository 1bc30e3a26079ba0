"""Empirical epsilon lower bounds: the one-run audit of Steinke, Nasr & Jagielski (2023), for both DP levels.

K canaries each join by an independent fair coin; each canary's contribution is C times a standard basis
vector of R^K (shuffled), a white-box "gradient canary": the directions are exactly orthogonal, so no
canary's score is disturbed by another's inclusion. Client canaries stream through the mechanism one at a
time (memory O(K): 131,072 of them take about a minute); canary records form one Opacus batch (memory about
K^2 x 4 bytes).

- **Client level** (:func:`audit_client_level`): the canaries are clients whose update is their direction.
  They go through the server's own mechanism, :class:`fedpeft.privacy.server_dp.ServerPrivacy`: Poisson
  (or fixed-size) sampling of the eligible clients, clipping, the fixed denominator, the noise and the
  accountant's epsilon. A canary's score is the summed inner product of the released noisy means with its
  direction.
- **Example level** (:func:`audit_local_dpsgd`): the canaries are training records of one client whose
  per-example gradient is their direction (a linear model with loss ``-w . x`` and ``|x| = 2C``, so Opacus
  clips every one to C). They go through :class:`fedpeft.privacy.dpsgd.LocalDP` exactly as a client trains:
  Opacus' per-example clipping, Poisson batches, noise, the accountant. A canary's score is the trained
  weight on its direction.

:func:`fedpeft.privacy.epsilon_audit.epsilon_lower_bound` tests the scores and the coins against the
accountant's whole privacy profile and gives an epsilon lower bound at 95% confidence. A lower bound above
the accountant's epsilon is a privacy bug.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpeft.config import Config
from fedpeft.errors import ConfigError
from fedpeft.privacy.accounting import ClientLevelAccountant
from fedpeft.privacy.dpsgd import LocalDP
from fedpeft.privacy.epsilon_audit import (
    PROFILE_DELTAS,
    AuditBound,
    NoiseFamily,
    epsilon_lower_bound,
    gaussian_profile,
)
from fedpeft.privacy.server_dp import ServerPrivacy

log = logging.getLogger(__name__)

#: default canaries: client canaries stream through the mechanism (memory O(K)); canary records are one
#: Opacus batch (memory about K^2 x 4 bytes)
CLIENT_CANARIES = 131072
RECORD_CANARIES = 16384


@dataclass(frozen=True)
class EpsilonAudit:
    """The audit's result: the claimed (accountant) epsilon, the lower bound, and the verdict."""

    level: str  # "client" (client-level DP) or "example" (local DP-SGD)
    claimed_epsilon: float
    bound: AuditBound
    steps: int  # rounds (client level) or DP-SGD steps (example level)
    sample_rate: float
    noise_multiplier: float

    @property
    def verdict(self) -> str:
        """``fail``: the bound exceeds the claim (a privacy bug); ``pass`` otherwise."""
        return "fail" if self.bound.epsilon_lower_bound > self.claimed_epsilon else "pass"


def audit_client_level(cfg: Config, canaries: int = 1000, seed: int = 0, noise_divisor: float = 1.0,
                       on_round: Callable[[int, int], None] | None = None) -> EpsilonAudit:
    """Run ``cfg``'s client-level DP for ``federation.rounds`` rounds over ``canaries`` canary clients.

    ``clients_per_round`` of the scenario is the planned round size (0: all); ``noise_divisor`` is a
    test-only fault (the noise actually added is divided by it) that the audit must catch.
    """
    if cfg.privacy.mode not in ("client", "both"):
        raise ConfigError("the epsilon audit checks client-level DP: set privacy.mode = 'client' or 'both'")
    included, axis = _draw(canaries, seed)
    population = int(included.sum())
    planned = cfg.federation.clients_per_round or population  # 0: every canary in every round
    run = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_clients=max(population, planned)),
                              federation=dataclasses.replace(cfg.federation,
                                                             clients_per_round=min(planned, population)))
    server = ServerPrivacy(run, seeded=True)  # an experiment: reproducible noise
    server.noise_divisor = noise_divisor
    c = server.clip_norm
    members = [int(i) for i in np.flatnonzero(included)]
    scores = torch.zeros(canaries, dtype=torch.float64)
    sampler = np.random.default_rng(seed + 1)
    for rnd in range(cfg.federation.rounds):
        sample = server.sample(sampler, members)
        updates = ({"update": _basis(canaries, int(axis[i]), c)} for i in sample.clients)  # one at a time
        noisy = server.aggregate(updates, {"update": torch.zeros(canaries)})
        scores += noisy["update"][axis].double()
        server.end_round([])
        if on_round is not None:
            on_round(rnd + 1, cfg.federation.rounds)
    return _result("client", scores.numpy(), included, server.accountant, cfg.privacy.delta,
                   cfg.federation.rounds, server.sample_rate, cfg.privacy.server_noise_multiplier)


def audit_local_dpsgd(cfg: Config, canaries: int = 1000, steps: int = 1, batch_size: int = 0, seed: int = 0,
                      noise_divisor: float = 1.0, on_step: Callable[[int, int], None] | None = None) -> EpsilonAudit:
    """Train on ``canaries`` coin-included canary records with ``cfg``'s local DP-SGD for ``steps`` steps.

    ``batch_size`` is the expected Poisson batch (0: every record every step, the strongest audit);
    ``noise_divisor`` is a test-only fault (the noise actually added is divided by it, the accountant still
    charges the configured noise) that the audit must catch.
    """
    if cfg.privacy.mode not in ("local", "both"):
        raise ConfigError("the example-level epsilon audit checks local DP-SGD: set privacy.mode = 'local' or 'both'")
    if steps < 1:
        raise ConfigError(f"the epsilon audit needs at least 1 step, got {steps}")
    included, axis = _draw(canaries, seed)
    members = torch.from_numpy(np.flatnonzero(included))
    c = cfg.privacy.max_grad_norm
    records = torch.zeros(len(members), canaries)
    records[torch.arange(len(members)), axis[members]] = 2.0 * c  # |x| = 2C: every gradient is clipped to C
    with warnings.catch_warnings():  # the audit seeds its noise on purpose: it must be reproducible
        warnings.simplefilter("ignore", UserWarning)
        ldp = LocalDP(cfg.privacy, dataset_size=len(members), batch_size=batch_size or len(members),
                      total_steps=steps, seed=seed + 1)
    ldp.noise_divisor = noise_divisor
    model = nn.Linear(canaries, 1, bias=False)
    nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    _, dp_optimizer, loader = ldp.make_private(model, optimizer, DataLoader(TensorDataset(records)), steps=steps)
    try:
        for step, batch in enumerate(loader):
            dp_optimizer.zero_grad()
            if batch is None:
                ldp.empty_step(dp_optimizer)
            else:
                x = batch[0].requires_grad_()  # (Opacus' full backward hook wants an input that needs grad)
                (-model(x).mean()).backward()  # per-example gradient -x, clipped to C
                dp_optimizer.step()
            if on_step is not None:
                on_step(step + 1, steps)
    finally:
        ldp.release()
    scores = model.weight.detach()[0, axis].double().numpy()
    accountant = ClientLevelAccountant(cfg.privacy.accountant)
    accountant.load_state_dict({"kind": cfg.privacy.accountant, "sampling": "poisson",
                                "history": ldp.state_dict()["history"]})
    return _result("example", scores, included, accountant, cfg.privacy.delta, steps, ldp.sample_rate,
                   ldp.noise_multiplier)


def _result(level: str, scores: np.ndarray, included: np.ndarray, accountant: ClientLevelAccountant,
            delta: float, steps: int, sample_rate: float, noise: float) -> EpsilonAudit:
    """The lower bound from the scores, tested against the accountant's profile, beside its epsilon."""
    claimed = accountant.epsilon(delta)
    family = _family(accountant, delta)
    bound = epsilon_lower_bound(scores, included, family)
    log.info("%s-level epsilon audit: claimed %.3f, lower bound %.3f (%d of %d guesses right; noise multiplier "
             "< %.3g)", level, claimed, bound.epsilon_lower_bound, bound.correct, bound.guesses, bound.noise_bound)
    return EpsilonAudit(level, claimed, bound, steps, sample_rate, noise)


def _family(accountant: ClientLevelAccountant, delta: float) -> NoiseFamily:
    """The run's mechanisms by noise multiplier: without subsampling (q = 1 in every step, add/remove) the
    composition of T Gaussian mechanisms is exactly sqrt(T)/s-Gaussian-DP; otherwise the accountant's RDP
    profile, read at :data:`PROFILE_DELTAS` (opacus' warning that a tiny noise wants larger RDP orders is
    expected across the family and silenced)."""
    history = accountant.history
    deltas = sorted({*PROFILE_DELTAS, delta})

    def epsilons(noise: float, at: Sequence[float]) -> list[float]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return accountant.with_noise(noise).epsilons(at)

    if accountant.sampling == "poisson" and all(q >= 1.0 for _, q, _ in history):
        steps = sum(n for _, _, n in history)
        return NoiseFamily(lambda s: gaussian_profile(math.sqrt(steps) / s), lambda s: epsilons(s, [delta])[0])
    return NoiseFamily(lambda s: list(zip(epsilons(s, deltas), deltas, strict=True)),
                       lambda s: epsilons(s, [delta])[0])


def _draw(canaries: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Each canary's fair inclusion coin, and the basis vector (a permutation of R^K's axes) that is its
    direction: canary i contributes C times the basis vector ``axis[i]``."""
    if canaries < 20:
        raise ConfigError(f"the epsilon audit needs at least 20 canaries, got {canaries}")
    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5
    return included, torch.from_numpy(rng.permutation(canaries))


def _basis(dim: int, index: int, scale: float) -> torch.Tensor:
    """``scale`` times the ``index``-th standard basis vector of R^dim."""
    v = torch.zeros(dim)
    v[index] = scale
    return v


COLUMNS = ["level", "claimed_epsilon", "epsilon_lower_bound", "verdict", "noise_bound", "canaries", "guesses",
           "correct", "steps", "sample_rate", "noise_multiplier", "delta"]


def write_report(results: list[EpsilonAudit], cfg: Config, out: Path) -> None:
    """``audit.md`` and ``audit.csv`` in ``out``: each level's lower bound beside the accountant's epsilon."""
    from fedpeft.report import markdown_table

    rows = [[r.level, r.claimed_epsilon, r.bound.epsilon_lower_bound, r.verdict, r.bound.noise_bound,
             r.bound.canaries, r.bound.guesses, r.bound.correct, r.steps, r.sample_rate, r.noise_multiplier,
             cfg.privacy.delta] for r in results]
    with open(out / "audit.csv", "w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *rows])
    where = {"client": f"client-level DP as `{cfg.run.name}` runs it ({cfg.privacy.client_sampling} sampling, "
                       f"clip {cfg.privacy.clip_norm:g}; steps = rounds)",
             "example": f"local DP-SGD as `{cfg.run.name}`'s clients run it (per-example clip "
                        f"{cfg.privacy.max_grad_norm:g}; steps = DP-SGD steps)"}
    text = ["# Empirical epsilon audit (one run, Steinke, Nasr & Jagielski 2023)\n",
            *(f"- **{r.level}**: {where[r.level]}, {r.bound.canaries} canaries, each included by a fair coin."
              for r in results),
            "\nThe guesses are tested against the accountant's whole privacy profile at 95% confidence. "
            "`noise_bound`: the noise multiplier actually added is below it; `epsilon_lower_bound` is the "
            "accountant's epsilon at that noise.\n",
            markdown_table(COLUMNS, rows),
            "\n**fail** means the lower bound exceeds the accountant's epsilon: a privacy bug. **pass** means no "
            "violation was found. With 131,072 client canaries or 16,384 canary records in one round or step the "
            "bound reaches about half of a correct claim of epsilon 1-4 (benchmarks/RESULTS.md); it is not "
            "evidence that a claim is tight.\n"]
    (out / "audit.md").write_text("\n".join(text))
