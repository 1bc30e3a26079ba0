"""Start-up is structural: the commands that need no model import no torch, transformers, Flower or Opacus,
and bad settings are refused before any of them loads (timings: benchmarks/bench_startup.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "peft", "flwr", "opacus", "ray")
ROOT = Path(__file__).resolve().parent.parent


def _imports_after(argv: list[str], cwd: Path, prelude: str = "") -> tuple[int, list[str], str]:
    """Run ``prelude`` then ``fedpeft.cli.main(argv)`` in a fresh interpreter: exit code, heavy packages imported,
    stderr."""
    code = (f"import io, contextlib, json, sys\n{prelude}\nfrom fedpeft.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try:\n        rc = main({argv!r})\n    except SystemExit as e:\n        rc = e.code\n"
            f"print(json.dumps([rc, sorted(m for m in {HEAVY!r} if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=600,
                         env={**_env(), "PYTHONPATH": str(ROOT)})
    rc, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    return rc, heavy, out.stderr


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "400"}


@pytest.mark.parametrize("argv", [["--help"], ["simulate", "--help"], ["config"],
                                  ["config", "--set", "federation.strategy=krum",
                                   "--set", "data.num_clients=8"],
                                  ["config", "--reference"],  # every registry's names, the adversary's included
                                  ["config", "--set", "adversary.attack=backdoor", "--set", "adversary.fraction=0.25"]],
                         ids=["help", "simulate-help", "config", "config-krum", "config-reference", "config-attack"])
def test_commands_without_a_model_import_no_heavy_stack(argv: list[str]) -> None:
    rc, heavy, err = _imports_after(argv, ROOT)
    assert rc == 0, err
    assert heavy == []


@pytest.mark.parametrize("override, message", [
    ("compression.uplink=compeft:0.1,scale=nope", "compression.uplink"),
    ("compression.uplink=bogus:3", "unknown codec 'bogus'"),
    ("privacy.mode=client", "would sample no client"),          # with clients_per_round = 1 below: Poisson
    ("privacy.mode=local", "max_grad_norm must be > 0"),          # with max_grad_norm = 0 below
], ids=["codec-option", "codec-name", "client-dp-sampling", "local-dp-clip"])
def test_bad_settings_fail_before_models_load_and_leave_no_run_directory(tmp_path: Path, override: str,
                                                                         message: str) -> None:
    extra = {"privacy.mode=client": ["--set", "federation.clients_per_round=1"],
             "privacy.mode=local": ["--set", "privacy.max_grad_norm=0"]}.get(override, [])
    out = tmp_path / "runs"
    rc, heavy, err = _imports_after(["simulate", "--set", override, *extra, "--set", f"output.dir={out}"], tmp_path)
    assert rc == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one line
    assert heavy == []  # refused before torch (and so before any model) was imported
    assert not out.exists()


def test_a_run_without_dp_or_split_loads_no_opacus(cls_data: Path, tmp_path: Path) -> None:
    """Opacus (and the scipy it pulls in) only when a run uses DP (issue 20: import what the run uses)."""
    sets = _tiny(cls_data, tmp_path)
    code = ("import sys, json\nimport torch\ntorch.set_num_threads(1)\nfrom fedpeft import config\n"
            "from fedpeft.simulation import runner\n"
            f"runner.simulate(config.load(None, {sets!r}))\n"
            "print(json.dumps(sorted(m for m in ('opacus', 'ray', 'fedpeft.split.client', 'fedpeft.split.transport')"
            " if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                         env={**_env(), "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _tiny(data: Path, tmp_path: Path) -> list[str]:
    from conftest import tiny_overrides

    return tiny_overrides(data, tmp_path / "runs", **{"federation.rounds": 1, "train.local_steps": 2,
                                                      "output.plots": False})


def test_lazy_module_imports_on_first_attribute() -> None:
    code = ("import sys\nfrom fedpeft import lazy\nm = lazy.module('colorsys')\nassert 'colorsys' not in sys.modules\n"
            "assert m.rgb_to_hsv(1, 0, 0) == (0.0, 1.0, 1)\nassert 'colorsys' in sys.modules\n"
            "assert lazy.module('colorsys') is sys.modules['colorsys']\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**_env(), "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("argv", [["audit"], ["audit", "--capture"], ["audit", "--epsilon-lower-bound"],
                                  ["frontier"], ["compare-compression"]],
                         ids=["audit-grid", "audit-capture", "audit-epsilon", "frontier", "compare-compression"])
def test_long_commands_refuse_a_bad_key_before_the_heavy_stack(tmp_path: Path, argv: list[str]) -> None:
    rc, heavy, err = _imports_after([*argv, "--set", "run.bogus=1"], tmp_path)
    assert rc == 2 and "unknown key run.bogus" in err and "Traceback" not in err
    assert heavy == []


def test_submitting_a_deployment_loads_no_model_stack_and_leaves_hardware_checks_to_the_nodes(
        cls_data: Path, tmp_path: Path) -> None:
    """``fedpeft run`` only writes the connection and the run directory and hands the app to ``flwr run`` (replaced
    here by a stub: a real submission is tested in test_deploy.py): it loads no torch, so it starts in a fraction of
    a second, and it does not refuse what this machine's hardware cannot run (fp16 base weights on a CPU-only
    submitter), since the ServerApp and the nodes run the model and check their own hardware."""
    from conftest import tiny_overrides

    sets = tiny_overrides(cls_data, tmp_path / "runs", **{"model.dtype": "fp16"})
    stub = "from fedpeft.deploy import flower\nflower.run_app = lambda home, app, run_config: 7"
    rc, heavy, err = _imports_after(["run", "--superlink", "127.0.0.1:9", "--insecure", "--flwr-home",
                                     str(tmp_path / "home"), *[a for s in sets for a in ("--set", s)]], tmp_path,
                                    prelude=stub)
    assert rc == 0, err
    assert heavy == []
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert 'dtype = "fp16"' in (run_dir / "config.toml").read_text()
