"""The ``fedpeft`` command. Parses arguments and calls library functions; no logic of its own."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from fedpeft import api, config, report
from fedpeft.cli_parser import build_parser
from fedpeft.errors import FedPeftError, error_line
from fedpeft.progress import clock_text

if TYPE_CHECKING:
    from rich.progress import Progress

console = Console(stderr=True, soft_wrap=True)  # the terminal wraps: no newlines inside paths or table rows


def _log_line(text: str, since: float) -> None:
    """A progress line for logs, ``text (m:ss this session)`` with the time since ``since`` (``time.monotonic``):
    rich draws its progress bars on a terminal only, so when the output is not one (``> run.log``) long work says
    where it is with plain lines instead."""
    if not console.is_terminal:
        console.print(f"{text} ({clock_text(time.monotonic() - since)} this session)", markup=False, highlight=False)


def _progress(unit: str = "") -> Progress:
    """The progress bar of a long command, drawn on a terminal only (off one, :func:`_log_line` writes lines)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}" + unit),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not console.is_terminal)


def _print_report(path: Path) -> None:
    """Print a markdown report as written: no rich markup (a report's ``[lo, hi]`` is text, not a style tag)."""
    console.print(path.read_text(), markup=False, highlight=False)


def _summary_table(run_dir: Path) -> Table:
    rows = report.read_metrics(run_dir)
    cols = [c for c in report.ROUND_COLUMNS if any(r.get(c) is not None for r in rows)]
    table = Table(title=f"run {run_dir.name}")
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[report.human_bytes(r[c]) if "bytes" in c and r.get(c) is not None else report.fmt(r.get(c))
                        for c in cols])
    return table


def _print_round(total: int) -> api.RoundCallback:
    """A callback printing each recorded round as one plain line (no markup: values may hold brackets)."""
    return lambda row: console.print(report.round_line(row, total), markup=False, highlight=False)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedpeft.simulation import runner

    cfg = None if args.resume else config.load(args.scenario, args.overrides)
    cfg, run_dir = runner.prepare(cfg, args.resume)
    done_rounds = len(report.read_metrics(run_dir))
    if not args.quiet:
        console.print(f"run directory [bold]{run_dir}[/] · model {cfg.model.name} · {cfg.adapter.type} · "
                      f"{cfg.data.num_clients} clients · {cfg.federation.rounds} rounds · engine "
                      f"{args.engine or cfg.run.engine}")
    try:
        with contextlib.ExitStack() as shown:
            progress = None
            if not args.quiet:  # round lines, and the clients' steps in the spinner's line (plain lines off a TTY)
                progress = shown.enter_context(api.showing(run_dir, cfg.federation.rounds, done_rounds, console))
            runner.execute(cfg, run_dir, resume=args.resume is not None, engine=args.engine, progress=progress)
    except KeyboardInterrupt:
        if (run_dir / "checkpoint" / "manifest.json").exists():
            console.print(f"[yellow]interrupted[/]; continue with: fedpeft simulate --resume {run_dir}")
        else:
            console.print(f"[yellow]interrupted[/] before the first checkpoint: nothing to resume in {run_dir}")
        return 130
    console.print(_summary_table(run_dir))
    console.print(f"adapter, metrics and report in [bold]{run_dir}[/]")
    print(json.dumps({"run_dir": str(run_dir)}))
    return 0


