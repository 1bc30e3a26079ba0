"""fedpeft frontier: the grid, the noise each DP mode gets for its target epsilon, an end-to-end sweep on the tiny
model (training, attacks on what the server observes, epsilon audit, frontier.md/csv/png) and resume."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedpeft import config, report
from fedpeft.errors import ConfigError
from fedpeft.privacy.accounting import ClientLevelAccountant, noise_for_epsilon
from fedpeft.simulation import frontier

from conftest import tiny_overrides, write_classification

#: shortened cells: one round of two steps, the span attack only, few canaries
FAST = {"federation.rounds": 1, "train.local_steps": 2, "model.max_length": 24, "audit.attacks": ["span"],
        "output.plots": True}
GRID = ["mode=none,local,distributed", "epsilon=8,inf", "codec=none"]
VOLATILE = ("run_dir", "seconds")


def _cfg(tmp: Path) -> config.Config:
    data = write_classification(tmp / "topics.jsonl", n=120)
    return config.load(None, tiny_overrides(data, tmp / "runs", **FAST))


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[config.Config, Path]:
    import torch

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("frontier")
    cfg = _cfg(tmp)
    return cfg, frontier.run_frontier(cfg, GRID, canaries=100)


def test_grid_cells_and_refusals() -> None:
    cells = frontier.cells(frontier.parse_grid([]))
    keys = [frontier.cell_key(c) for c in cells]
    assert "none/inf/none/lora" in keys and "distributed/8/none/lora" in keys
    assert not any(k.startswith("none/8") or k.startswith("local/inf") for k in keys)  # no DP <=> epsilon inf
    assert not any(k.startswith("distributed/") and "/none/" not in k for k in keys)  # its own integer grid
    for bad, named in (["flavour=x"], "mode, epsilon, codec, adapter"), (["mode=central"], "distributed"), \
            (["adapter=dora"], "ffa"), (["epsilon=0"], "positive"):
        with pytest.raises(ConfigError, match=named):
            frontier.parse_grid(bad)
    with pytest.raises(ConfigError, match="no cell"):
        frontier.cells(frontier.parse_grid(["mode=none", "epsilon=8"]))


def test_each_mode_trains_with_its_own_settings(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    settings = frontier.mode_settings(cfg, ["local:train.local_steps=3", "client:train.lr=0.03"])
    assert settings == {"local": {"train.lr": 2e-2, "train.batch_size": 64, "train.local_steps": 3,
                                  "privacy.physical_batch_size": 16}, "client": {"train.lr": 0.03}}
    cell = {"mode": "local", "epsilon": "8", "codec": "none", "adapter": "lora"}
    local = frontier.cell_config(cfg, cell, tmp_path, settings)
    assert (local.privacy.mode, local.privacy.target_epsilon, local.train.local_steps, local.train.batch_size) == \
        ("local", 8.0, 3, 64)
    plain = frontier.cell_config(cfg, {**cell, "mode": "none", "epsilon": "inf"}, tmp_path, settings)
    assert (plain.train.local_steps, plain.train.lr) == (cfg.train.local_steps, cfg.train.lr)
    off = config.load(None, [*tiny_overrides(Path(cfg.data.path), tmp_path / "runs", **FAST),
                             "privacy.dp_defaults=false"])
    assert frontier.mode_settings(off) == {}  # local DP-SGD keeps the shared settings
    with pytest.raises(ConfigError, match="MODE one of none, local, client, distributed"):
        frontier.mode_settings(cfg, ["central:train.lr=0.1"])
    with pytest.raises(ConfigError, match="settings of mode local: unknown key train.bogus; valid keys"):
        frontier.mode_settings(cfg, ["local:train.bogus=1"])
    with pytest.raises(ConfigError, match="settings of mode client: .*train.lr"):
        frontier.mode_settings(cfg, ["client:train.lr=-1"])


@pytest.mark.parametrize("mode", ["client", "distributed"])
def test_a_server_noise_cell_gets_the_noise_of_its_own_rounds(tmp_path: Path, mode: str) -> None:
    # the mode's settings give it 3 rounds where the scenario has 1: its noise must cover all 3 (before, the
    # frontier derived it from the scenario's rounds and the cell's accountant reported more than its epsilon)
    cfg = config.load(None, [*tiny_overrides(write_classification(tmp_path / "t.jsonl", n=120), tmp_path / "runs",
                                             **FAST), "data.num_clients=8", "federation.clients_per_round=4",
                             "privacy.delta=1e-3"])
    settings = frontier.mode_settings(cfg, [f"{mode}:federation.rounds=3"])
    cell = frontier.cell_config(cfg, {"mode": mode, "epsilon": "4", "codec": "none", "adapter": "lora"}, tmp_path,
                                settings)
    p = cell.privacy
    sampling, rate = (p.client_sampling, 0.5) if mode == "client" else ("fixed", 1.0)
    acc = ClientLevelAccountant("rdp", sampling)
    for _ in range(cell.federation.rounds):
        acc.step(p.server_noise_multiplier, rate)
    assert cell.federation.rounds == 3 and 3.96 <= acc.epsilon(p.delta) <= 4.0


@pytest.mark.parametrize("sampling,rate", [("poisson", 1.0), ("poisson", 0.25), ("fixed", 1.0)])
def test_noise_for_epsilon_reaches_the_target(sampling: str, rate: float) -> None:
    z = noise_for_epsilon(3.0, 1e-5, 4, rate, sampling)
    acc = ClientLevelAccountant("rdp", sampling)
    for _ in range(4):
        acc.step(z, rate)
    assert 2.97 <= acc.epsilon(1e-5) <= 3.0  # at most the target, within 1 %


def test_a_refused_combination_is_recorded_with_its_reason(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    row = frontier.run_cell(cfg, {"mode": "client", "epsilon": "8", "codec": "int8-secure", "adapter": "lora"},
                            tmp_path, canaries=0)
    assert row["status"].startswith("refused: ") and "secagg_bits" in row["status"]


def test_a_failed_cell_is_recorded_the_sweep_goes_on_and_a_resume_runs_it_again(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    from fedpeft.audit import capture
    from fedpeft.errors import FedPeftError

    cfg = _cfg(tmp_path)
    real = capture.audit_run

    def flaky(cell_cfg, **kwargs):
        if cell_cfg.privacy.mode == "none":
            raise FedPeftError("no client update was applied in rounds 1-1")
        return real(cell_cfg, **kwargs)

    monkeypatch.setattr(capture, "audit_run", flaky)
    out = frontier.run_frontier(cfg, ["mode=none,local", "epsilon=8,inf", "codec=none"], canaries=0)
    rows = {r["cell"]: r for r in frontier.read_rows(out)}
    assert rows["none/inf/none/lora"]["status"] == "failed: no client update was applied in rounds 1-1"
    assert rows["local/8/none/lora"]["status"] == "done"  # the cell after the failure ran
    assert frontier.remaining(out) == 1 and "1 failed" in (out / "frontier.md").read_text()
    monkeypatch.setattr(capture, "audit_run", real)
    frontier.run_frontier(resume=out)
    rows = {r["cell"]: r for r in frontier.read_rows(out)}  # one row a cell: the failed one's last
    assert len(frontier.read_rows(out)) == 2 and rows["none/inf/none/lora"]["status"] == "done"
    assert frontier.remaining(out) == 0 and "failed" not in (out / "frontier.md").read_text()


def test_frontier_end_to_end(swept: tuple[config.Config, Path]) -> None:
    cfg, out = swept
    rows = {r["cell"]: r for r in frontier.read_rows(out)}
    assert set(rows) == {"none/inf/none/lora", "local/8/none/lora", "distributed/8/none/lora"}
    assert all(r["status"] == "done" and 0 <= r["accuracy"] <= 1 and r["bytes_up_per_round"] > 0
               for r in rows.values())
    dist, local, plain = rows["distributed/8/none/lora"], rows["local/8/none/lora"], rows["none/inf/none/lora"]
    assert 7.9 <= dist["epsilon_reported"] <= 8.0 + 1e-6  # the run's own accountant, at the derived noise
    assert math.isinf(plain["epsilon_reported"])
    assert dist["attacked"] == 1 and plain["attacked"] == 1  # the secure mean / client 0's update, last round
    (metrics,) = report.read_metrics(out / dist["run_dir"])
    stages = sum(v for k, v in metrics.items() if k.startswith("secagg_up_"))
    assert dist["bytes_up_per_round"] == stages > 0  # every SecAgg+ stage is counted
    assert local["epsilon_audit"].startswith("pass") and local["epsilon_lower_bound"] <= 8.0
    audit = list(csv.DictReader((out / dist["run_dir"] / "audit.csv").read_text().splitlines()))
    assert len(audit) == 1  # what SecAgg+ hands the server: the sum, no client
    assert (audit[0]["client"], audit[0]["node"], audit[0]["truth"]) == ("-1", "-1", "sum")
    text = (out / "frontier.md").read_text()
    assert "| distributed | 8 |" in text and (out / "frontier.png").stat().st_size > 0
    saved = json.loads((out / frontier.GRID_FILE).read_text())
    assert saved["canaries"] == 100 and saved["settings"]["local"]["train.batch_size"] == 64
    local_cfg = config.load(out / local["run_dir"] / "config.toml")  # the DP-friendly group, local cells only
    assert (local_cfg.train.batch_size, local_cfg.train.local_steps, local_cfg.privacy.physical_batch_size) == \
        (64, 4, 16)
    assert config.load(out / plain["run_dir"] / "config.toml").train.local_steps == 2
    assert "mode `local` trains with its own `train.lr = 0.02`" in text


def test_a_killed_sweep_resumes_to_the_same_result(swept: tuple[config.Config, Path], tmp_path: Path) -> None:
    cfg, reference = swept
    cfg = config.load(None, tiny_overrides(Path(cfg.data.path), tmp_path / "runs", **FAST))
    # seeded cells (SecAgg+ cells draw fresh noise and rounding: a seeded noise could be removed by anyone)
    grid = ["mode=none,local", "epsilon=8,inf", "codec=none"]

    def kill(i: int, total: int, row: dict) -> None:
        raise KeyboardInterrupt  # as if the process died right after the first cell was written

    with pytest.raises(KeyboardInterrupt):
        frontier.run_frontier(cfg, grid, canaries=100, on_cell=kill)
    (out,) = [p for p in (tmp_path / "runs").iterdir() if p.name.endswith("-frontier") or "-frontier-" in p.name]
    assert len(frontier.read_rows(out)) == 1 and frontier.remaining(out) == 1
    frontier.run_frontier(resume=out)
    assert len(frontier.read_rows(out)) == 2 and frontier.remaining(out) == 0  # the finished cell was not re-run
    resumed = {r["cell"]: r for r in frontier.read_rows(out)}
    whole = {r["cell"]: r for r in frontier.read_rows(reference)}
    assert sorted(resumed) == ["local/8/none/lora", "none/inf/none/lora"]  # each cell once
    for key, row in resumed.items():
        assert {k: v for k, v in row.items() if k not in VOLATILE} == \
            {k: v for k, v in whole[key].items() if k not in VOLATILE}


def test_cli_frontier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedpeft.cli import main

    data = write_classification(tmp_path / "topics.jsonl", n=60)
    sets = [a for s in tiny_overrides(data, tmp_path / "runs", **FAST) for a in ("--set", s)]
    assert main(["frontier", *sets, "--grid", "mode=client", "--grid", "epsilon=8", "--grid", "codec=int8-secure",
                 "--canaries", "0"]) == 0
    printed = capsys.readouterr()
    out = Path(json.loads(printed.out.strip().splitlines()[-1])["frontier_dir"])
    assert "Refused combinations" in (out / "frontier.md").read_text()
    assert "frontier: cell 1/" in printed.err and " started (" in printed.err  # plain lines off a terminal
    assert main(["frontier", "--resume", str(out)]) == 0  # nothing left: rewrites the report
    assert main(["frontier", *sets, "--grid", "mode=central"]) == 2
    assert main(["frontier", "--resume", str(out), "--mode-set", "local:train.lr=0.1"]) == 2


def test_cli_frontier_exits_1_when_a_cell_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from fedpeft.audit import capture
    from fedpeft.cli import main
    from fedpeft.errors import FedPeftError

    def broken(cell_cfg, **kwargs):
        raise FedPeftError("no client update was applied in rounds 1-1")

    monkeypatch.setattr(capture, "audit_run", broken)
    data = write_classification(tmp_path / "topics.jsonl", n=60)
    sets = [a for s in tiny_overrides(data, tmp_path / "runs", **FAST) for a in ("--set", s)]
    assert main(["frontier", *sets, "--grid", "mode=none", "--grid", "epsilon=inf", "--grid", "codec=none",
                 "--canaries", "0"]) == 1
    assert "1 cell(s) failed" in capsys.readouterr().err  # the console (stderr); stdout keeps the JSON line


def test_a_finished_cell_leaves_no_attack_state_behind(tmp_path: Path) -> None:
    """A cell's observations (with the attacks' candidate tables: GBs on MiniLM) sit in reference cycles; the
    sweep frees them after each cell, or a default grid's cells pile up past the machine's memory."""
    import gc

    from fedpeft.attacks.observation import Observation

    gc.collect()
    gc.disable()  # only the sweep's own collection may free them
    try:
        frontier.run_frontier(_cfg(tmp_path), ["mode=none", "epsilon=inf", "codec=none"], canaries=0)
        alive = [o for o in gc.get_objects() if isinstance(o, Observation)]
    finally:
        gc.enable()
    assert alive == []
