"""``fedpeft audit`` writes each finished cell as it goes; ``--resume`` continues a killed grid without
recomputing the finished cells and ends with the same report as an uninterrupted run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedpeft import cli, config
from fedpeft.audit import run as audit
from fedpeft.errors import ConfigError

SCENARIO = Path(__file__).resolve().parents[1] / "simulations" / "privacy-audit.toml"
GRID = ["batch_size=1", "round=later", "dp=none", "codec=none,int8,compeft:0.1"]
TIMING = ("seconds", "cpu_seconds")  # measured, so they differ between any two runs
pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    """Stands in for the process being killed in the middle of a cell."""


def _cfg(out: Path) -> config.Config:
    return config.load(SCENARIO, [f'output.dir="{out}"', "audit.seeds=1", 'audit.attacks=["span","subspace_opt"]',
                                  "output.plots=false"])


def _csv(path: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(open(path))]


def _cells(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


def test_a_killed_grid_resumes_without_recomputing_and_equals_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    cfg, cells = audit.check(_cfg(tmp_path / "whole"), GRID)
    whole = audit.run_audit(cfg, cells)

    original, calls = audit.run_cell, []

    def killed_at_third(cfg, cell, *args, **kwargs):
        calls.append(cell["codec"])
        if len(calls) == 3:
            raise Killed()
        return original(cfg, cell, *args, **kwargs)

    monkeypatch.setattr(audit, "run_cell", killed_at_third)
    cfg, cells = audit.check(_cfg(tmp_path / "killed"), GRID)
    with pytest.raises(Killed):
        audit.run_audit(cfg, cells)
    (out,) = (tmp_path / "killed").iterdir()
    assert [r["codec"] for r in _csv(out / "audit.csv")] == ["none", "int8"]  # written as each cell finished
    assert not (out / "audit.md").exists()

    calls.clear()
    assert cli.main(["audit", "--resume", str(out)]) == 0
    assert calls == ["compeft:0.1"]  # only the missing cell ran
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["audit_dir"] == str(out)
    assert _csv(out / "audit.csv") == _csv(whole / "audit.csv")
    assert _cells(out / audit.CELLS_FILE) == _cells(whole / audit.CELLS_FILE)
    md = (out / "audit.md").read_text()
    assert md.count("**pass**") + md.count("**warn**") + md.count("**fail**") == 3


def test_a_torn_last_line_reruns_that_cell_and_a_foreign_row_is_refused(tmp_path, monkeypatch):
    cfg, cells = audit.check(_cfg(tmp_path), GRID[:3] + ["codec=none,int8"])
    out = audit.run_audit(cfg, cells)
    lines = (out / audit.CELLS_FILE).read_text().splitlines()
    (out / audit.CELLS_FILE).write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    _, _, rows = audit.load_progress(out)
    assert len(rows) == 1
    ran = []
    original = audit.run_cell
    monkeypatch.setattr(audit, "run_cell", lambda cfg, cell, *a, **k: ran.append(cell) or original(cfg, cell, *a, **k))
    audit.run_audit(cfg, resume=out)
    assert [c["codec"] for c in ran] == ["int8"] and len(audit.load_progress(out)[2]) == 2

    foreign = json.loads(lines[1])
    (out / audit.CELLS_FILE).write_text(json.dumps(foreign) + "\n")  # the second cell's row in the first place
    with pytest.raises(ConfigError, match="row 1 is not the plan's cell 1"):
        audit.load_progress(out)
    with pytest.raises(ConfigError, match="not an audit directory"):
        audit.load_progress(tmp_path)