def cmd_compare_compression(args: argparse.Namespace) -> int:
    from fedpeft.simulation import sweep

    if args.resume is not None:
        cfg, codecs, _, finished = sweep.load_sweep(args.resume)
    else:
        cfg, finished = config.load(args.scenario, args.overrides), []
        codecs = sweep.split_codecs(args.codecs) if args.codecs else list(cfg.compression.sweep)
    rounds = cfg.federation.rounds
    with _progress(" rounds") as progress:
        task = progress.add_task(f"{len(codecs)} codec(s)", total=len(codecs) * rounds,
                                 completed=len(finished) * rounds)

        started = time.monotonic()

        def each_round(spec: str, row: dict[str, Any]) -> None:
            progress.update(task, description=f"{spec}: round {row['round']}/{rounds}",
                            completed=codecs.index(spec) * rounds + row["round"])
            _log_line(f"compare-compression: {spec} round {row['round']}/{rounds}", started)

        def done(row: dict[str, Any]) -> None:
            acc = report.fmt(row["final_accuracy"])
            ratio = report.fmt(row["ratio_vs_fp32"], 3)
            progress.console.print(f"{row['codec']}: up {report.human_bytes(row['uplink_bytes_per_round'])}/round "
                                   f"(fp32 dense / this: {ratio}x), final accuracy {acc}")

        sweep_dir = sweep.compare_compression(cfg, codecs, args.both_directions, on_done=done, on_round=each_round,
                                              resume=args.resume)
    _print_report(sweep_dir / "compression.md")
    console.print(f"sweep written to [bold]{sweep_dir}[/]")
    print(json.dumps({"sweep_dir": str(sweep_dir)}))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()] if args.attacks else None
    if (args.rounds or args.clients) and not args.capture:
        raise FedPeftError("--rounds and --clients select updates of a real run: use them with --capture")
    # The scenario is read and validated before the attack suite (torch, transformers) is imported,
    # so a bad key or value fails at once.
    if args.epsilon_lower_bound:
        return _audit_epsilon(args, config.load(args.scenario, args.overrides))
    if args.capture:
        return _audit_capture(args, config.load(args.scenario, args.overrides), attacks)
    loaded = None if args.resume is not None else config.load(args.scenario, args.overrides)

    from fedpeft.audit.grid import GRID_KEYS
    from fedpeft.audit.run import check, load_progress, run_audit

    done: list[dict[str, Any]] = []
    if loaded is None:
        cfg, cells, done = load_progress(args.resume)
    else:
        cfg, cells = check(loaded, args.grid, attacks)
    with _progress() as progress:
        task = progress.add_task(f"audit: {len(cells)} cell(s) x {cfg.audit.seeds} victim(s)",
                                 total=len(cells) * cfg.audit.seeds, completed=len(done) * cfg.audit.seeds)

        varying = [k for k in GRID_KEYS if len({str(c[k]) for c in cells}) > 1] or ["batch_size"]

        def finished(i: int, total: int, row: dict[str, Any]) -> None:
            cell = ", ".join(f"{k}={row[k]}" for k in varying)
            progress.console.print(f"[bold]{row['verdict']}[/] {escape(cell)}: F1 {row['token_f1']:.2f}, top "
                                   f"{row['top_true']:.2f} (frequency guess {row['baseline']:.2f}, chance "
                                   f"{row['chance']:.3f}), {row['seconds']:.0f} s")

        total, started = len(cells) * cfg.audit.seeds, time.monotonic()
        attacked = len(done) * cfg.audit.seeds

        def victim_done() -> None:
            nonlocal attacked
            progress.advance(task)
            attacked += 1
            _log_line(f"audit: {attacked}/{total} victims attacked", started)

        out = run_audit(cfg, cells, on_cell=finished, on_victim=victim_done, resume=args.resume)
    _print_report(out / "audit.md")
    console.print(f"audit written to [bold]{out}[/]")
    print(json.dumps({"audit_dir": str(out)}))
    return 0


def cmd_frontier(args: argparse.Namespace) -> int:
    from fedpeft.simulation import frontier

    cfg = None if args.resume else config.load(args.scenario, args.overrides)
    if args.resume and (args.scenario or args.overrides or args.grid or args.mode_set):
        raise FedPeftError("--resume continues a frontier with its own scenario, grid and settings: drop SCENARIO, "
                           "--set, --grid, --mode-set")
    cfg, out, cells, _ = frontier.prepare(cfg, args.grid, args.resume, args.canaries, args.mode_set)
    console.print(f"frontier directory [bold]{out}[/] · {len(cells)} cell(s), {frontier.remaining(out)} to run")
    with _progress(" cells") as progress:
        task = progress.add_task("frontier", total=len(cells), completed=len(cells) - frontier.remaining(out))
        started = time.monotonic()

        def start(i: int, total: int, cell: dict[str, Any]) -> None:
            progress.update(task, description=f"frontier: {cell['cell']}")
            _log_line(f"frontier: cell {i + 1}/{total} {cell['cell']} started", started)

        def done(i: int, total: int, row: dict[str, Any]) -> None:
            what = (f"accuracy {report.fmt(row['accuracy'])}, leakage {row['verdict']}, up "
                    f"{report.human_bytes(row['bytes_up_per_round'] or 0)}/round" if row["status"] == "done"
                    else row["status"])
            progress.console.print(f"{row['cell']}: {escape(what)} ({row['seconds']:.0f} s)", soft_wrap=True)
            progress.advance(task)

        try:
            frontier.run_frontier(resume=out, on_start=start, on_cell=done)
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/]; continue with: fedpeft frontier --resume {out}")
            return 130
    _print_report(out / "frontier.md")
    console.print(f"frontier written to [bold]{out}[/]")
    print(json.dumps({"frontier_dir": str(out)}))
    failed = sum(map(frontier.failed, frontier.read_rows(out)))
    if failed:
        console.print(f"[red]{failed} cell(s) failed[/] (frontier.md lists why); run them again with: fedpeft "
                      f"frontier --resume {out}")
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedpeft.export import export_merged

    out = export_merged(args.run_dir, args.out)
    console.print(f"merged model written to [bold]{out}[/]")
    print(json.dumps({"merged_dir": str(out)}))
    return 0


