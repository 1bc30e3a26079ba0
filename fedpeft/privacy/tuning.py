"""DP-friendly training defaults and the suggestions printed when DP is on.

DP-SGD with the non-DP training settings loses most of its utility: per-example clipping shrinks every gradient to
at most the clip norm and the noise is added on top, so small batches and short steps do not leave the noise
behind. When local DP-SGD is on (``privacy.mode`` local or both) and ``privacy.dp_defaults`` is true, each group of
:data:`DP_DEFAULTS` whose keys the scenario leaves unset takes its DP values (``fedpeft.config.from_dict`` calls
:func:`apply_dp_defaults` on the raw scenario, so ``fedpeft config`` and the run's config.toml show the values
used). A group is all or nothing: its values are measured together (a rate of 2e-2 at the non-DP batch of 16 is
unstable, a batch of 64 with the non-DP 15 steps quadruples the work), so setting any of its keys leaves the
group to the scenario. Only measured defaults are here (:data:`EVIDENCE`).

Under client-level and distributed DP, ``privacy.target_epsilon`` sets the server noise multiplier the run's
accountant needs for that epsilon (:func:`apply_target_epsilon`, called by ``from_dict`` too), and :func:`noise_hint`
says before the first round how large the noise on each round's released mean is against the clip norm, the most a
mean of clipped updates can move.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedpeft.config import Config

log = logging.getLogger(__name__)
DP_MODES = ("local", "both")
#: the modes whose ``target_epsilon`` sets ``server_noise_multiplier`` (under ``both`` it is DP-SGD's target)
SERVER_NOISE_MODES = ("client", "distributed")
Key = tuple[str, str]


@dataclass(frozen=True)
class DPDefault:
    """Values that local DP-SGD takes together when the scenario sets none of their keys nor of ``also``."""

    values: dict[Key, Any]
    also: tuple[Key, ...] = ()  # keys whose presence means the user chose this group's shape

    def blocked_by(self, raw: dict[str, Any]) -> bool:
        """True when the scenario sets any key of the group (then the group is left as the scenario has it)."""
        return any(isinstance(raw.get(section), dict) and key in raw[section]
                   for section, key in (*self.values, *self.also))


#: the groups local DP-SGD takes when the scenario leaves them unset, tried in order (a later group sees what an
#: earlier one set); benchmarks/RESULTS.md, "Local DP-SGD at epsilon 8: larger Poisson batches"
DP_DEFAULTS: tuple[DPDefault, ...] = (
    # fewer, larger noisy steps: four Poisson batches of 64 a round (256 examples; the non-DP default: 240), run as
    # chunks of 16 (the non-DP default's memory), at twice the DP rate below
    DPDefault({("train", "lr"): 2e-2, ("train", "batch_size"): 64, ("train", "local_steps"): 4,
               ("privacy", "physical_batch_size"): 16}, also=(("train", "local_epochs"),)),
    # the scenario chose its own batch or steps: the rate measured at the non-DP batch of 16 x 15 steps
    DPDefault({("train", "lr"): 1e-2}),
)
EVIDENCE = ("embedded default at epsilon 8: 0.948 / 0.947 / 0.932 (seeds 0-2) at lr 2e-2, batch 64, 4 steps a round, "
            "against 0.942 / 0.932 / 0.899 without DP; 0.870 at the non-DP batch 16 x 15 steps and lr 1e-2")


def apply_dp_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a scenario as read from TOML, overrides applied) with the DP defaults of its unset groups when
    local DP-SGD is on; ``raw`` itself is not changed. Malformed sections are left for validation to name."""
    privacy = raw.get("privacy", {})
    if not isinstance(privacy, dict) or privacy.get("mode") not in DP_MODES or privacy.get("dp_defaults", True) \
            is not True:
        return raw
    out = copy.deepcopy(raw)
    for group in DP_DEFAULTS:
        if group.blocked_by(out):
            continue
        for (section, key), value in group.values.items():
            table = out.setdefault(section, {})
            if isinstance(table, dict):
                table[key] = value
    return out


