"""The Python API (fedpeft.simulate): configs as paths, dicts or Config objects, a user's own examples,
per-round callbacks, the returned RunResult."""

import json

import pytest
import torch

import fedpeft
from fedpeft import config
from fedpeft.errors import ConfigError, DataError

from conftest import tiny_overrides


def test_resolve_config_takes_paths_dicts_and_configs_with_overrides(tmp_path):
    scenario = tmp_path / "s.toml"
    scenario.write_text('[federation]\nrounds = 7\n[data]\nnum_clients = 5\n')
    from_path = fedpeft.resolve_config(scenario, {"federation.rounds": 2})
    assert (from_path.federation.rounds, from_path.data.num_clients) == (2, 5)
    from_dict = fedpeft.resolve_config({"data": {"num_clients": 5}}, ["federation.rounds=3"])
    assert (from_dict.federation.rounds, from_dict.data.num_clients) == (3, 5)
    again = fedpeft.resolve_config(from_dict, {"adapter.r": 4})
    assert (again.federation.rounds, again.adapter.r) == (3, 4) and from_dict.adapter.r != 4
    assert fedpeft.resolve_config() == config.load(None)  # the embedded default
    with pytest.raises(ConfigError, match="unknown key federation.roundz; valid keys in \\[federation\\]"):
        fedpeft.resolve_config(None, {"federation.roundz": 2})
    with pytest.raises(ConfigError, match="expected 'section.key'"):
        fedpeft.resolve_config(None, {"rounds": 2})
    with pytest.raises(ConfigError, match="unknown section \\[feds\\]"):
        fedpeft.resolve_config({"feds": {}})


def test_simulate_with_own_examples_and_callbacks_returns_the_run(cls_data, tmp_path):
    examples = [json.loads(line) for line in cls_data.read_text().splitlines()]
    sets = [s for s in tiny_overrides(cls_data, tmp_path / "runs") if not s.startswith(("data.source", "data.path"))]
    seen = []
    result = fedpeft.simulate(None, sets + ["federation.rounds=2"], data=examples, callbacks=[seen.append])
    assert [r["round"] for r in result.metrics] == [1, 2] and seen == result.metrics
    assert result.final["eval_accuracy"] is not None and result.run_dir.is_dir()
    path = result.config.data.path
    assert result.config.data.source == "file" and path.startswith(str((tmp_path / "runs" / "datasets").resolve()))
    assert [json.loads(line) for line in open(path)] == examples  # the user's examples, as given
    state = result.adapter_state()
    assert state and all(torch.isfinite(v).all() for v in state.values())
    assert set(result.metrics[-1]) >= {"round", "bytes_up", "eval_loss"}
    # the same examples again: the same content-addressed file; resuming a finished run keeps its rounds
    again = fedpeft.simulate(None, sets + ["federation.rounds=1"], data=examples)
    assert again.config.data.path == path
    resumed = fedpeft.simulate(resume=again.run_dir)
    assert [r["round"] for r in resumed.metrics] == [1]


def test_a_failing_callback_is_raised_to_the_caller(tiny_cfg):
    def boom(row):
        raise RuntimeError(f"callback saw round {row['round']}")

    with pytest.raises(RuntimeError, match="callback saw round 1"):
        fedpeft.simulate(tiny_cfg(**{"federation.rounds": 1}), callbacks=[boom])


def test_bad_examples_are_refused_before_a_run_starts(tmp_path):
    with pytest.raises(DataError, match="example 1 is a str"):
        fedpeft.simulate(None, {"output.dir": str(tmp_path)}, data=[{"text": "a", "label": "x"}, "oops"])
    with pytest.raises(DataError, match="no examples"):
        fedpeft.simulate(None, {"output.dir": str(tmp_path)}, data=[])
    assert not (tmp_path / "datasets").exists()
