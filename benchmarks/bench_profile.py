"""Where the embedded default's wall time goes (issue 21): one in-process ``fedpeft simulate`` with each phase
timed by a wrapper around the function that does it.

Phases: imports (torch, transformers, peft, Flower and fedpeft's apps), data loading, tokenizer, model load
(base model + adapter), tokenization, local training (every client's steps), evaluation (the server's held-out
set), aggregation, checkpoints, the final adapter and report; "other" is the rest of the run (Flower messages,
codecs, sampling, metrics). Pass --set overrides to profile a shorter run (say so when you quote it).

Usage: python benchmarks/bench_profile.py [--set federation.rounds=1 ...] [--no-append]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from common import append_results, table  # noqa: E402

SPENT: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def timed(owner: object, name: str, phase: str) -> None:
    """Replace ``owner.name`` by a wrapper that adds its wall time to ``phase`` (outermost call only)."""
    inner: Callable = getattr(owner, name)
    active = {"depth": 0}

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        active["depth"] += 1
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            active["depth"] -= 1
            if active["depth"] == 0:
                SPENT[phase] += time.perf_counter() - t0
                CALLS[phase] += 1

    setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()

    t_start = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from fedpeft import config, data, export, models, report
    from fedpeft.clients import app as client_module
    from fedpeft.server import app as server_module  # noqa: F401
    from fedpeft.server import checkpoint, loop
    from fedpeft.simulation import runner
    SPENT["imports"] = time.perf_counter() - t_start

    timed(data, "load_examples", "data loading")
    timed(models, "load_tokenizer", "tokenizer")
    timed(models, "load_base_model", "model load")
    timed(models, "build_peft_model", "model load")
    timed(data, "tokenize", "tokenization")
    timed(client_module, "train_local", "local training")
    timed(loop, "evaluate", "evaluation")
    timed(loop.FederatedServer, "_aggregate", "aggregation")
    timed(checkpoint, "save", "checkpoints")
    timed(export, "save_run_adapter", "adapter + report")
    timed(report, "write_run_report", "adapter + report")

    with tempfile.TemporaryDirectory() as out:
        cfg = config.load(None, [*args.overrides, f"output.dir={out}"])
        t_run = time.perf_counter()
        run_dir = runner.simulate(cfg)
        run_s = time.perf_counter() - t_run
        rows_m = report.read_metrics(run_dir)
    total = time.perf_counter() - t_start
    other = run_s - sum(v for k, v in SPENT.items() if k != "imports")
    order = ["imports", "data loading", "tokenizer", "model load", "tokenization", "local training", "evaluation",
             "aggregation", "checkpoints", "adapter + report"]
    rows = [[k, CALLS.get(k, 1) if k != "imports" else 1, f"{SPENT[k]:.2f}", f"{100 * SPENT[k] / total:.1f}"]
            for k in order if k in SPENT]
    rows.append(["other (Flower messages, codecs, sampling, metrics)", "-", f"{other:.2f}",
                 f"{100 * other / total:.1f}"])
    rows.append(["total (imports + run)", "-", f"{total:.2f}", "100.0"])
    acc = [r.get("eval_accuracy") for r in rows_m]
    body = table(["phase", "calls", "wall s", "%"], rows)
    body += (f"\n\nSettings: the embedded default{' with ' + ', '.join(args.overrides) if args.overrides else ''}; "
             f"torch threads {torch.get_num_threads()}; eval accuracy per round {acc}.")
    print(body)
    if not args.no_append:
        append_results("Profile of the embedded default (bench_profile.py)", body)


if __name__ == "__main__":
    main()
