"""Checkpoints: a manifest verified before a resume, consistency with metrics.jsonl and the configuration,
recovery from an interrupted swap. A corrupt or inconsistent checkpoint ends ``--resume`` with exit code 2
and one line naming the file; it never resumes silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedpeft import cli, config, report
from fedpeft.errors import CheckpointError
from fedpeft.server import checkpoint, loop
from fedpeft.simulation import runner

from conftest import Interrupted, tiny_overrides, write_classification

KEYS = ("round", "sampled", "train_loss", "eval_loss", "eval_accuracy")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 4-round reference run, and the same run crashed at the start of round 3 (checkpoint at round 2).
    The lossy uplink gives each node state to checkpoint (error-feedback residuals)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    data = write_classification(tmp / "topics.jsonl", n=120)
    cfg = config.load(None, tiny_overrides(data, tmp / "runs", **{
        "federation.rounds": 4, "data.num_clients": 2, "train.local_steps": 3, "model.max_length": 24,
        "compression.uplink": "compeft:0.5"}))
    reference = report.read_metrics(runner.simulate(cfg))
    original = loop.FederatedServer.run_round

    def crash(self, grid, rnd):
        if rnd == 3:
            raise Interrupted()
        return original(self, grid, rnd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.FederatedServer, "run_round", crash)
        cfg, crashed = runner.prepare(cfg)
        with pytest.raises(Interrupted):
            runner.execute(cfg, crashed)
    return {"cfg": cfg, "reference": reference, "crashed": crashed, "tmp": tmp}


def _copy(runs: dict, name: str) -> Path:
    dst = runs["tmp"] / name
    shutil.copytree(runs["crashed"], dst)
    return dst


def _resume_fails(run_dir: Path, capsys: pytest.CaptureFixture) -> str:
    """``fedpeft simulate --resume`` exits 2 with one line; returns it."""
    capsys.readouterr()
    assert cli.main(["simulate", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, indent=1))


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last float of the global adapter values
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "server.json truncated": ("server.json", lambda p: p.write_bytes(p.read_bytes()[:40])),
    "rng state edited": ("server.json", lambda p: _edit_json(p, lambda m: m["rng_state"].update(state={"x": 1}))),
    "round 2 -> 99": ("server.json", lambda p: _edit_json(p, lambda m: m.update(round=99))),
    "round 2 -> 1": ("server.json", lambda p: _edit_json(p, lambda m: m.update(round=1))),
    "round 2 -> -3": ("server.json", lambda p: _edit_json(p, lambda m: m.update(round=-3))),
    "safetensors truncated": ("optimizer.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-9])),
    "one bit of the global values": ("global.safetensors", _flip_bit),
    "node npz corrupt": ("nodes/1001.npz", lambda p: p.write_bytes(b"PK\x03\x04 not a zip")),
    "manifest truncated": ("manifest.json", lambda p: p.write_bytes(p.read_bytes()[:30])),
    "manifest missing": ("manifest.json", lambda p: p.unlink()),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_or_edited_checkpoint_file_is_refused_naming_it(runs, capsys, case):
    name, corrupt = CORRUPTIONS[case]
    run_dir = _copy(runs, f"corrupt-{case.replace(' ', '_')}")
    assert (run_dir / "checkpoint" / name).is_file(), sorted(p.name for p in (run_dir / "checkpoint").rglob("*"))
    corrupt(run_dir / "checkpoint" / name)
    err = _resume_fails(run_dir, capsys)
    assert f"checkpoint/{name}" in err and "cannot resume" in err


METRICS = {
    "deleted": (lambda p: p.unlink(), "is missing"),
    "row 2 lost": (lambda p: p.write_text(p.read_text().splitlines()[0] + "\n"), "fewer than the 2"),
    "partial last row": (lambda p: p.write_bytes(p.read_bytes()[:-20]), "fewer than the 2"),
    "row 1 edited": (lambda p: p.write_text(p.read_text().replace('"round": 1', '"round": 7')), "differ"),
}


@pytest.mark.parametrize("case", list(METRICS))
def test_metrics_that_disagree_with_the_checkpoint_are_refused(runs, capsys, case):
    edit, fragment = METRICS[case]
    run_dir = _copy(runs, f"metrics-{case.replace(' ', '_')}")
    edit(run_dir / "metrics.jsonl")
    err = _resume_fails(run_dir, capsys)
    assert "metrics.jsonl" in err and fragment in err


@pytest.mark.parametrize("key, value, fragment", [
    ("train.lr", 0.5, "train.lr (0.03 -> 0.5)"),
    ("federation.rounds", 1, "at round 2, outside 1..1"),
])
def test_a_configuration_that_disagrees_with_the_checkpoint_is_refused(runs, capsys, key, value, fragment):
    run_dir = _copy(runs, f"config-{key}")
    section, name = key.split(".")
    raw = runs["cfg"].to_dict()
    raw[section][name] = value
    (run_dir / "config.toml").write_text(config.from_dict(raw).to_toml())
    assert fragment in _resume_fails(run_dir, capsys)


def test_a_partial_row_after_the_checkpoint_is_dropped_and_replayed(runs, caplog):
    run_dir = _copy(runs, "partial-after")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "sampled": 2, "repl')  # the crash cut the row of round 3 short
    runner.simulate(resume=run_dir)
    assert "dropping 1 row(s) written after the checkpoint's round 2 (the last one partial)" in caplog.text
    rows = report.read_metrics(run_dir)
    assert [[r[k] for k in KEYS] for r in rows] == [[r[k] for k in KEYS] for r in runs["reference"]]


@pytest.mark.parametrize("moved", [False, True], ids=["tmp-beside-main", "main-moved-to-old"])
def test_a_crash_during_the_swap_resumes_from_the_newest_complete_copy(runs, moved, caplog):
    """The round-3 copy is complete in checkpoint.tmp when the process dies before (or half way through)
    the swap; the resume takes it, not the round-2 copy, and ends as the uninterrupted run did."""
    run_dir = _copy(runs, f"swap-{moved}")
    seal = checkpoint.seal

    def die_after_sealing(directory, rnd, metrics=None):
        seal(directory, rnd, metrics)
        if rnd == 3:
            raise Interrupted()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "seal", die_after_sealing)
        with pytest.raises(Interrupted):
            runner.simulate(resume=run_dir)
    ckpt = run_dir / "checkpoint"
    if moved:
        ckpt.rename(ckpt.with_name("checkpoint.old"))
    assert json.loads((ckpt.with_name("checkpoint.tmp") / "server.json").read_text())["round"] == 3
    runner.simulate(resume=run_dir)
    assert "resuming from checkpoint.tmp (round 3)" in caplog.text
    rows = report.read_metrics(run_dir)
    assert [[r[k] for k in KEYS] for r in rows] == [[r[k] for k in KEYS] for r in runs["reference"]]
    assert checkpoint.load(ckpt).round == 4 and not ckpt.with_name("checkpoint.tmp").exists()


def test_a_corrupt_main_copy_falls_back_to_a_complete_verified_one(tmp_path, caplog):
    """``checkpoint/`` fails verification but a complete copy of the same round survives (``checkpoint.old``
    of an interrupted swap): the resume takes that copy, logs it, and keeps the corrupt one aside."""
    import torch

    cfg, metrics, ckpt = config.load(None, ["federation.rounds=3"]), tmp_path / "metrics.jsonl", tmp_path / "checkpoint"
    metrics.write_text('{"round": 1}\n')
    checkpoint.save(checkpoint.ServerCheckpoint(1, {"global": {"w": torch.ones(3)}}, {}), ckpt, metrics, cfg.to_toml())
    shutil.copytree(ckpt, ckpt.with_name("checkpoint.old"))
    _flip_bit(ckpt / "global.safetensors")
    assert checkpoint.recover(ckpt, metrics, cfg) == 1
    assert "resuming from checkpoint.old (round 1)" in caplog.text
    assert "global.safetensors does not match" in caplog.text
    assert torch.equal(checkpoint.load(ckpt).tensors["global"]["w"], torch.ones(3))
    with pytest.raises(CheckpointError, match="global.safetensors does not match"):
        checkpoint.verify(ckpt.with_name("checkpoint.corrupt"))
