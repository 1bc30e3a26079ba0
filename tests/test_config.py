"""Configuration: TOML + overrides, strict validation with actionable messages."""

from pathlib import Path

import pytest

from fedpeft import config
from fedpeft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_quickstart_scenario():
    assert config.load(ROOT / "simulations" / "quickstart.toml") == config.load(None)


@pytest.mark.parametrize("path", sorted((ROOT / "simulations").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_scenario_is_valid(path):
    cfg = config.load(path)
    assert cfg.run.name == path.stem


def test_overrides_are_typed_and_round_trip():
    cfg = config.load(None, ["federation.rounds=7", "train.lr=0.5", "adapter.target_modules=q,k,v",
                             "run.name=x y", "output.plots=false"])
    assert (cfg.federation.rounds, cfg.train.lr, cfg.adapter.target_modules) == (7, 0.5, ["q", "k", "v"])
    assert cfg.run.name == "x y" and cfg.output.plots is False
    assert config.loads(cfg.to_toml()) == cfg
    lists = [config.load(None, ["adversary.attack=scale", f"adversary.clients={v}"]).adversary.clients
             for v in ("0", "[0]", "0,", "[0, 2]", "0,2")]  # a single id is a list of one (it was refused)
    assert lists == [[0], [0], [0], [0, 2], [0, 2]]


@pytest.mark.parametrize("override, fragment", [
    ("federation.roundz=3", "unknown key federation.roundz; valid keys in [federation]: rounds"),
    ("nope.x=1", "unknown section [nope]; valid sections: run, model"),
    ("adapter.type=lorra", "adapter.type = 'lorra' is not allowed; choose one of: 'lora', 'prompt'"),
    ("federation.rounds=0", "federation.rounds = 0 is below the minimum 1"),
    ("federation.rounds=1.5", "federation.rounds = 1.5: expected an integer"),
    ("train.lr=fast", "train.lr = 'fast': expected a number"),
    ("output.plots=1", "output.plots = 1: expected true or false"),
    ("rounds=3", "expected section.key=value"),
    ("data.source=file", "data.source = 'file' needs data.path"),
    ("federation.clients_per_round=9", "exceeds data.num_clients = 4"),
    ("train.lr=nan", "train.lr = nan: expected a finite number"),
    ("train.lr=inf", "train.lr = inf: expected a finite number"),
    ("sanity.max_loss=-inf", "sanity.max_loss = -inf: expected a finite number"),
])
def test_bad_settings_name_the_key_and_the_allowed_values(override, fragment):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert fragment in str(e.value)


def test_missing_and_malformed_scenario_files(tmp_path):
    with pytest.raises(ConfigError, match="scenario file not found"):
        config.load(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nname=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)


def test_reference_lists_every_key():
    keys = {row[0] for row in config.describe()}
    assert {"run.seed", "adapter.r", "federation.strategy", "compression.uplink", "privacy.mode"} <= keys


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key, *_ in config.describe() if f"`{key}`" not in readme]
    assert not missing, f"README configuration reference lacks {missing}"


def test_every_float_key_is_finite_and_bounded_below():
    """nan/inf are valid TOML: every float key refuses them, and declares the range it accepts."""
    import dataclasses
    import typing

    floats = [(f"{s}.{f.name}", f) for s, cls in config._section_types().items()
              for f in dataclasses.fields(cls) if typing.get_type_hints(cls)[f.name] is float]
    assert len(floats) > 40
    assert [key for key, f in floats if f.metadata.get("lo") is None] == []
    for key, _ in floats:
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(ConfigError, match=f"{key} = .*: expected a finite number"):
                config.load(None, [f"{key}={bad}"])


def test_cli_refuses_a_non_finite_learning_rate_in_one_line(capsys):
    from fedpeft import cli

    assert cli.main(["config", "--set", "train.lr=nan"]) == 2
    assert capsys.readouterr().err.strip() == "error: train.lr = nan: expected a finite number"


def test_a_scenario_that_is_not_utf8_exits_2_in_one_line(tmp_path, capsys):
    from fedpeft import cli

    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[run]\nname = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.toml: not UTF-8 text"):
        config.load(bad)
    assert cli.main(["config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not UTF-8 text (byte 17" in err, err
