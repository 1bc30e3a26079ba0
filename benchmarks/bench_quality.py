"""Quality on the embedded default (MiniLM-L6 + LoRA r8, BBC News, 4 clients, 3 rounds x 15 steps).

- compression: `compare-compression` over codecs; bytes per round, ratio vs fp32, accuracy vs `none`.
  Target: compeft p=0.1 with error feedback within 1 accuracy point of `none` at >= 20x fewer uplink
  bytes than fp32.
- seeds: the same codecs for several seeds (another partition, eval split and adapter init each); the
  accuracy difference to `none` per seed, its mean and its worst case (one seed is not a verdict: the
  eval set has 454 examples, one point is 4.5 of them).
- privacy: accuracy at local DP-SGD target epsilon 1, 3, 8 (over the whole run, delta 1e-4) and without DP.

Usage: python benchmarks/bench_quality.py [--only compression,seeds,privacy] [--codecs ...] [--seeds 0,1,2]
       [--set k=v] [--no-append]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from common import append_results, table  # noqa: E402

from fedpeft import config, report  # noqa: E402
from fedpeft.simulation import runner  # noqa: E402
from fedpeft.simulation.sweep import compare_compression, split_codecs  # noqa: E402

CODECS = "none,fp16,int8,topk:0.1,compeft:0.1,compeft:0.1,alpha=1.5,compeft:0.05,compeft:0.05,alpha=1.5"


def bench_compression(codecs: list[str], out: Path, sets: list[str]) -> tuple[str, Path | None]:
    """The sweep's table, and the run directory of the `none` codec (the no-DP baseline below)."""
    cfg = config.load(None, [f"output.dir=\"{out}\"", "output.plots=false", *sets])
    sweep = compare_compression(cfg, codecs, on_done=lambda r: print(r["codec"], r["final_accuracy"], flush=True))
    text = (sweep / "compression.md").read_text().split("\n", 2)[2]
    none = next((p for p in (sweep / "runs").iterdir() if p.name.startswith("none-")), None)
    return "Embedded default, uplink codec varied (downlink fp32), error feedback on.\n\n" + text, none


def bench_seeds(codecs: list[str], seeds: list[int], out: Path, sets: list[str]) -> str:
    """Accuracy difference to `none` per seed, mean and worst, beside the uplink ratio vs fp32."""
    if "none" not in codecs:
        codecs = ["none", *codecs]
    acc: dict[str, list[float]] = {c: [] for c in codecs}
    ratio: dict[str, list[float]] = {c: [] for c in codecs}
    for seed in seeds:
        cfg = config.load(None, [f"output.dir=\"{out}\"", "output.plots=false", *sets, f"run.seed={seed}"])
        sweep = compare_compression(
            cfg, codecs, on_done=lambda r, seed=seed: print(seed, r["codec"], r["final_accuracy"], flush=True))
        with open(sweep / "compression.csv") as f:
            for r in csv.DictReader(f):
                acc[r["codec"]].append(float(r["final_accuracy"]))
                ratio[r["codec"]].append(float(r["ratio_vs_fp32"]))
    rows = []
    for c in codecs:
        diffs = [100 * (a - b) for a, b in zip(acc[c], acc["none"])]
        rows.append([c, f"{min(ratio[c]):.1f}x", *(f"{a:.4f} ({d:+.1f})" for a, d in zip(acc[c], diffs)),
                     f"{statistics.mean(diffs):+.1f}", f"{min(diffs):+.1f}"])
    header = ["uplink codec", "vs fp32 (min)", *(f"seed {s}: accuracy (pt vs none)" for s in seeds),
              "mean pt vs none", "worst pt vs none"]
    return (f"Embedded default, uplink codec varied (downlink fp32), error feedback on; seeds {seeds}.\n\n"
            + table(header, rows))


def bench_privacy(out: Path, no_dp_run: Path | None) -> str:
    """``no_dp_run``: a finished run of the same default config without DP (identical, so it is reused)."""
    rows = []
    for eps in (1.0, 3.0, 8.0, 0.0):
        sets = [f"output.dir=\"{out}\"", "output.plots=false", "privacy.delta=1e-4"]
        if eps:
            sets += ["privacy.mode=\"local\"", f"privacy.target_epsilon={eps}", "privacy.max_grad_norm=1.0"]
        cfg = config.load(None, sets)
        run_dir = no_dp_run if (not eps and no_dp_run) else runner.simulate(cfg)
        metrics = report.read_metrics(run_dir)
        last = metrics[-1]
        rows.append([f"{eps:g}" if eps else "inf (no DP)", f"{last.get('epsilon_local', float('inf')):.3g}",
                     f"{last['eval_accuracy']:.4f}", f"{last['eval_loss']:.4f}",
                     f"{sum(r['seconds'] for r in metrics):.0f}"])
        print(rows[-1], flush=True)
    return ("Local DP-SGD (Opacus, per-example clip 1.0, noise calibrated to the target epsilon over "
            "3 rounds x 15 steps, delta 1e-4; epsilon per client over the whole run), embedded default.\n\n"
            + table(["target epsilon", "reported epsilon", "final accuracy", "final eval loss", "train s"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="compression,privacy", help="any of compression,seeds,privacy")
    ap.add_argument("--codecs", default=CODECS)
    ap.add_argument("--seeds", default="0,1,2", help="seeds for --only seeds")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="extra setting for the compression sweep, e.g. run.threads=1 on a busy machine")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        parts, none_run = [], None
        if "compression" in args.only:
            text, none_run = bench_compression(split_codecs(args.codecs), Path(d), args.overrides)
            parts.append("### Compression sweep\n\n" + text)
        if "seeds" in args.only:
            seeds = [int(x) for x in args.seeds.split(",")]
            parts.append("### Compression across seeds\n\n"
                         + bench_seeds(split_codecs(args.codecs), seeds, Path(d), args.overrides))
        if "privacy" in args.only:
            parts.append("### Utility vs epsilon\n\n" + bench_privacy(Path(d), none_run))
    body = "\n\n".join(parts)
    print(body)
    if not args.no_append:
        append_results("Quality on the embedded default: compression sweep, utility vs epsilon", body)


if __name__ == "__main__":
    main()
