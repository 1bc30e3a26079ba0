"""Differential privacy for fedpeft (the only package that imports ``opacus``; never imports ``flwr``).

- :mod:`.client_dp` -- client-level DP (DP-FedAvg): clip updates, uniform average, server noise,
  adaptive clipping. Pure torch.
- :mod:`.server_dp` -- :class:`ServerPrivacy`: the server's client-level DP mechanism (sampling, clip,
  fixed denominator, noise, accountant), Flower-free so that the epsilon audit runs the same object.
- :mod:`.distributed` -- distributed DP: clip, integer grid, discrete Gaussian shares inside SecAgg+,
  the field size and the noise multiplier the accountant charges.
- :mod:`.sampling` -- Poisson / fixed-size client sampling over the eligible clients, with the rate to charge.
- :mod:`.accounting` -- :class:`ClientLevelAccountant` (RDP / PRV with amplification by sampling; the
  replace-one bound for fixed-size sampling).
- :mod:`.statement` -- the run's guarantee in words (``summary.md``).
- :mod:`.epsilon_audit` -- the statistics of the one-run empirical epsilon audit.
- :mod:`.dpsgd` -- :class:`LocalDP`: record-level DP-SGD on a client with Opacus.
- :mod:`.soft_prompt` -- a prompt-tuning module with per-example gradients.
- :mod:`.checks` -- :func:`check_privacy`, up-front validation of the settings.

Opacus-backed names are imported lazily, so ``import fedpeft.privacy`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedpeft.privacy.checks import check_privacy
from fedpeft.privacy.client_dp import (
    AdaptiveClipper,
    add_server_noise,
    clip_factor,
    clip_to_norm,
    clip_update,
    dp_average,
    global_norm,
    update_noise_multiplier,
)

_LAZY = {
    "ClientLevelAccountant": "fedpeft.privacy.accounting",
    "LocalDP": "fedpeft.privacy.dpsgd",
    "derive_noise_multiplier": "fedpeft.privacy.dpsgd",
    "causal_lm_loss": "fedpeft.privacy.dpsgd",
    "per_example_causal_lm_loss": "fedpeft.privacy.dpsgd",
    "SoftPrompt": "fedpeft.privacy.soft_prompt",
    "SoftPromptModel": "fedpeft.privacy.soft_prompt",
}

__all__ = ["check_privacy", "AdaptiveClipper", "add_server_noise", "clip_factor", "clip_to_norm",
           "clip_update", "dp_average", "global_norm", "update_noise_multiplier", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedpeft.privacy' has no attribute {name!r}")
