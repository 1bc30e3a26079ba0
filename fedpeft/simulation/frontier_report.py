"""frontier.md and frontier.png of a ``fedpeft frontier`` directory: utility against epsilon, each point with its
leakage verdict and uplink bytes per round (rows from :func:`fedpeft.simulation.frontier.read_rows`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedpeft import report
from fedpeft.config import Config
from fedpeft.simulation import frontier

VERDICT_COLORS = {"fail": "tab:red", "warn": "tab:orange", "pass": "tab:green", "n/a": "tab:gray"}
MODE_MARKERS = {"none": "o", "local": "s", "client": "^", "distributed": "D"}


def _eps(value: Any) -> str:
    if value is None:
        return "not released"
    return "∞" if isinstance(value, float) and math.isinf(value) else report.fmt(value, 3)


def write(out: Path, cfg: Config, rows: list[dict[str, Any]],
          settings: dict[str, dict[str, Any]] | None = None) -> None:
    """frontier.md (one table, refused and failed cells listed with their reason, each mode's own ``settings``)
    and, where cells ran, frontier.png."""
    done = [r for r in rows if r["status"] == "done"]
    refused = [r for r in rows if str(r["status"]).startswith("refused")]
    failed = [r for r in rows if frontier.failed(r)]
    utility = "accuracy" if cfg.model.task == "classification" else "perplexity"
    cols = ["mode", "target ε", "reported ε", "codec", "adapter", utility, "leakage", "best attack", "token F1",
            "up / round", "ε lower bound (audit)", "s"]
    table = [[r["mode"], _eps(float(r["epsilon"])), _eps(r["epsilon_reported"]), r["codec"], r["adapter"],
              report.fmt(r["accuracy"]), f"**{r['verdict']}**", r["best_attack"], report.fmt(r["token_f1"], 3),
              report.human_bytes(r["bytes_up_per_round"] or 0), _audit(r), r["seconds"]] for r in done]
    t, f = cfg.train, cfg.federation
    text = [f"# Privacy-utility-leakage frontier: `{cfg.run.name}`\n",
            f"Model `{cfg.model.name}`, adapter `{cfg.adapter.type}` r {cfg.adapter.r}, data `{cfg.data.source}` over "
            f"{cfg.data.num_clients} clients, {f.rounds} round(s) x {t.local_steps or t.local_epochs} local "
            f"step(s) (epochs if fractional) at batch {t.batch_size}, lr {t.lr:g}; delta {cfg.privacy.delta:g}. "
            f"{len(done)} cell(s) run, {len(refused)} refused" + (f", {len(failed)} failed" if failed else "") + ".\n",
            *(f"- mode `{mode}` trains with its own " + ", ".join(f"`{k} = {v}`" for k, v in values.items()) + "\n"
              for mode, values in (settings or {}).items()),
            report.markdown_table(cols, table) if done else "No cell has finished yet.\n"]
    if refused:
        text += ["\n## Refused combinations\n", *(f"- `{r['cell']}`: {r['status'].removeprefix('refused: ')}"
                                                   for r in refused)]
    if failed:
        text += ["\n## Failed cells (run again by `fedpeft frontier --resume`)\n",
                 *(f"- `{r['cell']}`: {r['status'].removeprefix('failed: ')}" for r in failed)]
    text += ["\n## Legend\n", *NOTES]
    (out / "frontier.md").write_text("\n".join(text) + "\n")
    if cfg.output.plots and done:
        plot(done, out / "frontier.png", utility)


def _audit(r: dict[str, Any]) -> str:
    if r.get("epsilon_lower_bound") is None:
        return "n/a"
    return f"{report.fmt(r['epsilon_lower_bound'], 3)}: {r['epsilon_audit']}"


def plot(rows: list[dict[str, Any]], path: Path, utility: str = "accuracy") -> None:
    """Utility against target epsilon (log x; the rightmost column is no DP): marker = privacy mode, colour =
    leakage verdict, label = mode, codec / adapter and uplink bytes per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [float(r["epsilon"]) for r in rows]
    finite = [e for e in eps if not math.isinf(e)]
    inf_x = max(finite) * 4 if finite else 1.0
    fig, ax = plt.subplots(figsize=(9, 5.5))
    labelled: dict[tuple[float, float], int] = {}  # points at the same place get their labels stacked
    for r, e in zip(rows, eps):
        x = inf_x if math.isinf(e) else e
        ax.scatter([x], [r["accuracy"]], marker=MODE_MARKERS.get(r["mode"], "x"),
                   c=VERDICT_COLORS.get(r["verdict"], "k"), s=60, alpha=0.8, edgecolors="k", linewidths=0.5)
        n = labelled.setdefault((x, round(r["accuracy"], 3)), 0)
        labelled[(x, round(r["accuracy"], 3))] += 1
        ax.annotate(f"{r['mode']} {r['codec']}/{r['adapter']} {report.human_bytes(r['bytes_up_per_round'] or 0)}",
                    (x, r["accuracy"]), xytext=(5, 3 + 9 * n), textcoords="offset points", fontsize=7)
    for mode, marker in MODE_MARKERS.items():
        if any(r["mode"] == mode for r in rows):
            ax.scatter([], [], marker=marker, c="w", edgecolors="k", label=f"mode {mode}")
    for verdict, color in VERDICT_COLORS.items():
        if any(r["verdict"] == verdict for r in rows):
            ax.scatter([], [], marker="o", c=color, label=f"leakage {verdict}")
    ax.set_xscale("log")
    ticks = sorted(set(finite))
    ax.set_xticks([*ticks, inf_x], [*(f"{t:g}" for t in ticks), "∞ (no DP)"])
    ax.minorticks_off()
    ax.set_xlabel("target epsilon")
    ax.set_ylabel(utility)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("privacy-utility-leakage frontier (label: mode codec/adapter, uplink bytes per round)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


NOTES = [
    "- **target ε**: the run's epsilon at delta (local: per example of a client, DP-SGD; client / distributed: per "
    "client, against what the server releases (client) or sees (distributed)). **reported ε**: what the run's "
    "accountant reported after its last round (`epsilon_local` / `epsilon_client` / `epsilon_distributed`); "
    "`not released`: local DP-SGD clients keep their epsilon unless `privacy.release_client_metrics` (each derives "
    "its noise for the target).",
    "- **leakage**: the worst verdict of the attack suite (fedpeft audit --capture, docs/audit.md) on what the "
    "server observed in the last round: client 0's decoded update (the lowest partition that took part, where "
    "client 0 was not sampled), or under SecAgg+ (int8-secure, distributed) "
    "only the unmasked mean of the sum, scored against every client's examples. Under client-level DP the server "
    "sees each clipped update before it adds noise, so its verdict is that of the clipped update. `n/a`: nothing "
    "was attacked (no update observed, or none of the attacks applies to it: the cell's audit.md names why).",
    "- **ε lower bound (audit)**: the one-run empirical epsilon audit (Steinke, Nasr & Jagielski 2023) of the "
    "cell's mechanism (local: one full-batch DP-SGD step at the target; client: the run's rounds) with the "
    "frontier's canaries; `fail` would be a privacy bug. Distributed DP has no empirical audit here (n/a).",
    "- **up / round**: mean uplink bytes per round, every serialized record of every client (all SecAgg+ stages "
    "included).",
]
