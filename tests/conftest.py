"""Shared fixtures: tiny models built from a config and small synthetic data written to tmp files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import pytest  # noqa: E402

from fedpeft import config  # noqa: E402

TOPICS = {
    "fruit": ["apple", "banana", "cherry", "mango", "pear"],
    "motor": ["engine", "wheel", "truck", "brake", "diesel"],
    "weather": ["rain", "snow", "storm", "cloud", "wind"],
}
FILLER = ["the", "a", "is", "on", "with", "and", "of", "today", "very", "some"]
QA = [("what is two plus two", "four"), ("name a color", "blue"), ("say hello", "hello there"),
      ("what do cows say", "moo"), ("capital of france", "paris"), ("opposite of hot", "cold")]


def write_classification(path: Path, n: int = 240, seed: int = 0) -> Path:
    """JSONL of short texts whose label is given by topic keywords (learnable by a tiny model)."""
    rng = random.Random(seed)
    labels = sorted(TOPICS)
    with open(path, "w") as f:
        for i in range(n):
            label = labels[i % len(labels)]
            words = rng.sample(TOPICS[label], 2) + rng.sample(FILLER, 3)
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": label, "user": f"u{i % 6}"}) + "\n")
    return path


def write_qa(path: Path, n: int = 120) -> Path:
    """JSONL of prompt/response pairs for causal-LM tests."""
    with open(path, "w") as f:
        for i in range(n):
            q, a = QA[i % len(QA)]
            f.write(json.dumps({"prompt": q, "response": a}) + "\n")
    return path


def tiny_overrides(data_path: Path, out_dir: Path, **extra: object) -> list[str]:
    """--set overrides for a fast run on tiny-bert with the synthetic classification data."""
    sets = {
        "run.name": "tiny", "model.name": "tiny-bert", "model.max_length": 48, "model.tiny_hidden_size": 64,
        "data.source": "file", "data.path": str(data_path), "data.num_clients": 3, "data.partition": "iid",
        "data.eval_fraction": 0.25, "train.local_steps": 10, "train.batch_size": 8, "train.lr": 0.03,
        "federation.rounds": 3, "output.dir": str(out_dir), "output.plots": False, "adapter.r": 4,
        # exact fp32 arithmetic, which many tests compare against; the default (auto: bf16 on a CPU with native
        # bf16) has its own tests in test_training_precision.py
        "train.precision": "fp32",
    }
    sets.update(extra)
    return [f"{k}={json.dumps(v)}" for k, v in sets.items()]


@pytest.fixture
def cls_data(tmp_path: Path) -> Path:
    return write_classification(tmp_path / "topics.jsonl")


@pytest.fixture
def qa_data(tmp_path: Path) -> Path:
    return write_qa(tmp_path / "qa.jsonl")


@pytest.fixture
def tiny_cfg(cls_data: Path, tmp_path: Path):
    """A factory: tiny_cfg(**{"section.key": value}) -> Config for a fast tiny-bert run."""

    def make(**extra: object) -> config.Config:
        return config.load(None, tiny_overrides(cls_data, tmp_path / "runs", **extra))

    return make


class Interrupted(Exception):
    """Raised inside a run to simulate a crash."""


def interrupt_and_resume(cfg: config.Config, crash_round: int, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run ``cfg``, crash at the start of ``crash_round``, then ``simulate --resume``; returns the run dir."""
    from fedpeft import report
    from fedpeft.server import loop
    from fedpeft.simulation import runner

    original = loop.FederatedServer.run_round

    def crash(self, grid, rnd):
        if rnd == crash_round:
            raise Interrupted()
        return original(self, grid, rnd)

    monkeypatch.setattr(loop.FederatedServer, "run_round", crash)
    cfg, run_dir = runner.prepare(cfg)
    with pytest.raises(Interrupted):
        runner.execute(cfg, run_dir)
    assert len(report.read_metrics(run_dir)) == crash_round - 1
    monkeypatch.setattr(loop.FederatedServer, "run_round", original)
    runner.simulate(resume=run_dir)
    return run_dir


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test (tiny models run faster without contention)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker keeps to one core of its own (``gw0`` the first, ``gw1`` the second, ...), and so do the
    processes it starts: torch's threads of one worker never contend with the other's (fedpeft sizes its
    threads by the cores a process may use)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker.startswith("gw") and len(cores) > 1:
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})
        import torch

        torch.set_num_threads(1)
