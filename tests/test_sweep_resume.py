"""compare-compression: per-round progress, and ``--resume`` of a killed sweep (finished codecs are not rerun,
the interrupted one continues from its checkpoint) with the same table as an uninterrupted sweep."""

import csv
import json

import pytest

from fedpeft import cli, config
from fedpeft.server import loop
from fedpeft.simulation import sweep

from conftest import tiny_overrides

CODECS = ["none", "int8"]
TIMING = ("encode_ms", "decode_ms", "run_dir")


class Killed(Exception):
    """Stands in for the process being killed in the middle of a round."""


def _cfg(cls_data, out):
    return config.load(None, tiny_overrides(cls_data, out, **{"federation.rounds": 2, "data.num_clients": 2,
                                                              "train.local_steps": 3}))


def _table(sweep_dir):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(open(sweep_dir /
                                                                                            "compression.csv"))]


def test_a_killed_sweep_resumes_where_it_stopped(cls_data, tmp_path, monkeypatch, capsys, one_thread):
    seen = []
    whole = sweep.compare_compression(_cfg(cls_data, tmp_path / "whole"), CODECS,
                                      on_round=lambda spec, row: seen.append((spec, row["round"])))
    assert seen == [("none", 1), ("none", 2), ("int8", 1), ("int8", 2)]  # per-round progress, as rows land

    original, ran = loop.FederatedServer.run_round, []

    def killed(self, grid, rnd):
        ran.append((self.cfg.compression.uplink, rnd))
        if ran == [("none", 1), ("none", 2), ("int8", 1), ("int8", 2)]:  # once, in the first sweep
            raise Killed()
        return original(self, grid, rnd)

    monkeypatch.setattr(loop.FederatedServer, "run_round", killed)
    with pytest.raises(Killed):
        sweep.compare_compression(_cfg(cls_data, tmp_path / "killed"), CODECS)
    (sweep_dir,) = (tmp_path / "killed").iterdir()
    assert [json.loads(line)["codec"] for line in (sweep_dir / sweep.RESULTS_FILE).read_text().splitlines()] == \
        ["none"]

    ran.clear()
    assert cli.main(["compare-compression", "--resume", str(sweep_dir)]) == 0
    assert ran == [("int8", 2)]  # the finished codec and int8's first round are not recomputed
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sweep_dir"] == str(sweep_dir)
    assert _table(sweep_dir) == _table(whole)


def test_resume_refuses_a_directory_that_is_not_a_sweep(tmp_path):
    with pytest.raises(config.ConfigError, match="not a compare-compression directory"):
        sweep.load_sweep(tmp_path)
