"""DP-friendly defaults: under local DP-SGD, keys the scenario leaves unset take the measured DP defaults; keys
it sets are kept; the suggestion names the setting to change."""

from __future__ import annotations

import pytest

from fedpeft import config
from fedpeft.privacy.tuning import DP_DEFAULTS, apply_dp_defaults, suggestions

DP_LR = DP_DEFAULTS[("train", "lr")]
NON_DP_LR = config.TrainSection().lr


@pytest.mark.parametrize("mode", ["local", "both"])
def test_dp_sgd_takes_the_dp_learning_rate_when_the_scenario_leaves_it_unset(mode: str) -> None:
    cfg = config.load(None, [f'privacy.mode="{mode}"'])
    assert cfg.train.lr == DP_LR != NON_DP_LR
    assert config.loads(cfg.to_toml()).train.lr == DP_LR  # the run's config.toml keeps what was used


@pytest.mark.parametrize("sets", [['privacy.mode="local"', f"train.lr={NON_DP_LR}"],  # set explicitly: kept
                                  ['privacy.mode="local"', "privacy.dp_defaults=false"],  # switched off
                                  ['privacy.mode="client"'], ['privacy.mode="distributed"',
                                                              'privacy.secure_aggregation="secaggplus"'], []])
def test_other_settings_keep_the_non_dp_learning_rate(sets: list[str]) -> None:
    assert config.load(None, sets).train.lr == NON_DP_LR


def test_the_raw_scenario_is_not_changed_and_bad_sections_are_left_to_validation() -> None:
    raw = {"privacy": {"mode": "local"}}
    assert apply_dp_defaults(raw)["train"]["lr"] == DP_LR and raw == {"privacy": {"mode": "local"}}
    with pytest.raises(config.ConfigError, match=r"\[train\] must be a table"):
        config.from_dict({"privacy": {"mode": "local"}, "train": 3})


def test_suggestions_name_the_setting_to_change() -> None:
    slow = config.load(None, ['privacy.mode="local"', "train.lr=0.001"])
    (line,) = suggestions(slow)
    assert "train.lr = 0.001" in line and f"--set train.lr={DP_LR:g}" in line and "0.870" in line
    assert suggestions(config.load(None, ['privacy.mode="local"'])) == []
    assert suggestions(config.load(None, [])) == []
