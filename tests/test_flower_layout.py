"""Flower conventions: the repository is a `flwr run .` app (Flower validates and loads its components, run
config keys override the scenario), and the wheel ships the scenario files that the code finds by name."""

import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedpeft import config, report
from fedpeft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted(p.name for p in (ROOT / "simulations").glob("*.toml"))


def test_flower_validates_the_app_and_loads_its_components():
    from flwr.clientapp import ClientApp
    from flwr.common.config import get_project_config, validate_config
    from flwr.serverapp import ServerApp
    from flwr.supercore.object_ref import load_app

    project = get_project_config(ROOT)  # Flower's own checks of pyproject.toml
    ok, errors, _ = validate_config(project, check_module=True, project_dir=ROOT)
    assert ok, errors
    components = project["tool"]["flwr"]["app"]["components"]
    assert isinstance(load_app(components["serverapp"], ValueError, ROOT), ServerApp)
    assert isinstance(load_app(components["clientapp"], ValueError, ROOT), ClientApp)


def test_run_config_keys_are_config_keys_and_override_the_scenario():
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    known = {key for key, *_ in config.describe()}
    fused = get_fused_config_from_dir(ROOT, {})
    dotted = [k for k in fused if "." in k]
    assert len(dotted) >= 30 and not set(dotted) - known, set(dotted) - known
    assert config.from_run_config(fused) == config.load(None)  # nothing set: the embedded default

    overrides = parse_config_args(['scenario="noniid" federation.rounds=2 train.lr=0.01 tracking.sinks="tensorboard"'])
    cfg = config.from_run_config(get_fused_config_from_dir(ROOT, overrides))
    expected = config.load(ROOT / "simulations" / "noniid.toml",
                           ["federation.rounds=2", "train.lr=0.01", "tracking.sinks=['tensorboard']"])
    assert cfg == expected
    with pytest.raises(ValueError, match="not present"):  # Flower refuses a key the app does not declare
        get_fused_config_from_dir(ROOT, parse_config_args(["federation.roundz=2"]))
    with pytest.raises(ConfigError, match="federation.rounds"):
        config.from_run_config({**fused, "federation.rounds": "many"})


def test_flwr_run_layout_trains_through_the_same_apps(cls_data, tmp_path, one_thread):
    """What `flwr run .` hands the apps (no fedpeft-config, no run-dir) runs a federation into output.dir."""
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    from fedpeft.clients.app import app as client_app
    from fedpeft.server.app import app as server_app
    from fedpeft.simulation.inprocess import run_inprocess

    from conftest import tiny_overrides

    scenario = tmp_path / "tiny.toml"
    raw: dict = {}
    for text in tiny_overrides(cls_data, tmp_path / "unused", **{"federation.rounds": 3}):
        config.set_value(raw, *config.parse_override(text))
    import tomli_w

    scenario.write_text(tomli_w.dumps(raw))
    overrides = parse_config_args([f'scenario="{scenario}" federation.rounds=1 output.dir="{tmp_path / "runs"}"'])
    run_inprocess(server_app, client_app, 3, get_fused_config_from_dir(ROOT, overrides))
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert [r["round"] for r in report.read_metrics(run_dir)] == [1]
    assert config.load(run_dir / "config.toml").federation.rounds == 1 and (run_dir / "adapter").is_dir()


def test_scenarios_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sorted(f"{name}.toml" for name in config.packaged_scenarios()) == SCENARIOS
    direct = config.load(ROOT / "simulations" / "noniid.toml")
    assert config.load("noniid") == direct and config.load("simulations/noniid.toml") == direct
    with pytest.raises(ConfigError, match="scenario file not found: nope.toml .*packaged scenarios: .*quickstart"):
        config.load("nope.toml")


@pytest.mark.slow
def test_the_wheel_ships_the_scenarios_and_finds_them_installed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "fedpeft", src / "fedpeft", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "simulations", src / "simulations", ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("fedpeft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert [n.split("/")[-1] for n in sorted(names) if n.startswith("fedpeft/scenarios/")] == SCENARIOS
    assert "fedpeft/deploy/flwrapp/pyproject.toml" in names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # the installed layout, with no repository beside it
    probe = ("import json, fedpeft, fedpeft.config as c; cfg = c.load('privacy-audit'); "
             "print(json.dumps([fedpeft.__file__, cfg.run.name]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    where, name = json.loads(out.stdout.strip().splitlines()[-1])
    assert where.startswith(str(site)) and name == "privacy-audit"


def _labelled(n: int = 300, classes: int = 5):
    import numpy as np

    from fedpeft.sources import Examples

    labels = np.random.default_rng(0).integers(0, classes, n)
    return Examples("classification", [f"t{i}" for i in range(n)], labels, [f"c{c}" for c in range(classes)])


def test_flower_partitioners_without_the_package_name_it(monkeypatch):
    from fedpeft.config import DataSection
    from fedpeft.errors import DataError
    from fedpeft.partition import partition

    monkeypatch.setitem(sys.modules, "flwr_datasets", None)  # as if not installed
    with pytest.raises(DataError, match="'flwr_dirichlet' needs the flwr-datasets package"):
        partition(_labelled(), DataSection(num_clients=3, partition="flwr_dirichlet"), 0)


@pytest.mark.skipif(importlib.util.find_spec("flwr_datasets") is None, reason="flwr-datasets is not installed")
def test_flower_partitioners_split_like_flower_and_follow_the_seed():
    import numpy as np
    from flwr_datasets.partitioner import DirichletPartitioner

    from fedpeft.config import DataSection
    from fedpeft.partition import partition

    ex = _labelled()
    for scheme in ("flwr_iid", "flwr_dirichlet", "flwr_pathological"):
        cfg = DataSection(num_clients=4, partition=scheme, dirichlet_alpha=0.3, classes_per_client=2)
        a, b, c = partition(ex, cfg, 0), partition(ex, cfg, 0), partition(ex, cfg, 1)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)) and any(len(x) != len(y) or (x != y).any()
                                                                      for x, y in zip(a, c))
        assert all(len(p) for p in a) and len(np.unique(np.concatenate(a))) == len(np.concatenate(a))
        if scheme != "flwr_pathological":
            assert sorted(np.concatenate(a).tolist()) == list(range(len(ex)))
        else:
            assert all(len(set(ex.labels[p].tolist())) <= 2 for p in a)
    # flwr_dirichlet is Flower's own split: the same partitioner on the labels gives the same clients
    cfg = DataSection(num_clients=4, partition="flwr_dirichlet", dirichlet_alpha=0.3)
    seed = int(np.random.default_rng(7).integers(2**31 - 1))
    import datasets

    flower = DirichletPartitioner(num_partitions=4, partition_by="label", alpha=0.3, seed=seed, min_partition_size=10)
    flower.dataset = datasets.Dataset.from_dict({"label": ex.labels.tolist(), "idx": list(range(len(ex)))})
    ours = partition(ex, cfg, 7)
    assert [sorted(flower.load_partition(j)["idx"]) for j in range(4)] == [p.tolist() for p in ours]
