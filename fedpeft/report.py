"""Run reports: ``summary.md`` (markdown tables) and ``curves.png`` from ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedpeft.config import Config
from fedpeft.errors import DataError

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-round rows of a run. A last line without its newline is being written (or was cut by a crash:
    a resume drops it) and is skipped; any other unreadable line is a :class:`DataError` naming it."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    lines = text.split("\n")[:-1]  # the part after the last newline is not a complete row
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise DataError(f"{path} line {i} is not a JSON row (corrupt or edited)") from None
    return rows


def fmt(value: Any, digits: int = 4) -> str:
    """Compact cell text: floats rounded, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as network traffic is usually quoted)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]  # fmt leaves str as is
    return "\n".join(lines) + "\n"


def round_line(row: dict[str, Any], total: int) -> str:
    """One round's progress line: clients, losses, accuracy, epsilon, bytes, seconds (plain text)."""
    parts = [f"round {row['round']}/{total}", f"clients {row['replies']}/{row['sampled']}"]
    if row.get("train_loss") is not None:
        parts.append(f"train loss {row['train_loss']:.4f}")
    for key, label in (("eval_accuracy", "eval acc"), ("eval_loss", "eval loss"), ("eval_perplexity", "ppl"),
                       ("fed_eval_accuracy", "fed eval acc"), ("fed_eval_worst", "worst client"),
                       ("personal_eval_accuracy", "personal acc"), ("personal_eval_worst", "personal worst")):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.4f}")
    for key, label in (("epsilon_client", "ε client"), ("epsilon_distributed", "ε distributed"),
                       ("epsilon_local", "ε local")):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.3g}")
    parts.append(f"up {human_bytes(row['bytes_up'])} down {human_bytes(row['bytes_down'])}")
    if row.get("split_bytes_up") is not None:
        parts.append(f"split {human_bytes(row['split_bytes_up'])} / {human_bytes(row['split_bytes_down'])}")
    parts.append(f"{row['seconds']:.1f} s")
    return " | ".join(parts)


ROUND_COLUMNS = ["round", "replies", "train_loss", "eval_loss", "eval_accuracy", "eval_perplexity",
                 "fed_eval_loss", "fed_eval_accuracy", "fed_eval_perplexity", "fed_eval_client_mean", "fed_eval_worst",
                 "personal_eval_accuracy", "personal_eval_perplexity", "personal_eval_client_mean",
                 "personal_eval_worst", "backdoor_success", "epsilon_client", "epsilon_distributed", "epsilon_local",
                 "clip_norm", "bytes_up", "bytes_down", "split_bytes_up", "split_bytes_down", "seconds", "sim_time",
                 "staleness_mean"]
BYTE_PARTS = ["up_positions", "up_values", "up_scales", "up_header", "up_framing"]


def write_run_report(run_dir: Path, cfg: Config) -> None:
    """Write summary.md and (if enabled) curves.png for a finished run."""
    from fedpeft.adversary import summary_lines
    from fedpeft.privacy.statement import guarantee_lines  # imports torch: not at CLI start-up

    rows = read_metrics(run_dir)
    cols = [c for c in ROUND_COLUMNS if any(c in r for r in rows)]
    last = rows[-1] if rows else {}
    local = [r["epsilon_local"] for r in rows if r.get("epsilon_local") is not None]
    final = {**last, "epsilon_local": max(local)} if local else last  # a client's epsilon only grows: the run's largest
    up = sum(r.get("bytes_up", 0) for r in rows)
    dense = sum(r.get("bytes_up_fp32", 0) for r in rows)
    text = [f"# Run `{run_dir.name}`\n",
            f"- model `{cfg.model.name}` ({cfg.model.task}), adapter `{cfg.adapter.type}`, "
            f"strategy `{cfg.federation.strategy}`, {cfg.data.num_clients} clients, {len(rows)} rounds",
            f"- codecs: uplink `{cfg.compression.uplink}`, downlink `{cfg.compression.downlink}`",
            f"- uplink total {human_bytes(up)} (fp32 dense: {human_bytes(dense)}, "
            f"ratio {dense / up:.1f}x)" if up else "- uplink total 0 B",
            "- uplink bytes by part: " + ", ".join(
                f"{k[3:]} {human_bytes(sum(r.get(k, 0) for r in rows))}" for k in BYTE_PARTS),
            "- final: " + ", ".join(f"{k} {fmt(final[k])}" for k in ("eval_loss", "eval_accuracy", "eval_perplexity",
                                                                    "fed_eval_loss", "fed_eval_accuracy",
                                                                    "fed_eval_perplexity", "fed_eval_client_mean",
                                                                    "fed_eval_worst", "personal_eval_accuracy",
                                                                    "personal_eval_perplexity",
                                                                    "personal_eval_client_mean", "personal_eval_worst",
                                                                    "gen_exact_match", "gen_rougeL", "mc_accuracy",
                                                                    "mc_accuracy_greedy", "epsilon_client",
                                                                    "epsilon_distributed", "epsilon_local")
                                   if final.get(k) is not None),
            *_split_lines(cfg, rows),
            *_clock_lines(cfg, rows),
            *_fed_eval_lines(rows),
            *summary_lines(cfg, rows),
            *guarantee_lines(cfg, rows),
            f"- wall time {fmt(last.get('elapsed'))} s, peak RSS {fmt(last.get('peak_rss_mb'))} MiB\n",
            "## Rounds\n", markdown_table(cols, [[r.get(c) for c in cols] for r in rows])]
    (run_dir / "summary.md").write_text("\n".join(text))
    if cfg.output.plots and rows:
        plot_curves(rows, run_dir / "curves.png")


