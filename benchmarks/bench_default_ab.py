"""A/B of the embedded default against the same run with ``--set`` overrides, seed by seed (issue 21): is a
faster setting still as accurate? Each arm is a whole ``fedpeft simulate -q`` process, the arms interleaved
per seed and run one after the other (run it alone: two torch processes on 2 cores distort each other).

Prints, per seed and arm, the accuracy after each round, the rounds' seconds and the command's wall time,
then the means and the B/A ratios. Extra ``--base`` overrides apply to both arms (say so when you quote a
shortened run).

Usage: python benchmarks/bench_default_ab.py --b model.attention_dropout=0 [--seeds 0 1 2]
       [--base federation.rounds=1 ...] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, table  # noqa: E402


def run(overrides: list[str], out: Path) -> tuple[list[dict], float]:
    """One ``fedpeft simulate -q`` process: its metrics rows and its wall seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    args = [sys.executable, "-c", "from fedpeft.cli import main; raise SystemExit(main())", "simulate", "-q",
            "--set", f"output.dir={out}"]
    for o in overrides:
        args += ["--set", o]
    start = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    (metrics,) = out.glob("*/metrics.jsonl")
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--b", nargs="+", required=True, help="overrides of arm B (arm A: none)")
    ap.add_argument("--base", nargs="*", default=[], help="overrides of both arms")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    arms = {"A (default)": list(args.base), "B " + " ".join(args.b): [*args.base, *args.b]}
    rows, final, rounds, walls = [], {a: [] for a in arms}, {a: [] for a in arms}, {a: [] for a in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for arm, overrides in arms.items():
                metrics, wall = run([*overrides, f"run.seed={seed}"], Path(tmp) / f"{seed}-{len(final[arm])}-{arm[0]}")
                acc = [r["eval_accuracy"] for r in metrics]
                secs = [r["seconds"] for r in metrics]
                final[arm].append(acc[-1])
                rounds[arm] += secs
                walls[arm].append(wall)
                rows.append([seed, arm, " -> ".join(f"{a:.4f}" for a in acc), " / ".join(f"{s:.1f}" for s in secs),
                             f"{wall:.1f}"])
                print(rows[-1], flush=True)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    (a, b) = arms
    summary = [[arm, f"{mean(final[arm]):.4f}", f"{mean(rounds[arm]):.1f}", f"{mean(walls[arm]):.1f}"] for arm in arms]
    summary.append(["B / A", f"{100 * (mean(final[b]) - mean(final[a])):+.2f} points",
                    f"{mean(rounds[b]) / mean(rounds[a]):.2f}x", f"{mean(walls[b]) / mean(walls[a]):.2f}x"])
    body = (table(["seed", "arm", "accuracy after each round", "round s", "command wall s"], rows) + "\n\n"
            + table(["arm", "mean final accuracy", "mean round s", "mean command wall s"], summary)
            + f"\n\nBoth arms: `fedpeft simulate -q` with {args.base or 'no other overrides'}; seeds {args.seeds}.")
    print(body)
    if not args.no_append:
        append_results(f"Embedded default A/B: {' '.join(args.b)} (bench_default_ab.py)", body)


if __name__ == "__main__":
    main()
