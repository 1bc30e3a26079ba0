"""``fedpeft audit --capture``: the attacks run on the updates a real federated run sends.

Tiny-llama (no dropout) with LoRA r=16 on q/k/v, one SGD step on one example per round: after round 1
(B != 0) the span attack reads the client's bag of tokens from the decoded update. Private examples are
random printable characters, so two examples share little beyond the public "Question:/Answer:"
template and a high F1 against the *drawn* example also checks that the sampler was replayed right.
"""

from __future__ import annotations

import csv
import json
import math
import random
import string
from pathlib import Path

import pytest
import torch

from fedpeft import cli, config, report
from fedpeft.audit import capture

from conftest import tiny_overrides

FAST = ["span", "subspace_opt"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is faster


def _private_qa(path: Path, n: int = 80, seed: int = 0) -> Path:
    """Prompt/response pairs of random printable characters (little token overlap between examples)."""
    rng = random.Random(seed)
    chars = string.ascii_letters + string.digits + string.punctuation
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": "".join(rng.choices(chars, k=12)),
                                "response": "".join(rng.choices(chars, k=8))}) + "\n")
    return path


def _sets(tmp_path: Path, **extra: object) -> list[str]:
    base = {"model.name": "tiny-llama", "model.task": "causal_lm", "model.tiny_hidden_size": 128,
            "adapter.r": 16, "adapter.target_modules": ["q_proj", "k_proj", "v_proj"], "train.batch_size": 1,
            "train.local_steps": 1, "train.optimizer": "sgd", "train.lr": 0.5, "train.max_grad_norm": 0.0,
            "train.max_eval_examples": 8, "federation.rounds": 2, **extra}
    return tiny_overrides(_private_qa(tmp_path / "private.jsonl"), tmp_path / "runs", **base)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run_dir / "audit.csv")))


def test_replayed_sampler_draws_what_the_client_trained_on(tmp_path: Path) -> None:
    """drawn_indices == the indices train_local actually read (batch 2, 3 steps, multi-epoch)."""
    from fedpeft.runtime import get_runtime
    from fedpeft.training import client_seed, train_local

    cfg = config.load(None, _sets(tmp_path, **{"train.batch_size": 2, "train.local_steps": 3}))
    rt = get_runtime(cfg)
    data = rt.client_dataset(1)
    read: list[int] = []

    class Spy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> dict:
            read.append(i)
            return data[i]

    train_local(rt.model, Spy(), rt.collate, cfg.train, torch.device("cpu"), seed=client_seed(cfg.run.seed, 4, 1))
    assert capture.drawn_indices(cfg, 4, 1, len(data)) == list(dict.fromkeys(read))
    assert capture.drawn_indices(cfg, 5, 1, len(data)) != list(dict.fromkeys(read))


def test_undefended_run_fails_on_the_clients_real_text(tmp_path: Path) -> None:
    cfg = config.load(None, _sets(tmp_path))
    seen: list[tuple[int, int, str]] = []
    run_dir = capture.audit_run(cfg, FAST, rounds=[2], on_update=lambda i, n, r: seen.append((i, n, r["verdict"])))
    rows = _rows(run_dir)
    assert [(int(r["round"]), int(r["client"])) for r in rows] == [(2, 0), (2, 1), (2, 2)]
    assert seen == [(0, 3, "fail"), (1, 3, "fail"), (2, 3, "fail")]
    for r in rows:
        assert r["truth"] == "drawn" and r["examples"] == "1" and r["best_attack"] == "span"
        assert float(r["chance"]) < float(r["baseline"]) < 1  # the other clients' template tokens, not uniform
        assert r["verdict"] == "fail" and float(r["token_f1"]) >= 0.9, r
        assert math.isinf(float(r["epsilon"]))
    metrics = report.read_metrics(run_dir)
    assert int(rows[0]["payload_bytes"]) == (metrics[1]["bytes_up"] - metrics[1]["up_framing"]) // 3
    md = (run_dir / "audit.md").read_text()
    assert md.count("**fail**") == 3 and "drawn" in md and "Legend" in md and "no DP" in md


