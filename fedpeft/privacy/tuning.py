"""DP-friendly training defaults and the suggestions printed when DP-SGD is on.

DP-SGD with the non-DP learning rate loses most of its utility: per-example clipping shrinks every gradient to at
most the clip norm and the noise is added on top, so the step the non-DP default takes is too short to leave the
noise behind. When local DP-SGD is on (``privacy.mode`` local or both) and ``privacy.dp_defaults`` is true, each
key of :data:`DP_DEFAULTS` that the scenario leaves unset takes its DP default (``fedpeft.config.from_dict`` calls
:func:`apply_dp_defaults` on the raw scenario, so ``fedpeft config`` and the run's config.toml show the value
used). A key the scenario sets is never changed. Only measured defaults are here (:data:`EVIDENCE`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedpeft.config import Config

DP_MODES = ("local", "both")
#: (section, key) -> the value it takes under local DP-SGD when the scenario leaves it unset
DP_DEFAULTS: dict[tuple[str, str], Any] = {("train", "lr"): 1e-2}
#: why each default is there (benchmarks/RESULTS.md, "Local DP-SGD at epsilon 8")
EVIDENCE = {("train", "lr"): "embedded default at epsilon 8 (one seed): accuracy 0.490 at lr 1e-3, 0.782 at 5e-3, "
                             "0.870 at 1e-2; non-DP 0.942"}


def apply_dp_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a scenario as read from TOML, overrides applied) with the DP defaults of its unset keys when local
    DP-SGD is on; ``raw`` itself is not changed. Malformed sections are left for validation to name."""
    privacy = raw.get("privacy", {})
    if not isinstance(privacy, dict) or privacy.get("mode") not in DP_MODES or privacy.get("dp_defaults", True) \
            is not True:
        return raw
    out = copy.deepcopy(raw)
    for (section, key), value in DP_DEFAULTS.items():
        table = out.setdefault(section, {})
        if isinstance(table, dict) and key not in table:
            table[key] = value
    return out


def suggestions(cfg: Config) -> list[str]:
    """One line per setting of a DP-SGD run that measured evidence says to change (empty without local DP)."""
    if cfg.privacy.mode not in DP_MODES:
        return []
    lines = []
    lr = DP_DEFAULTS[("train", "lr")]
    if cfg.train.lr < lr:
        lines.append(f"local DP-SGD with train.lr = {cfg.train.lr:g}: try --set train.lr={lr:g} "
                     f"({EVIDENCE[('train', 'lr')]}; docs/privacy.md, 'DP-friendly defaults')")
    return lines
