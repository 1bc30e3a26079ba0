"""Mixed LoRA ranks (simulations/mixed-rank.toml: MiniLM + BBC, 8 clients, ranks {2, 4, 8, 16}, Dirichlet 0.3):
final server accuracy of each mixed-rank aggregator (svd, svd_delta, zeropad, stack; each also with
federation.lora_rank_weighting "rank" or "slice": "svd_delta+slice") beside every client at r = 16 (naive FedAvg),
the same seeds, side by side in one run; uplink and downlink bytes of the whole run.

Targets (issue 19): the best mixed-rank aggregator beats zeropad by >= 2 points and ends within 1 point of all
clients at r = 16.

Usage: python benchmarks/bench_mixed_rank.py [--seeds 0] [--set federation.rounds=3 ...] [--no-append]
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

SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "mixed-rank.toml"
ARMS = {"svd": ['federation.lora_aggregation="svd"'], "svd_delta": ['federation.lora_aggregation="svd_delta"'],
        "zeropad": ['federation.lora_aggregation="zeropad"'],
        "stack": ['federation.lora_aggregation="stack"'],
        "zeropad+prune": ['federation.lora_aggregation="zeropad"', "adapter.rank_prune_decay=0.5",
                          "adapter.rank_prune_threshold=0.5"],
        "all r=16": ['federation.lora_aggregation="naive"', "adapter.client_ranks=[]"]}
# rank-aware weighting (federation.lora_rank_weighting) of each mixed-rank aggregator: "svd_delta+slice", ...
ARMS.update({f"{mode}+{w}": [*ARMS[mode], f'federation.lora_rank_weighting="{w}"']
             for mode in ("svd", "svd_delta", "zeropad", "stack") for w in ("rank", "slice")})
BASELINES = ("zeropad", "zeropad+prune", "all r=16")  # not candidates for "best mixed-rank"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--set", action="append", default=[], help="extra overrides (shorter runs)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = {a: ARMS[a] for a in args.arms.split(",")}
    rows, acc = [], {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for arm, sets in arms.items():
                cfg = config.load(SCENARIO, [f'output.dir="{tmp}"', "output.plots=false", f"run.seed={seed}",
                                             *args.set, *sets])
                metrics = report.read_metrics(runner.simulate(cfg))
                last = metrics[-1]
                acc[arm].append(last["eval_accuracy"])
                ranks = sorted(last.get("lora_ranks", {}).values())
                rows.append([seed, arm, f"{last['eval_accuracy']:.3f}", f"{last.get('lora_agg_error') or 0:.3f}",
                             " ".join(map(str, ranks)) or "-",
                             f"{sum(r['bytes_up'] for r in metrics) / 1e6:.2f}",
                             f"{sum(r['bytes_down'] for r in metrics) / 1e6:.2f}", f"{last['elapsed']:.0f}"])
                print(rows[-1], flush=True)
    mean = {arm: sum(v) / len(v) for arm, v in acc.items()}
    best = max((a for a in mean if a not in BASELINES), key=lambda a: mean[a], default=None)
    body = (f"Settings: {SCENARIO.name} with {' '.join(args.set) or 'its own settings'}; seeds {args.seeds}.\n\n"
            + table(["seed", "aggregator", "accuracy", "lora_agg_error (last)", "ranks (last round)", "MB up",
                     "MB down", "s"], rows)
            + "\n\nMean accuracy: " + ", ".join(f"{a} {m:.3f}" for a, m in mean.items()) + ".")
    for other in ("zeropad", "all r=16"):
        if best is not None and other in mean:
            body += f" Best mixed-rank ({best}) - {other}: {100 * (mean[best] - mean[other]):+.1f} points."
    if "svd_delta" in mean and "svd" in mean:
        body += f" svd_delta - svd: {100 * (mean['svd_delta'] - mean['svd']):+.1f} points."
    for arm in mean:
        if "+" in arm and (plain := arm.split("+")[0]) in mean and arm != "zeropad+prune":
            body += f" {arm} - {plain}: {100 * (mean[arm] - mean[plain]):+.1f} points."
    if "zeropad+prune" in mean and "zeropad" in mean:
        body += f" Self-pruning - zeropad: {100 * (mean['zeropad+prune'] - mean['zeropad']):+.1f} points."
    body += "\n"
    print(body)
    if not args.no_append:
        append_results("Mixed LoRA ranks (bench_mixed_rank.py)", body)


if __name__ == "__main__":
    main()