def apply_target_epsilon(cfg: Config) -> Config:
    """``cfg`` with, under client-level or distributed DP and ``privacy.target_epsilon > 0``, the smallest
    ``server_noise_multiplier`` whose accounted epsilon after the run's rounds is at most the target, accounted as
    the server charges the run: client-level DP at the sampling rate m / N with ``client_sampling`` and
    ``accountant``; distributed DP at rate 1, replace-one (``fedpeft.privacy.server_dp``). Derived from the config
    alone, so the server, every client and a resumed run compute the same value; a value given for
    ``server_noise_multiplier`` is replaced. Other modes: ``cfg`` unchanged."""
    p = cfg.privacy
    if p.mode not in SERVER_NOISE_MODES or not p.target_epsilon > 0:
        return cfg
    from fedpeft.privacy.accounting import noise_for_epsilon  # opacus: only where it is needed (CLI start-up)

    rounds = cfg.federation.rounds
    if p.mode == "client":
        rate = (cfg.federation.clients_per_round or cfg.data.num_clients) / cfg.data.num_clients
        z = noise_for_epsilon(p.target_epsilon, p.delta, rounds, min(rate, 1.0), p.client_sampling, p.accountant)
    else:
        z = noise_for_epsilon(p.target_epsilon, p.delta, rounds, 1.0, "fixed", "rdp")
    if z != p.server_noise_multiplier:
        log.info("%s DP: target epsilon %g at delta %g over %d round(s) takes server noise multiplier %.4g",
                 p.mode, p.target_epsilon, p.delta, rounds, z)
    return dataclasses.replace(cfg, privacy=dataclasses.replace(p, server_noise_multiplier=z))


def suggestions(cfg: Config) -> list[str]:
    """The measured DP setting as one line when a DP-SGD run departs from it (empty without local DP)."""
    if cfg.privacy.mode not in DP_MODES:
        return []
    best = DP_DEFAULTS[0].values
    used = {(s, k): getattr(getattr(cfg, s), k) for s, k in best}
    if used == best:
        return []
    now = ", ".join(f"{s}.{k} = {_toml(v)}" for (s, k), v in used.items())
    sets = " ".join(f"--set {s}.{k}={_toml(v)}" for (s, k), v in best.items())
    return [f"local DP-SGD with {now}: try {sets} ({EVIDENCE}; docs/privacy.md, 'DP-friendly defaults')"]


#: the noise norm (in clip norms) above which :func:`noise_hint` warns: at 0.65 C per round the best distributed-DP
#: run measured at 100 clients per round still ended 6.2 points below its clear run (docs/privacy.md)
NOISE_WARNING = 0.5


def noise_hint(cfg: Config, elements: int) -> tuple[bool, str] | None:
    """Under client-level or distributed DP: (warn, line) with the expected L2 norm of the noise on one round's
    released mean in units of the clip norm C, for ``elements`` summed adapter elements and all sampled clients
    in the sum; ``warn`` when it is at least :data:`NOISE_WARNING`. None for other modes (or a distributed field
    that cannot be built: the run's own checks name why)."""
    from fedpeft.errors import PrivacyError

    p = cfg.privacy
    m = cfg.federation.clients_per_round or cfg.data.num_clients
    if p.mode == "distributed":
        from fedpeft import protocol  # the clients' own field (flwr: imported only where a run starts)

        try:
            ddp = protocol.secure_field(p, elements, m).ddp
        except PrivacyError:
            return None
        assert ddp is not None  # distributed mode always builds one
        summed = ddp.dim  # after secagg_keep's shared subspace
        ratio = ddp.mean_noise_std(m) * math.sqrt(summed) / p.clip_norm
    elif p.mode in ("client", "both") and p.clip_norm > 0:
        summed = elements
        ratio = p.server_noise_multiplier * math.sqrt(summed) / m
    else:
        return None
    line = (f"{p.mode} DP: the noise on each round's mean has an expected norm of {ratio:.3g} x the clip norm "
            f"({summed} summed elements, z = {p.server_noise_multiplier:g}, {m} clients per round), while the "
            f"mean of the clipped updates has norm at most 1 x and usually a fraction of it")
    if ratio < NOISE_WARNING:
        return False, line
    return True, (f"{line}: expect the noise to outweigh what the clients learn. It falls as 1 / clients per round "
                  f"and as sqrt(summed elements): sample more clients per round, or sum fewer elements "
                  f"(adapter.r = 1 with federation.lora_aggregation = 'freeze_a', adapter.target_modules on a few "
                  f"modules; docs/privacy.md, 'Utility at 100 clients per round')")


def _toml(value: Any) -> str:
    """A value as ``--set`` takes it (strings quoted)."""
    return f'"{value}"' if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)
