"""The ``fedpeft`` command. Parses arguments and calls library functions; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from fedpeft import config, report
from fedpeft.errors import FedPeftError

console = Console(stderr=True)


def _scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", nargs="?", help="scenario TOML (default: the embedded quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set federation.rounds=5 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpeft", description="Federated parameter-efficient fine-tuning on Flower.")
    p.add_argument("-v", "--verbose", action="store_true", help="log every round and library detail")
    sub = p.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federated scenario on this machine")
    _scenario_args(sim)
    sim.add_argument("--engine", choices=("inprocess", "ray"), help="override run.engine")
    sim.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    cmp = sub.add_parser("compare-compression", help="run a scenario once per codec and compare bytes and accuracy")
    _scenario_args(cmp)
    cmp.add_argument("--codecs", help="comma-separated codec specs, e.g. none,fp16,int8,topk:0.1,compeft:0.1 "
                                      "(a codec's key=value options follow it: compeft:0.05,scale=std); "
                                      "default: compression.sweep")
    cmp.add_argument("--both-directions", action="store_true", help="apply each codec to the downlink too")
    cfg = sub.add_parser("config", help="print the resolved configuration (TOML) and exit")
    _scenario_args(cfg)
    cfg.add_argument("--reference", action="store_true", help="print the reference of every key (markdown)")
    return p


def _round_line(row: dict[str, Any], total: int) -> str:
    parts = [f"[bold]round {row['round']}/{total}[/]", f"clients {row['replies']}/{row['sampled']}"]
    if row.get("train_loss") is not None:
        parts.append(f"train loss {row['train_loss']:.4f}")
    for key, label in (("eval_accuracy", "eval acc"), ("eval_loss", "eval loss"), ("eval_perplexity", "ppl")):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.4f}")
    for key, label in (("epsilon_client", "ε client"), ("epsilon_local", "ε local")):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.3g}")
    parts.append(f"up {report.human_bytes(row['bytes_up'])} down {report.human_bytes(row['bytes_down'])}")
    parts.append(f"{row['seconds']:.1f} s")
    return " | ".join(parts)


def _watch(path: Path, total: int, stop: threading.Event, seen: int) -> None:
    """Print each new metrics row as it is appended (works for every engine)."""
    while True:
        done = stop.is_set()
        rows = report.read_metrics(path.parent) if path.exists() else []
        for row in rows[seen:]:
            console.print(_round_line(row, total))
        seen = max(seen, len(rows))
        if done:
            return
        stop.wait(0.5)


def _summary_table(run_dir: Path) -> Table:
    rows = report.read_metrics(run_dir)
    cols = [c for c in report.ROUND_COLUMNS if any(r.get(c) is not None for r in rows)]
    table = Table(title=f"run {run_dir.name}")
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[report.human_bytes(r[c]) if c.startswith("bytes") else report.fmt(r.get(c)) for c in cols])
    return table


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedpeft.simulation import runner

    cfg = None if args.resume else config.load(args.scenario, args.overrides)
    cfg, run_dir = runner.prepare(cfg, args.resume)
    done_rounds = len(report.read_metrics(run_dir))
    console.print(f"run directory [bold]{run_dir}[/] · model {cfg.model.name} · {cfg.adapter.type} · "
                  f"{cfg.data.num_clients} clients · {cfg.federation.rounds} rounds · engine "
                  f"{args.engine or cfg.run.engine}")
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(run_dir / "metrics.jsonl", cfg.federation.rounds, stop,
                                                    done_rounds), daemon=True)
    watcher.start()
    try:
        with console.status("loading model and data, training ..."):
            runner.execute(cfg, run_dir, resume=args.resume is not None, engine=args.engine)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]; continue with: fedpeft simulate --resume {run_dir}")
        return 130
    finally:
        stop.set()
        watcher.join()
    console.print(_summary_table(run_dir))
    console.print(f"adapter, metrics and report in [bold]{run_dir}[/]")
    print(json.dumps({"run_dir": str(run_dir)}))
    return 0


def split_codecs(text: str) -> list[str]:
    """'none,compeft:0.05,scale=std,int8' -> ['none', 'compeft:0.05,scale=std', 'int8']."""
    specs: list[str] = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        if "=" in token and specs:
            specs[-1] += "," + token
        else:
            specs.append(token)
    return specs


def cmd_compare_compression(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedpeft.simulation.sweep import compare_compression

    cfg = config.load(args.scenario, args.overrides)
    codecs = split_codecs(args.codecs) if args.codecs else list(cfg.compression.sweep)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task(f"codecs ({codecs[0]} first)", total=len(codecs))

        def done(row: dict[str, Any]) -> None:
            acc = report.fmt(row["final_accuracy"])
            ratio = report.fmt(row["ratio_vs_fp32"], 3)
            progress.console.print(f"{row['codec']}: up {report.human_bytes(row['uplink_bytes_per_round'])}/round "
                                   f"({ratio}x smaller than fp32), final accuracy {acc}")
            progress.advance(task)

        sweep_dir = compare_compression(cfg, codecs, args.both_directions, on_done=done)
    console.print((sweep_dir / "compression.md").read_text())
    console.print(f"sweep written to [bold]{sweep_dir}[/]")
    print(json.dumps({"sweep_dir": str(sweep_dir)}))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        rows = [[f"`{k}`", t, f"`{d}`", h.replace("|", "/")] for k, t, d, h in config.describe()]
        print(report.markdown_table(["key", "type", "default", "meaning"], rows), end="")
        return 0
    print(config.load(args.scenario, args.overrides).to_toml())
    return 0


COMMANDS = {"simulate": cmd_simulate, "compare-compression": cmd_compare_compression, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedpeft`` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    try:
        return COMMANDS[args.command](args)
    except FedPeftError as e:
        console.print(f"[red]error:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
