"""Personalization on a pathological split (simulations/one-topic-per-client.toml: MiniLM + BBC, 5 clients, one
topic each): the global model's and the personalized (federation.personalization = "finetune") accuracy on each
client's own held-out split, their mean over clients and the worst client, from the same run.

Targets (issue 19): personalized mean accuracy >= 0.90 and worst client >= 0.80.

Usage: python benchmarks/bench_personal.py [--seeds 0] [--set federation.rounds=2 ...] [--no-append]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from common import append_results, table  # noqa: E402

from fedpeft import config, report  # noqa: E402
from fedpeft.simulation import runner  # noqa: E402

SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "one-topic-per-client.toml"
PERSONAL = ['federation.evaluation="federated"', "data.client_eval_fraction=0.2",
            'federation.personalization="finetune"']


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--set", action="append", default=[], help="extra overrides (shorter runs)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds.split(","):
            cfg = config.load(SCENARIO, [f'output.dir="{tmp}"', "output.plots=false", f"run.seed={seed}", *PERSONAL,
                                         *args.set])
            last = report.read_metrics(runner.simulate(cfg))[-1]
            for prefix, model in (("fed_eval", "global"), ("personal_eval", "personal")):
                rows.append([seed, model, f"{last[f'{prefix}_accuracy']:.3f}", f"{last[f'{prefix}_client_mean']:.3f}",
                             f"{last[f'{prefix}_worst']:.3f}",
                             " ".join(f"{v:.2f}" for v in last[f"{prefix}_clients"].values())])
                print(rows[-1], flush=True)
    body = (f"Settings: {SCENARIO.name} + {' '.join(PERSONAL)} {' '.join(args.set)}; seeds {args.seeds}. "
            "Each client's own held-out split (20 % of its topic).\n\n"
            + table(["seed", "model", "accuracy (example-weighted)", "mean over clients", "worst client",
                     "per client"], rows) + "\n")
    print(body)
    if not args.no_append:
        append_results("Personalization on one topic per client (bench_personal.py)", body)


if __name__ == "__main__":
    main()