def _clock_lines(cfg: Config, rows: list[dict[str, Any]]) -> list[str]:
    """The virtual clock: simulated time in all, and when the target accuracy was first reached."""
    if not rows or rows[-1].get("sim_time") is None:
        return []
    target = cfg.devices.target_accuracy
    reached = time_to_target(rows, target)
    return [f"- simulated time {fmt(rows[-1]['sim_time'])} s (the virtual clock, docs/virtual-clock.md); eval "
            f"accuracy {fmt(target)} " + ("not reached" if reached is None else f"first reached at {fmt(reached)} s")]


def time_to_target(rows: list[dict[str, Any]], target: float, key: str = "eval_accuracy") -> float | None:
    """Simulated seconds until ``key`` first reached ``target`` (None: never, or no clock)."""
    return next((r["sim_time"] for r in rows if r.get("sim_time") is not None and r.get(key) is not None
                 and r[key] >= target), None)


def _fed_eval_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Federated (and personalized) evaluation: which model, the mean over clients, the worst client and each
    client's value at the last evaluated round (fairness)."""
    lines = []
    for prefix, name in (("fed_eval", "federated evaluation"), ("personal_eval", "personalized evaluation")):
        last = next((r for r in reversed(rows) if r.get(f"{prefix}_clients")), None)
        if last is None:
            continue
        what = "accuracy" if f"{prefix}_accuracy" in last else "loss"
        lines.append(f"- {name} ({last.get(f'{prefix}_model', 'global')} model), round {last['round']}: mean over "
                     f"clients {fmt(last.get(f'{prefix}_client_mean'))}, worst client {fmt(last[f'{prefix}_worst'])}; "
                     f"per-client {what} (node: value): " + ", ".join(
                         f"{node}: {fmt(v)}" for node, v in last[f"{prefix}_clients"].items()))
    return lines


def _split_lines(cfg: Config, rows: list[dict[str, Any]]) -> list[str]:
    """Split learning: activation/gradient bytes beside what plain adapter FL sends for the same rounds."""
    if not cfg.split.enabled:
        return []
    up, down = (sum(r.get(k, 0) for r in rows) for k in ("split_bytes_up", "split_bytes_down"))
    fl = sum(r.get("fl_adapter_bytes_fp32", 0) for r in rows)
    return [f"- split learning (front {cfg.split.front_layers}, back {cfg.split.back_layers} blocks on the client, "
            f"wire {cfg.split.wire_dtype}): {human_bytes(up)} activations up, {human_bytes(down)} gradients down; "
            f"plain adapter FL would send the whole fp32 adapter each way: {human_bytes(fl)} per direction"]


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (or perplexity) and loss against round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = rows[-1].get("sim_time") is not None  # the virtual clock: accuracy against simulated time too
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(13.5 if timed else 9, 3.5))
    ax1, ax2 = axes[0], axes[1]
    evals = [r for r in rows if r.get("eval_loss") is not None]
    ax2.plot([r["round"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    trains = [r for r in rows if r.get("train_loss") is not None]
    ax2.plot([r["round"] for r in trains], [r["train_loss"] for r in trains], "s--", label="train loss")
    ax2.set_xlabel("round")
    ax2.set_ylabel("loss")
    ax2.legend()
    key = "eval_accuracy" if any("eval_accuracy" in r for r in evals) else "eval_perplexity"
    ax1.plot([r["round"] for r in evals], [r.get(key) for r in evals], "o-", color="tab:green")
    ax1.set_xlabel("round")
    ax1.set_ylabel(key.replace("eval_", "eval "))
    if timed:
        axes[2].plot([r["sim_time"] for r in evals], [r.get(key) for r in evals], "o-", color="tab:purple")
        axes[2].set_xlabel("simulated time (s)")
        axes[2].set_ylabel(key.replace("eval_", "eval "))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
