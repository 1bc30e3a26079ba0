"""Gradient-inversion attacks and leakage metrics (the audit that runs them: :mod:`fedpeft.audit`).

An attack is ``run(obs: Observation, **params) -> AttackResult``, registered by name in
:data:`ATTACKS`; :func:`run_attack` runs one by name. Importing this package registers them all.
``smashed`` takes a :class:`fedpeft.attacks.smashed.SplitObservation` (split-learning activations)
instead and raises :class:`NotApplicable` on adapter updates.
"""

from fedpeft.attacks import (  # noqa: F401
    grad_match,
    label_and_canary,
    sign_span,
    smashed,
    span,
    span_decode,
    subspace_opt,
    unroll,
)
from fedpeft.attacks.observation import ATTACKS, AttackResult, NotApplicable, Observation, register_attack, run_attack

__all__ = ["ATTACKS", "AttackResult", "NotApplicable", "Observation", "register_attack", "run_attack"]
