"""Client-level DP on the server (DP-FedAvg): sample clients as the accountant assumes, bound each decoded
update, average with the round's expected size as a fixed denominator, add Gaussian noise, adapt the clip
norm, and charge each round's real sampling rate to the accountant. Flower-free: the server loop and the
empirical epsilon audit run this same object.

The order with compression is the one documented in :mod:`fedpeft.privacy.client_dp`: the server
clips every *decoded* update to the round's clip norm, so the sensitivity bound holds for what was
actually received whatever the codec did (a ternary vector can have a larger norm than its source).

Noise and resume. Outside simulations the noise generator is seeded from the operating system's entropy, never
from ``run.seed`` (which ``config.toml`` publishes: anyone holding it could regenerate and subtract the noise).
Every charge is appended to the run's privacy ledger (``privacy-ledger.jsonl``, fsynced before the release
leaves the server), and a checkpoint records how many entries its accountant holds. A deployment that resumes
draws fresh noise and charges the ledger's entries after the checkpoint: rounds released before a crash and
released again by the resumed run are both accounted (reusing their noise would let anyone holding both
releases subtract it). A simulation seeds its noise from ``run.seed`` for reproducible experiments: its re-run
rounds are the same releases, so its resume continues the same noise and truncates the ledger instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.config import Config
from fedpeft.errors import PrivacyError
from fedpeft.models import AdapterState
from fedpeft.privacy.accounting import ClientLevelAccountant
from fedpeft.privacy.client_dp import AdaptiveClipper, add_server_noise, clip_to_norm, dp_average
from fedpeft.privacy.distributed import TAIL_PROBABILITY
from fedpeft.privacy.sampling import ClientSample, sample_clients

LEDGER_FILE = "privacy-ledger.jsonl"
log = logging.getLogger(__name__)


class ServerPrivacy:
    """Server-side client-level DP for one run (inactive unless privacy.mode is 'client' or 'both').

    ``seeded``: draw the noise from ``run.seed`` (simulations and experiments only; see the module docstring);
    ``ledger``: the file each charge is appended to (None: not kept)."""

    def __init__(self, cfg: Config, seeded: bool = False, ledger: Path | None = None) -> None:
        p = cfg.privacy
        self.cfg = p
        self.active = p.mode in ("client", "both")
        self.planned = cfg.federation.clients_per_round or cfg.data.num_clients
        #: the scheme the server samples with: the configured one under client-level DP, else a fixed size
        self.sampling = p.client_sampling if self.active else "fixed"
        self.expected = float(self.planned)  # this round's expected size (the fixed denominator)
        self.sample_rate = self.planned / cfg.data.num_clients  # this round's rate (set by sample())
        #: distributed DP (noise added by the clients inside SecAgg+): charged per round by charge_distributed
        self.distributed = p.mode == "distributed"
        self.accountant = ClientLevelAccountant(p.accountant, self.sampling if self.active or self.distributed
                                                else "poisson")
        #: a test-only hook: the noise actually added is divided by this (the epsilon audit must catch it)
        self.noise_divisor = 1.0
        self.clipper = (AdaptiveClipper(p.clip_norm, expected_clients=self.planned,
                                        noise_multiplier=p.server_noise_multiplier, target_quantile=p.target_quantile,
                                        lr=p.clip_lr, count_noise_std=p.clip_count_noise or None)
                        if self.active and p.adaptive_clip else None)
        self.seeded = seeded
        self.generator = torch.Generator().manual_seed(cfg.run.seed * 7919 + 17 if seeded else secrets.randbits(63))
        self.ledger = ledger if self.active or self.distributed else None

    @property
    def clip_norm(self) -> float:
        """The clip norm clients use this round."""
        return self.clipper.clip_norm if self.clipper else self.cfg.clip_norm

    @property
    def update_noise_multiplier(self) -> float:
        """Noise multiplier on the update (less than the total when the clip count shares the budget)."""
        return self.clipper.update_noise_multiplier if self.clipper else self.cfg.server_noise_multiplier

    def sample(self, rng: np.random.Generator, eligible: list[int]) -> ClientSample:
        """This round's clients from the ``eligible`` ones (sorted ids), by the scheme the accountant assumes;
        remembers the rate to charge and the expected size to divide by."""
        if self.active and self.cfg.delta >= 1.0 / len(eligible):
            raise PrivacyError(f"privacy.delta = {self.cfg.delta:g} is >= 1/N for the N = {len(eligible)} eligible "
                               f"clients of this round: lower privacy.delta below {1.0 / len(eligible):.3g}")
        drawn = sample_clients(rng, eligible, self.planned, self.sampling)
        self.sample_rate, self.expected = drawn.rate, drawn.expected
        return drawn

    def _noise(self, mean: AdapterState, c: float) -> AdapterState:
        """Gaussian noise of std z*C/E on the mean, E the round's expected size."""
        return add_server_noise(mean, c, self.update_noise_multiplier / self.noise_divisor, self.expected,
                                self.generator)

    def aggregate(self, deltas: Iterable[AdapterState], like: AdapterState) -> AdapterState:
        """Clip each decoded update, divide the sum by the round's expected size E, add noise std z*C/E
        (``deltas`` is read once, one update at a time; with none the release is the noise alone, shaped like
        ``like``)."""
        c = self.clip_norm
        return self._noise(dp_average((clip_to_norm(d, c) for d in deltas), self.expected, like), c)

    def release_secure(self, secure_mean: AdapterState, n: int) -> AdapterState:
        """DP-FedAvg on a SecAgg+ sum of ``n`` uniformly weighted updates the clients clipped already:
        sum / E (the round's expected size) + noise std z*C/E."""
        return self._noise({k: v * (n / self.expected) for k, v in secure_mean.items()}, self.clip_norm)

    def end_round(self, indicators: list[float]) -> dict[str, float]:
        """Charge the round's real sampling rate to the accountant, adapt the clip norm; returns the round's
        privacy metrics."""
        used_clip = self.clip_norm
        self._charge(self.cfg.server_noise_multiplier, self.sample_rate)
        if self.clipper:
            self.clipper.update(indicators, self.generator)
        return {"epsilon_client": self.accountant.epsilon(self.cfg.delta), "clip_norm": used_clip,
                "sample_rate": self.sample_rate}

    def charge_distributed(self, noise_multiplier: float) -> dict[str, float]:
        """Distributed DP: charge one round at the weakest released sum's noise multiplier, sampling rate 1
        (the server picks and sees who is in the sum: no amplification against it), replace-one relation."""
        self._charge(noise_multiplier, 1.0)
        eps = self.accountant.epsilon(self.cfg.delta)
        tail = self.accountant.rounds * (1 + math.exp(min(eps, 700.0))) * TAIL_PROBABILITY  # SecAgg+ clipped a share
        return {"epsilon_distributed": eps, "delta_distributed": self.cfg.delta + tail,
                "noise_multiplier_accounted": noise_multiplier}

    def _charge(self, noise_multiplier: float, sample_rate: float) -> None:
        """One release to the accountant, and to the ledger on disk before the release leaves the server."""
        self.accountant.step(noise_multiplier, sample_rate)
        if self.ledger is not None:
            with open(self.ledger, "a") as f:
                f.write(json.dumps({"noise_multiplier": noise_multiplier, "sample_rate": sample_rate}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def _ledger_lines(self) -> list[str]:
        """The ledger's complete entries (a partial last line, cut by a crash, is not an entry)."""
        if self.ledger is None or not self.ledger.is_file():
            return []
        return [line for line in self.ledger.read_text().split("\n")[:-1] if line]

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """JSON state (with the number of ledger entries the accountant holds) and tensor state (the noise
        generator) for the checkpoint."""
        meta = {"accountant": self.accountant.state_dict(),
                "clipper": self.clipper.state_dict() if self.clipper else None,
                "ledger_entries": len(self._ledger_lines())}
        return meta, {"generator": self.generator.get_state()}

    def restore(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Continue from :meth:`state`: the same epsilon curve and clip norm; seeded, the same noise stream (the
        ledger cut back to the checkpoint); otherwise fresh noise, and every release the ledger holds after the
        checkpoint charged as well."""
        self.accountant.load_state_dict(meta["accountant"])
        if self.clipper and meta.get("clipper"):
            self.clipper.load_state_dict(meta["clipper"])
        lines, held = self._ledger_lines(), int(meta.get("ledger_entries", 0))
        if self.seeded:
            self.generator.set_state(tensors["generator"])
            if self.ledger is not None and self.ledger.is_file():
                self.ledger.write_text("".join(line + "\n" for line in lines[:held]))
            return
        for line in lines[held:]:
            entry = json.loads(line)
            self.accountant.step(float(entry["noise_multiplier"]), float(entry["sample_rate"]))
        if lines[held:]:
            log.warning("charged %d release(s) made after the checkpoint to the accountant (the resumed rounds "
                        "release again, with fresh noise)", len(lines) - held)
