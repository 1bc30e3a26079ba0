"""Registries are the one source of the names: config choices and the CLI derive from them, cheaply."""

import subprocess
import sys

import pytest

from fedpeft import config
from fedpeft.adapters import ADAPTERS
from fedpeft.errors import ConfigError
from fedpeft.partition import PARTITIONS
from fedpeft.simulation.runner import ENGINES
from fedpeft.sources import SOURCES

CASES = [("adapter.type", ADAPTERS), ("run.engine", ENGINES), ("data.source", SOURCES),
         ("data.partition", PARTITIONS)]


@pytest.mark.parametrize("key, registry", CASES, ids=[k for k, _ in CASES])
def test_an_unknown_name_lists_the_registered_ones(key, registry) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(None, [f"{key}=nope"])
    assert f"{key} = 'nope' is not allowed" in str(e.value)
    assert all(repr(name) in str(e.value) for name in registry)
    with pytest.raises(ConfigError) as e:
        registry.get("nope")
    assert "'nope'" in str(e.value) and all(name in str(e.value) for name in registry)


@pytest.mark.parametrize("key, registry", CASES, ids=[k for k, _ in CASES])
def test_config_choices_are_the_registered_names(key, registry) -> None:
    row = next(r for r in config.describe() if r[0] == key)
    assert row[3].endswith("one of " + ", ".join(registry))


def test_the_cli_parser_imports_no_heavy_stack() -> None:
    code = ("import sys, fedpeft.cli; from fedpeft.cli_parser import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'flwr', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
