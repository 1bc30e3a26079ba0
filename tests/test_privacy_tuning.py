"""DP-friendly defaults: under local DP-SGD, groups of keys the scenario leaves unset take the measured DP values
together; a group any of whose keys the scenario sets is left to the scenario; the suggestion names the setting."""

from __future__ import annotations

import pytest

from fedpeft import config
from fedpeft.privacy.tuning import DP_DEFAULTS, apply_dp_defaults, suggestions

BEST, FALLBACK = (group.values for group in DP_DEFAULTS)
NON_DP = config.load(None, [])


def _shape(cfg: config.Config) -> dict[tuple[str, str], object]:
    return {(s, k): getattr(getattr(cfg, s), k) for s, k in BEST}


@pytest.mark.parametrize("mode", ["local", "both"])
def test_dp_sgd_takes_the_measured_batch_steps_and_rate_when_the_scenario_leaves_them_unset(mode: str) -> None:
    cfg = config.load(None, [f'privacy.mode="{mode}"'])
    assert _shape(cfg) == BEST != _shape(NON_DP)
    assert _shape(config.loads(cfg.to_toml())) == BEST  # the run's config.toml keeps what was used


@pytest.mark.parametrize("own", ["train.batch_size=16", "train.local_steps=15", "train.local_epochs=1.0",
                                 "privacy.physical_batch_size=0"])
def test_a_scenario_that_sets_its_own_batch_or_steps_keeps_them_and_gets_the_fallback_rate(own: str) -> None:
    cfg = config.load(None, ['privacy.mode="local"', own])
    assert cfg.train.lr == FALLBACK[("train", "lr")]
    assert (cfg.train.batch_size, cfg.train.local_steps) == (NON_DP.train.batch_size, NON_DP.train.local_steps)


@pytest.mark.parametrize("sets", [['privacy.mode="local"', f"train.lr={NON_DP.train.lr}"],  # set explicitly: kept
                                  ['privacy.mode="local"', "privacy.dp_defaults=false"],  # switched off
                                  ['privacy.mode="client"'], ['privacy.mode="distributed"',
                                                              'privacy.secure_aggregation="secaggplus"'], []])
def test_other_settings_keep_the_non_dp_training(sets: list[str]) -> None:
    cfg = config.load(None, sets)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.local_steps) == \
        (NON_DP.train.lr, NON_DP.train.batch_size, NON_DP.train.local_steps)


def test_the_raw_scenario_is_not_changed_and_bad_sections_are_left_to_validation() -> None:
    raw = {"privacy": {"mode": "local"}}
    assert apply_dp_defaults(raw)["train"]["lr"] == BEST[("train", "lr")] and raw == {"privacy": {"mode": "local"}}
    with pytest.raises(config.ConfigError, match=r"\[train\] must be a table"):
        config.from_dict({"privacy": {"mode": "local"}, "train": 3})


def test_suggestions_name_the_measured_setting() -> None:
    slow = config.load(None, ['privacy.mode="local"', "train.lr=0.001"])
    (line,) = suggestions(slow)
    assert "train.lr = 0.001" in line and "--set train.batch_size=64" in line and "--set train.lr=0.02" in line
    assert "0.948" in line
    assert suggestions(config.load(None, ['privacy.mode="local"'])) == []
    assert suggestions(config.load(None, [])) == []
