"""The virtual clock and FedBuff on MiniLM + BBC News (docs/virtual-clock.md).

- overhead: the clock's own work (serializing each message to count its bytes, the time model, the event
  log) measured inside one clocked run of the embedded default, as a share of that run's wall time; and the
  wall time of the same run with the clock off, side by side. Target: <= 5 %.
- codecs: compare-compression on the clock (Pareto(1) compute slowdowns, 1 Mbit/s up, 10 Mbit/s down):
  simulated time to the target accuracy per codec. Target: compeft:0.05 with Fisher selection >= 10x faster
  than fp32 to 0.85.
- fedbuff: synchronous FedAvg against FedBuff (K = half the clients, all in flight) on the same devices:
  simulated time for FedBuff to reach the synchronous final accuracy minus 1 point. Target: <= 50 %.

Usage: python benchmarks/bench_clock.py [--only overhead,codecs,fedbuff] [--set k=v ...] [--no-append]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from common import append_results, table  # noqa: E402

from fedpeft import config, report  # noqa: E402
from fedpeft.simulation import clocked, runner  # noqa: E402
from fedpeft.simulation.sweep import compare_compression, split_codecs  # noqa: E402

# the federation of phones; --set overrides these
DEVICES = ["devices.clock=true", "devices.slowdown=\"pareto:1\"", "network.uplink_mbps=\"fixed:1\"",
           "network.downlink_mbps=\"fixed:10\"", "network.latency_ms=\"fixed:50\""]


def _timed(cls: type, name: str, totals: dict[str, float]) -> Callable[[], None]:
    """Wrap ``cls.name`` to add its wall time to ``totals[name]``; returns the undo."""
    original = getattr(cls, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

    setattr(cls, name, wrapper)
    return lambda: setattr(cls, name, original)


def bench_overhead(out: Path, sets: list[str]) -> str:
    """The clock's own seconds inside a clocked run (delivery less the client's work, plus the log)."""
    base = [f"output.dir=\"{out}\"", "output.plots=false", *sets]
    t0 = time.perf_counter()
    runner.simulate(config.load(None, base))
    off = time.perf_counter() - t0
    totals: dict[str, float] = {}
    undo = [_timed(clocked.ClockedGrid, n, totals) for n in ("_deliver", "call", "_log")]
    try:
        t0 = time.perf_counter()
        runner.simulate(config.load(None, [*base, *DEVICES]))
        on = time.perf_counter() - t0
    finally:
        for u in undo:
            u()
    own = totals["_deliver"] - totals["call"] + totals["_log"]
    rows: list[list[object]] = [["clock off", f"{off:.1f}", "-", "-"],
                                ["clock on", f"{on:.1f}", f"{own:.3f}", f"{100 * own / on:.2f} %"]]
    return ("Embedded default (" + (", ".join(sets) or "as shipped") + "). The clock's own time is measured inside "
            "the clocked run (message delivery less the ClientApp's work, plus the event log); the wall times of "
            "the two runs differ also by machine load.\n\n"
            + table(["run", "wall s", "clock's own s", "share of wall"], rows))


def bench_codecs(out: Path, sets: list[str], codecs: list[str]) -> str:
    """Simulated time to the target accuracy per codec, and to the accuracy every codec reached."""
    cfg = config.load(None, [f"output.dir=\"{out}\"", "output.plots=false", *DEVICES, *sets])
    sweep = compare_compression(cfg, codecs, on_done=lambda r: print(r["codec"], r["final_accuracy"],
                                                                     r["time_to_target_s"], flush=True))
    with open(sweep / "compression.csv") as f:
        runs = {r["codec"]: report.read_metrics(Path(r["run_dir"])) for r in csv.DictReader(f)}
    common_acc = min(rows[-1]["eval_accuracy"] for rows in runs.values())
    out_rows: list[list[str]] = []
    for spec in codecs:
        rows = runs[spec]
        per_round = rows[-1]["sim_time"] / len(rows)
        out_rows.append([spec, f"{sum(r['bytes_up'] for r in rows) / len(rows) / 1e3:.0f}", f"{per_round:.1f}",
                         f"{rows[-1]['eval_accuracy']:.4f}", _fmt(report.time_to_target(rows, 0.85)),
                         _fmt(report.time_to_target(rows, common_acc))])
    t = {r[0]: r for r in out_rows}
    ratio = ""
    if "none" in t and len(out_rows) > 1:
        other = out_rows[-1]
        ratio = (f"\n\nSimulated time per round, fp32 / {other[0]}: "
                 f"{float(t['none'][2]) / float(other[2]):.2f}x; to accuracy {common_acc:.4f} (reached by all): "
                 + (f"{float(t['none'][5]) / float(other[5]):.2f}x" if "-" not in (t['none'][5], other[5]) else "-"))
    return (f"Clock: {', '.join(DEVICES[1:])}; " + (", ".join(sets) or "embedded default") + ".\n\n"
            + table(["uplink codec", "uplink kB/round", "sim s/round", "final acc", "sim s to 0.85",
                     f"sim s to {common_acc:.4f}"], [list[object](r) for r in out_rows]) + ratio)


def bench_fedbuff(out: Path, sets: list[str], clients: int, rounds: int) -> str:
    """Synchronous FedAvg against FedBuff on the same devices."""
    base = [f"output.dir=\"{out}\"", "output.plots=false", *DEVICES, *sets]
    sync = report.read_metrics(runner.simulate(config.load(None, [*base, f"federation.rounds={rounds}"])))
    k = max(1, clients // 2)
    buffered = report.read_metrics(runner.simulate(config.load(None, [
        *base, f"federation.rounds={2 * rounds}", f"federation.buffer_size={k}"])))
    goal = sync[-1]["eval_accuracy"] - 0.01
    reached = report.time_to_target(buffered, goal)
    rows = [["sync FedAvg", rounds, f"{sync[-1]['eval_accuracy']:.4f}", f"{sync[-1]['sim_time']:.1f}",
             _fmt(report.time_to_target(sync, goal))],
            [f"FedBuff K={k}", 2 * rounds, f"{buffered[-1]['eval_accuracy']:.4f}", f"{buffered[-1]['sim_time']:.1f}",
             _fmt(reached)]]
    ratio = "-" if reached is None else f"{reached / sync[-1]['sim_time']:.2f}"
    return (f"Clock: {', '.join(DEVICES[1:])}; {clients} clients, all in flight; "
            + (", ".join(sets) or "embedded default") + f". Goal: the synchronous final accuracy - 1 point "
            f"({goal:.4f}).\n\n" + table(["run", "server updates", "final acc", "sim s total", "sim s to goal"], rows)
            + f"\n\nFedBuff's simulated time to the goal / synchronous total: {ratio}")


def _fmt(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="overhead,codecs,fedbuff")
    ap.add_argument("--codecs", default="none,compeft:0.05,select=fisher")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    sets = [f"data.num_clients={args.clients}", f"federation.rounds={args.rounds}", *args.overrides]
    parts = []
    with tempfile.TemporaryDirectory() as d:
        if "overhead" in args.only:
            parts.append("### Clock overhead\n\n" + bench_overhead(Path(d) / "overhead", args.overrides))
            print(parts[-1], flush=True)
        if "codecs" in args.only:
            parts.append("### Time to accuracy per codec\n\n" + bench_codecs(Path(d) / "codecs", sets,
                                                                              split_codecs(args.codecs)))
            print(parts[-1], flush=True)
        if "fedbuff" in args.only:
            parts.append("### FedBuff against synchronous FedAvg\n\n"
                         + bench_fedbuff(Path(d) / "fedbuff", sets, args.clients, args.rounds))
            print(parts[-1], flush=True)
    body = "\n\n".join(parts)
    if not args.no_append:
        append_results("Virtual clock: overhead, time to accuracy per codec, FedBuff vs synchronous", body)


if __name__ == "__main__":
    main()
