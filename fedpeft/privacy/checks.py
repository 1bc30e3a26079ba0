"""Up-front validation of privacy settings: impossible combinations fail before any training starts."""

from __future__ import annotations

import logging
import math

from fedpeft.config import PrivacySection
from fedpeft.errors import PrivacyError
from fedpeft.privacy.client_dp import COUNT_NOISE_FRACTION, update_noise_multiplier

log = logging.getLogger(__name__)
#: Poisson sampling: refuse a plan whose rounds are empty more often than this
EMPTY_ROUND_LIMIT = 0.25


def check_delta(delta: float, n: int, what: str) -> None:
    """Refuse a delta of 0 or at least 1/n for the ``n`` units (clients or records) ``what`` names."""
    if not delta > 0:
        raise PrivacyError("privacy.delta must be > 0 when DP is on (delta = 0 makes epsilon infinite)")
    if delta >= 1.0 / n:
        raise PrivacyError(
            f"privacy.delta = {delta:g} is >= 1/N = 1/{n} ({what}): a mechanism that publishes one random "
            f"{'client' if 'client' in what else 'record'} in full satisfies such a delta. Use delta well "
            f"below {1.0 / n:.3g} (e.g. {min(1e-5, 0.1 / n):.1g}).")


def check_privacy(cfg: PrivacySection, num_clients: int, clients_per_round: int, rounds: int,
                  min_local_examples: int, *, batch_size: int | None = None,
                  local_steps: int | None = None) -> None:
    """Raise :class:`PrivacyError` if the privacy settings cannot be met.

    ``clients_per_round = 0`` means all clients. ``min_local_examples`` is the smallest client
    dataset (record-level DP-SGD's delta must be below 1 / that). ``batch_size`` and ``local_steps``
    (optimizer steps per round) enable the reachability check of ``target_epsilon``.
    """
    if cfg.mode == "none":
        return
    if num_clients < 1 or rounds < 1:
        raise PrivacyError(f"need num_clients >= 1 and rounds >= 1, got {num_clients}, {rounds}")
    m = clients_per_round or num_clients
    if not 1 <= m <= num_clients:
        raise PrivacyError(f"clients_per_round = {clients_per_round} must be between 1 and num_clients = "
                           f"{num_clients}")
    if cfg.accountant not in ("rdp", "prv"):
        raise PrivacyError(f"privacy.accountant = {cfg.accountant!r}: choose 'rdp' or 'prv'")
    for key in ("delta", "noise_multiplier", "max_grad_norm", "target_epsilon", "clip_norm",
                "server_noise_multiplier", "clip_lr"):
        if not math.isfinite(getattr(cfg, key)):
            raise PrivacyError(f"privacy.{key} = {getattr(cfg, key)!r} must be a finite number")

    if cfg.mode in ("local", "both"):
        if min_local_examples < 1:
            raise PrivacyError(f"every client needs at least one training example for DP-SGD, smallest has "
                               f"{min_local_examples}")
        if not cfg.max_grad_norm > 0:
            raise PrivacyError("privacy.max_grad_norm must be > 0 for DP-SGD (the per-example clip bounds "
                               "the sensitivity)")
        check_delta(cfg.delta, min_local_examples, "smallest client dataset, record-level DP")
        if cfg.target_epsilon > 0:
            if batch_size is not None and local_steps is not None:
                from fedpeft.privacy.dpsgd import derive_noise_multiplier

                q = min(1.0, batch_size / min_local_examples)
                z = derive_noise_multiplier(cfg.target_epsilon, cfg.delta, q, rounds * local_steps, cfg.accountant)
                log.info("DP-SGD target epsilon %g needs noise multiplier %.3g (q=%.3g, %d steps)",
                         cfg.target_epsilon, z, q, rounds * local_steps)
        elif not cfg.noise_multiplier > 0:
            raise PrivacyError("privacy.noise_multiplier = 0 with DP-SGD on gives no privacy (epsilon = "
                               "infinity): set privacy.noise_multiplier > 0 or privacy.target_epsilon > 0")

    if cfg.mode == "distributed":
        if not (cfg.clip_norm > 0 and cfg.server_noise_multiplier > 0):
            raise PrivacyError("privacy.mode = 'distributed' needs privacy.clip_norm > 0 (the sensitivity) and "
                               "privacy.server_noise_multiplier > 0 (the summed noise; 0 gives epsilon = infinity)")
        check_delta(cfg.delta, num_clients, "number of clients, client-level (distributed) DP")

    if cfg.mode in ("client", "both"):
        if cfg.client_sampling == "fixed" and cfg.accountant != "rdp":
            raise PrivacyError("privacy.client_sampling = 'fixed' is accounted with RDP only (the replace-one bound "
                               f"for sampling without replacement): set privacy.accountant = 'rdp', not "
                               f"{cfg.accountant!r}, or privacy.client_sampling = 'poisson'")
        if cfg.client_sampling == "poisson" and (1 - m / num_clients) ** num_clients > EMPTY_ROUND_LIMIT:
            raise PrivacyError(
                f"federation.clients_per_round = {m} of {num_clients} clients: with Poisson sampling "
                f"{(1 - m / num_clients) ** num_clients:.0%} of the rounds would sample no client (each round still "
                f"spends privacy). Raise federation.clients_per_round to at least 2, or set "
                f"privacy.client_sampling = 'fixed'")
        if not cfg.clip_norm > 0:
            raise PrivacyError("privacy.clip_norm must be > 0 for client-level DP (it bounds each update)")
        if not cfg.server_noise_multiplier > 0:
            raise PrivacyError("privacy.server_noise_multiplier = 0 with client-level DP on gives no privacy "
                               "(epsilon = infinity): set it > 0")
        check_delta(cfg.delta, num_clients, "number of clients, client-level DP")
        if cfg.adaptive_clip:
            if not 0 < cfg.target_quantile < 1:
                raise PrivacyError(f"privacy.target_quantile = {cfg.target_quantile} must be strictly between "
                                   "0 and 1 for adaptive clipping")
            if not cfg.clip_lr > 0:
                raise PrivacyError("privacy.clip_lr must be > 0 for adaptive clipping")
            update_noise_multiplier(cfg.server_noise_multiplier, cfg.clip_count_noise or COUNT_NOISE_FRACTION * m)
