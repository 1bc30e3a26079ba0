"""``fedpeft compare-compression``: the same seeded scenario once per codec, side by side.

Writes ``compression.csv``, ``compression.md`` and ``compression.png`` (final accuracy against total
uplink bytes, log x) into one sweep directory; each codec's full run directory is kept beneath it.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpeft import report
from fedpeft.api import following
from fedpeft.compression import entropy_bound_bits, make_codec
from fedpeft.config import Config
from fedpeft.errors import ConfigError
from fedpeft.rundir import new_run_dir
from fedpeft.simulation import runner

COLUMNS = ["codec", "density", "uplink_bytes_per_round", "downlink_bytes_per_round", "ratio_vs_fp32",
           "ratio_vs_fp16", "entropy_bound_ratio", "final_accuracy", "accuracy_delta_vs_none", "final_eval_loss",
           "encode_ms", "decode_ms", "sim_time_s", "time_to_target_s", "run_dir"]


def _ideal_bits(spec: str, d: int) -> float | None:
    """Entropy bound of one update: sparse ternary d*(H(p)+p); top-k with fp16 values d*H(p) + 16*p*d."""
    codec = make_codec(spec)
    p = getattr(codec.params, "p", None)
    if p is None or not 0 < p < 1:
        return None
    if codec.name == "compeft":
        return entropy_bound_bits(d, p)
    if codec.name == "topk":
        return entropy_bound_bits(d, p) - p * d + 16 * p * d
    return None


def summarize(spec: str, rows: list[dict[str, Any]], run_dir: Path, target: float = 0.85) -> dict[str, Any]:
    """One sweep row from a run's metrics (with the virtual clock: simulated seconds in all and to ``target``)."""
    n = max(1, len(rows))
    up, fp32 = sum(r["bytes_up"] for r in rows), sum(r["bytes_up_fp32"] for r in rows)
    fp16 = sum(r["bytes_up_fp16"] for r in rows)
    replies = sum(r["replies"] for r in rows)
    d = fp32 // max(1, 4 * replies)
    ideal = _ideal_bits(spec, d)
    last = rows[-1]
    enc = [r["encode_ms"] for r in rows if r.get("encode_ms") is not None]
    dec = [r["decode_ms"] for r in rows if r.get("decode_ms") is not None]
    return {"codec": spec, "density": getattr(make_codec(spec).params, "p", 1.0),
            "uplink_bytes_per_round": up / n, "downlink_bytes_per_round": sum(r["bytes_down"] for r in rows) / n,
            "ratio_vs_fp32": fp32 / up if up else None, "ratio_vs_fp16": fp16 / up if up else None,
            "entropy_bound_ratio": 32 * d / ideal if ideal else None,
            "final_accuracy": last.get("eval_accuracy"), "final_eval_loss": last.get("eval_loss"),
            "accuracy_delta_vs_none": None,
            "encode_ms": sum(enc) / len(enc) if enc else None, "decode_ms": sum(dec) / len(dec) if dec else None,
            "sim_time_s": last.get("sim_time"), "time_to_target_s": report.time_to_target(rows, target),
            "run_dir": str(run_dir)}


def split_codecs(text: str) -> list[str]:
    """'none,compeft:0.05,scale=std,int8' -> ['none', 'compeft:0.05,scale=std', 'int8']."""
    specs: list[str] = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        if "=" in token and specs:
            specs[-1] += "," + token
        else:
            specs.append(token)
    return specs


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", spec).strip("-")


PLAN_FILE, STARTED_FILE, RESULTS_FILE = "plan.json", "started.json", "results.jsonl"
RoundHook = Callable[[str, dict[str, Any]], None]