def test_local_dp_run_passes(tmp_path: Path) -> None:
    """The same run with local DP-SGD at noise multiplier 1: every update is at chance."""
    cfg = config.load(None, _sets(tmp_path, **{"privacy.mode": "local", "privacy.noise_multiplier": 1.0,
                                               "privacy.release_client_metrics": True}))
    run_dir = capture.audit_run(cfg, FAST, rounds=[2])
    rows = _rows(run_dir)
    assert len(rows) == 3
    eps_run = max(m["epsilon_local"] for m in report.read_metrics(run_dir))
    for r in rows:
        assert r["truth"] == "partition" and int(r["examples"]) == 20
        assert r["verdict"] == "pass" and float(r["token_f1"]) < 0.3, r
        assert 0 < float(r["epsilon"]) <= eps_run


def test_cli_capture_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sets = _sets(tmp_path, **{"output.plots": True, "compression.uplink": "compeft:0.3"})
    argv = ["audit", "--capture", "--attacks", ",".join(FAST), "--rounds", "2", "--clients", "0,2"]
    code = cli.main([*argv, *(a for s in sets for a in ("--set", s))])
    assert code == 0
    run_dir = Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["audit_dir"])
    for name in ("audit.md", "audit.csv", "audit.png", "metrics.jsonl"):
        assert (run_dir / name).stat().st_size > 0, name
    rows = _rows(run_dir)
    assert [(r["round"], r["client"]) for r in rows] == [("2", "0"), ("2", "2")]
    assert all(float(r["density"]) == 0.3 and int(r["payload_bytes"]) < int(r["dense_bytes"]) for r in rows)
    for r in rows:  # ComPEFT top-30%: the exact span test fails, a ranking still beats chance (measured 2.6-3x)
        assert r["verdict"] in ("fail", "warn", "pass") and float(r["top_true"]) > 2 * float(r["chance"]), r
    assert "compeft:0.3" in (run_dir / "audit.md").read_text()


def test_cli_capture_rejects_a_grid_before_running(tmp_path: Path) -> None:
    sets = [a for s in _sets(tmp_path) for a in ("--set", s)]
    code = cli.main(["audit", "--capture", "--grid", "batch_size=1", *sets])
    assert code == 2
    assert not (tmp_path / "runs").exists()


def test_capture_refuses_split_learning_runs(tiny_cfg):
    from fedpeft.errors import ConfigError
    cfg = tiny_cfg(**{"split.enabled": True, "model.tiny_layers": 4})
    with pytest.raises(ConfigError, match="smashed"):
        capture.check(cfg)


def test_a_round_without_the_selected_client_falls_back_to_its_lowest_partition() -> None:
    """Client sampling (100 of 500) rarely draws partition 0: the frontier's attacked round must not go empty."""
    from fedpeft.audit.capture import Recorder
    from fedpeft.server.loop import ObservedUpdate

    def upd(rnd: int, pid: int) -> ObservedUpdate:
        return ObservedUpdate(round=rnd, node=100 + pid, partition_id=pid, start_state={}, delta={}, metrics={})

    strict, fallback = Recorder(rounds=[2], clients=[0]), Recorder(rounds=[2], clients=[0], fallback=True)
    for rec in (strict, fallback):
        for u in (upd(1, 0), upd(1, 4), upd(2, 5), upd(2, 3), upd(2, 7)):
            rec(u)
        rec.finish()
    assert strict.captured == []  # partition 0 took part in round 1 only
    assert [(c.update.round, c.update.partition_id) for c in fallback.captured] == [(2, 3)]
    both = Recorder(rounds=[1], clients=[0], fallback=True)
    for u in (upd(1, 4), upd(1, 0)):
        both(u)
    both.finish()  # the selected client took part: no fallback added
    assert [(c.update.round, c.update.partition_id) for c in both.captured] == [(1, 0)]
