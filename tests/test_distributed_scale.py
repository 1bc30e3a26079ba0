"""What a many-client SecAgg+ round no longer repeats per message: the run's config is parsed once per process
(each caller still gets its own copy), and the CLI does not render Flower's per-node DEBUG lines."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from fedpeft import config


def test_the_run_config_is_parsed_once_and_each_caller_gets_its_own_copy(monkeypatch):
    text = config.load(None, ["run.seed=918273"]).to_toml()  # a text no other test has parsed
    calls = []
    real = config.loads
    monkeypatch.setattr(config, "loads", lambda t: calls.append(t) or real(t))
    first = config.from_run_config({"fedpeft-config": text})
    first.train.lr = 123.0  # a caller editing its own copy
    first.run = dataclasses.replace(first.run, name="edited")
    second = config.from_run_config({"fedpeft-config": text})
    assert len(calls) == 1
    assert second is not first and second.train.lr != 123.0 and second.run.name != "edited"
    assert second == real(text)


def test_the_cli_does_not_render_flower_debug_lines():
    code = ("import logging, flwr.common.logger\n"
            "from fedpeft import cli\n"
            "cli.main(['config', '--reference'])\n"
            "logging.getLogger('flwr').debug('NODE-DEBUG-LINE')\n"
            "logging.getLogger('flwr').warning('NODE-WARNING-LINE')\n")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "NODE-WARNING-LINE" in text
    assert "NODE-DEBUG-LINE" not in text