def compare_compression(cfg: Config, codecs: list[str], both_directions: bool = False,
                        on_done: Callable[[dict[str, Any]], None] | None = None,
                        on_round: RoundHook | None = None, resume: Path | None = None) -> Path:
    """Run ``cfg`` once per uplink codec (and downlink too if ``both_directions``); returns the sweep dir.

    ``on_round(codec, row)`` sees each round's metrics row as it is recorded, ``on_done(result)`` each codec's
    summary. Progress is kept in the sweep directory (``results.jsonl``: finished codecs; ``started.json``:
    each codec's run directory), so ``resume`` (a sweep directory; ``cfg``, ``codecs`` and ``both_directions``
    are then read from it) skips finished codecs and continues an interrupted one from its checkpoint.
    """
    if resume is not None:
        sweep_dir = resume
        cfg, codecs, both_directions, results = load_sweep(sweep_dir)
        (sweep_dir / RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in results))  # drop a torn line
    else:
        if not codecs:
            raise ConfigError("no codecs to compare: pass --codecs or set compression.sweep")
        for spec in codecs:
            make_codec(spec)  # every spec is checked before any work starts
        sweep_dir = new_run_dir(cfg.output.dir, f"{cfg.run.name}-compression")
        (sweep_dir / runner.CONFIG_FILE).write_text(cfg.to_toml())
        (sweep_dir / PLAN_FILE).write_text(json.dumps({"codecs": codecs, "both_directions": both_directions}))
        results = []
    started = json.loads((sweep_dir / STARTED_FILE).read_text()) if (sweep_dir / STARTED_FILE).is_file() else {}
    for spec in codecs[len(results):]:
        previous = sweep_dir / started[spec] if spec in started else None
        if previous is not None and any(previous.glob("checkpoint*")):  # continue the interrupted run
            run_cfg, run_dir = runner.prepare(None, previous)
        else:
            compression = dataclasses.replace(cfg.compression, uplink=spec,
                                              downlink=spec if both_directions else cfg.compression.downlink)
            run_cfg, run_dir = runner.prepare(dataclasses.replace(
                cfg, compression=compression, run=dataclasses.replace(cfg.run, name=_slug(spec)),
                output=dataclasses.replace(cfg.output, dir=str(sweep_dir / "runs"))))
            started[spec] = str(run_dir.relative_to(sweep_dir))
            (sweep_dir / STARTED_FILE).write_text(json.dumps(started))
        with following(run_dir, functools.partial(on_round or _ignore, spec), len(report.read_metrics(run_dir))):
            runner.execute(run_cfg, run_dir, resume=run_dir == previous)
        results.append(summarize(spec, report.read_metrics(run_dir), run_dir, cfg.devices.target_accuracy))
        with open(sweep_dir / RESULTS_FILE, "a") as f:
            f.write(json.dumps(results[-1]) + "\n")
        if on_done:
            on_done(results[-1])
    base = next((r["final_accuracy"] for r in results if r["codec"] == "none"), None)
    for r in results:
        if base is not None and r["final_accuracy"] is not None:
            r["accuracy_delta_vs_none"] = r["final_accuracy"] - base
    write_sweep(sweep_dir, cfg, results)
    return sweep_dir


def _ignore(spec: str, row: dict[str, Any]) -> None:
    """No per-round display."""


def load_sweep(sweep_dir: Path) -> tuple[Config, list[str], bool, list[dict[str, Any]]]:
    """(config, codecs, both_directions, finished results) of a sweep directory, to continue it."""
    from fedpeft import config

    if not (sweep_dir / PLAN_FILE).is_file():
        raise ConfigError(f"--resume {sweep_dir}: not a compare-compression directory (no {PLAN_FILE})")
    plan = json.loads((sweep_dir / PLAN_FILE).read_text())
    lines = (sweep_dir / RESULTS_FILE).read_text().splitlines() if (sweep_dir / RESULTS_FILE).is_file() else []
    results = []
    for line in lines:
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:  # torn by a kill while writing: that codec's run is complete, resumed below
            break
    if [r["codec"] for r in results] != plan["codecs"][:len(results)]:
        raise ConfigError(f"{sweep_dir / RESULTS_FILE} does not follow the planned codecs {plan['codecs']}")
    return config.load(sweep_dir / runner.CONFIG_FILE), plan["codecs"], plan["both_directions"], results


def write_sweep(sweep_dir: Path, cfg: Config, results: list[dict[str, Any]]) -> None:
    """compression.csv, compression.md and compression.png."""
    with open(sweep_dir / "compression.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(results)
    cols = [c for c in COLUMNS if c != "run_dir"]
    text = [f"# Compression sweep: `{cfg.run.name}`\n",
            f"Model `{cfg.model.name}`, adapter `{cfg.adapter.type}` (r={cfg.adapter.r}), {cfg.data.num_clients} "
            f"clients, {cfg.federation.rounds} rounds, seed {cfg.run.seed}. Bytes are serialized Flower records "
            "per round (all clients); ratios compare with the dense fp32 / fp16 size of the same updates; "
            "`entropy_bound_ratio` is the ideal ratio vs fp32 for that density. With the virtual clock "
            f"(devices.clock), `time_to_target_s` is the simulated time to eval accuracy "
            f"{cfg.devices.target_accuracy} (empty: not reached).\n",
            report.markdown_table(cols, [[r[c] for c in cols] for r in results])]
    (sweep_dir / "compression.md").write_text("\n".join(text))
    if cfg.output.plots:
        plot_sweep(results, sweep_dir / "compression.png")


def plot_sweep(results: list[dict[str, Any]], path: Path) -> None:
    """Final accuracy against uplink bytes per round (log x), one labelled point per codec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in results if r["final_accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter([r["uplink_bytes_per_round"] for r in pts], [r["final_accuracy"] for r in pts])
    for r in pts:
        ax.annotate(r["codec"], (r["uplink_bytes_per_round"], r["final_accuracy"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("uplink bytes per round (log)")
    ax.set_ylabel("final eval accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