def cmd_split_server(args: argparse.Namespace) -> int:
    from fedpeft.split.server import run_split_server

    cfg = config.load(args.scenario, args.overrides)

    def ready(server: Any) -> None:
        console.print(f"split server for [bold]{cfg.run.name}[/] listening on {args.host}:{server.port} "
                      f"({'mutual TLS' if args.certs else 'plaintext'}); Ctrl-C to stop")
        print(json.dumps({"split_server": f"{args.host}:{server.port}"}), flush=True)

    run_split_server(cfg, args.host, args.port, args.certs, args.state_dir, save_every=args.save_every,
                     insecure=args.insecure, on_ready=ready)
    return 0


def _audit_epsilon(args: argparse.Namespace, cfg: config.Config) -> int:
    from fedpeft.audit.epsilon import (
        CLIENT_CANARIES,
        RECORD_CANARIES,
        EpsilonAudit,
        audit_client_level,
        audit_local_dpsgd,
        write_report,
    )
    from fedpeft.rundir import new_run_dir

    if cfg.privacy.mode == "none":
        raise FedPeftError("--epsilon-lower-bound audits a DP run: set privacy.mode = 'client', 'local' or 'both'")
    results: list[EpsilonAudit] = []
    started = time.monotonic()
    with _progress() as progress:
        if cfg.privacy.mode in ("client", "both"):
            k = args.canaries or CLIENT_CANARIES
            _log_line(f"epsilon audit: {cfg.federation.rounds} round(s) with {k} canary clients", started)
            task = progress.add_task(f"rounds with {k} canary clients", total=cfg.federation.rounds)
            results.append(audit_client_level(cfg, k, seed=cfg.run.seed,
                                              on_round=lambda done, total: progress.update(task, completed=done)))
        if cfg.privacy.mode in ("local", "both"):
            k = args.canaries or RECORD_CANARIES
            _log_line(f"epsilon audit: DP-SGD over {k} canary records", started)
            task = progress.add_task(f"DP-SGD steps over {k} canary records", total=1)
            results.append(audit_local_dpsgd(cfg, k, seed=cfg.run.seed,
                                             on_step=lambda done, total: progress.update(task, completed=done)))
    out = new_run_dir(cfg.output.dir, f"{cfg.run.name}-epsilon-audit")
    write_report(results, cfg, out)
    _print_report(out / "audit.md")
    verdict = "fail" if any(r.verdict == "fail" for r in results) else "pass"
    print(json.dumps({"audit_dir": str(out), "verdict": verdict,
                      "levels": {r.level: {"epsilon_lower_bound": r.bound.epsilon_lower_bound,
                                           "claimed_epsilon": r.claimed_epsilon, "verdict": r.verdict}
                                 for r in results}}))
    return 1 if verdict == "fail" else 0


def _audit_capture(args: argparse.Namespace, loaded: config.Config, attacks: list[str] | None) -> int:
    from fedpeft.audit import capture

    cfg = capture.check(loaded, attacks, args.grid)
    with console.status("running the scenario; the server keeps the updates it decodes"):
        def done(i: int, total: int, row: dict[str, Any]) -> None:
            console.print(f"[bold]{row['verdict']}[/] round {row['round']} client {row['client']} "
                          f"({i + 1}/{total}): F1 {row['token_f1']:.2f}, top {row['top_true']:.2f} "
                          f"(frequency guess {row['baseline']:.2f})")

        out = capture.audit_run(cfg, rounds=args.rounds, clients=args.clients, on_update=done)
    _print_report(out / "audit.md")
    console.print(f"audit written to [bold]{out}[/]")
    print(json.dumps({"audit_dir": str(out)}))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        rows = [[f"`{k}`", t, f"`{d}`", h.replace("|", "/")] for k, t, d, h in config.describe()]
        print(report.markdown_table(["key", "type", "default", "meaning"], rows), end="")
        return 0
    print(config.load(args.scenario, args.overrides).to_toml())
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from fedpeft import versions

    facts = versions.environment()
    if args.json:
        print(json.dumps(facts, indent=1))
    else:
        table = Table(title=f"fedpeft {facts['fedpeft']} · Python {facts['python']}", caption=facts["platform"])
        for col in ("package", "installed", "tested range", ""):
            table.add_column(col)
        for pkg in facts["packages"]:
            table.add_row(pkg["name"], pkg["installed"] or "missing", pkg["tested"],
                          "ok" if pkg["ok"] else "[red]outside the tested range[/]")
        console.print(table)
        for key, value in facts["device"].items():
            console.print(f"{key}: {value}", markup=False, highlight=False)
    bad = [p["name"] for p in facts["packages"] if not p["ok"]]
    if bad:
        console.print(f"[yellow]untested versions:[/] {', '.join(bad)} (see the README's 'Supported versions')")
    return 1 if bad else 0


