"""SCAFFOLD vs FedAvg on a label-skewed split (MiniLM + BBC News, 8 clients, Dirichlet 0.3; simulations/noniid.toml
with its split and aggregation overridden): final server accuracy, both with plain SGD local steps at one constant
learning rate (SCAFFOLD's option-II control variates assume them), the same seeds, side by side in one run; uplink
and downlink bytes of the whole run (SCAFFOLD's downlink adds the dense control variate; its uplink is FedAvg's).

Usage: python benchmarks/bench_scaffold.py [--seeds 0,1,2] [--lr 0.1] [--set federation.rounds=6 ...] [--no-append]
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

SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "noniid.toml"
SPLIT = ["data.dirichlet_alpha=0.3", "federation.clients_per_round=0", "federation.server_lr=1.0",
         'train.optimizer="sgd"', 'train.schedule="constant"']
ARMS = {"fedavg": ['federation.strategy="fedavg"'], "scaffold": ['federation.strategy="scaffold"']}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--lr", type=float, default=0.1, help="SGD learning rate of both arms")
    ap.add_argument("--set", action="append", default=[], help="extra overrides (shorter runs)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, acc = [], {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for arm, sets in ARMS.items():
                cfg = config.load(SCENARIO, [f'output.dir="{tmp}"', "output.plots=false", f"run.seed={seed}",
                                             f"train.lr={args.lr}", *SPLIT, *args.set, *sets])
                metrics = report.read_metrics(runner.simulate(cfg))
                last = metrics[-1]
                acc[arm].append(last["eval_accuracy"])
                rows.append([seed, arm, f"{last['eval_accuracy']:.3f}",
                             f"{sum(r['bytes_up'] for r in metrics) / 1e6:.2f}",
                             f"{sum(r['bytes_down'] for r in metrics) / 1e6:.2f}", f"{last['elapsed']:.0f}"])
                print(rows[-1], flush=True)
    mean = {arm: sum(v) / len(v) for arm, v in acc.items()}
    body = (f"Settings: {SCENARIO.name} with {' '.join(SPLIT)} train.lr={args.lr} {' '.join(args.set)}; "
            f"seeds {args.seeds}.\n\n"
            + table(["seed", "strategy", "accuracy", "MB up", "MB down", "s"], rows)
            + "\n\nMean accuracy: " + ", ".join(f"{a} {m:.3f}" for a, m in mean.items())
            + f". SCAFFOLD - FedAvg: {100 * (mean['scaffold'] - mean['fedavg']):+.1f} points.\n")
    print(body)
    if not args.no_append:
        append_results("SCAFFOLD vs FedAvg, Dirichlet 0.3 (bench_scaffold.py)", body)


if __name__ == "__main__":
    main()