def _home(args: argparse.Namespace) -> Path:
    from fedpeft.deploy import launch, submit

    home = args.flwr_home or launch.default_home()
    if hasattr(args, "superlink"):
        submit.connect(home, args.superlink, args.ca, args.insecure)
    return home


def cmd_superlink(args: argparse.Namespace) -> int:
    from fedpeft.deploy import launch

    return launch.run_superlink(args.flwr_home, host=args.host, port=args.port, certs=args.certs,
                                insecure=args.insecure, auth=args.auth, database=args.database)


def cmd_node(args: argparse.Namespace) -> int:
    from fedpeft.deploy import launch

    opts = launch.NodeOptions(args.superlink, args.data, args.partition_id, args.num_partitions, args.ca, args.key,
                              args.port, args.insecure, args.warm, args.max_wait, args.poll_interval,
                              args.rank, args.state_dir, args.max_epsilon)
    return launch.run_node(opts, args.flwr_home)


def cmd_certs(args: argparse.Namespace) -> int:
    from fedpeft import certs

    paths = certs.make_certs(args.host, args.out, args.days, args.san, args.force)
    print(json.dumps({k: str(v) for k, v in vars(paths).items()}))
    return 0


def cmd_client_cert(args: argparse.Namespace) -> int:
    from fedpeft import certs

    paths = certs.make_client_cert(args.ca_dir, args.name, args.out, args.days, args.force)
    print(json.dumps({"cert": str(paths.cert), "key": str(paths.key)}))
    return 0


def cmd_node_key(args: argparse.Namespace) -> int:
    from fedpeft import certs

    paths = certs.make_node_key(args.out, args.name, force=args.force)
    print(json.dumps({"private": str(paths.private), "public": str(paths.public)}))
    return 0


def cmd_register_node(args: argparse.Namespace) -> int:
    from fedpeft.deploy import submit

    print(json.dumps(submit.register_node(_home(args), args.public_key, args.name)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fedpeft.deploy import submit

    cfg = None if args.resume else config.load(args.scenario, args.overrides)
    home = _home(args)
    run_id, run_dir = submit.submit(home, cfg, args.resume)
    console.print(f"run [bold]{run_id}[/] submitted; run directory {run_dir}")
    print(json.dumps({"run_id": run_id, "run_dir": str(run_dir)}), flush=True)
    if not args.wait:
        return 0
    total = config.load(run_dir / "config.toml").federation.rounds  # the round lines need the run's length
    with console.status(f"waiting for run {run_id} ..."), \
            api.following(run_dir, _print_round(total), len(report.read_metrics(run_dir))):
        final = submit.wait(home, run_id)
    if final == "finished:completed":
        console.print(f"run {run_id}: {final}")
        return 0
    try:
        cause = error_line(submit.logs(home, run_id))
    except FedPeftError as e:
        cause = f"the run's log could not be read ({e})"
    console.print(f"run {run_id}: {final}: {escape(cause)}\n(the whole log: fedpeft logs {run_id})", soft_wrap=True)
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    from fedpeft.deploy import submit

    print(json.dumps(submit.status(_home(args), args.run_id), indent=1))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from fedpeft.deploy import submit

    print(submit.logs(_home(args), args.run_id), end="")
    return 0


COMMANDS = {"simulate": cmd_simulate, "compare-compression": cmd_compare_compression, "config": cmd_config,
            "doctor": cmd_doctor, "export": cmd_export,
            "audit": cmd_audit, "frontier": cmd_frontier, "split-server": cmd_split_server,
            "superlink": cmd_superlink, "node": cmd_node, "certs": cmd_certs, "client-cert": cmd_client_cert,
            "node-key": cmd_node_key,
            "register-node": cmd_register_node, "run": cmd_run, "status": cmd_status, "logs": cmd_logs}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedpeft`` command."""
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    # the handler filters too: Flower's logger (at DEBUG) propagates past the root's level, and rendering its
    # per-node SecAgg+ lines took about 1 s of a 100-client round
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, level=level)])
    if args.command != "doctor":
        from fedpeft import versions

        versions.warn_if_untested()
    try:
        return COMMANDS[args.command](args)
    except FedPeftError as e:  # one line, however long (no wrapping), and never read as markup
        console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        return 2
    except BrokenPipeError:  # the reader went away (`fedpeft config | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
