"""The audit's report: ``audit.csv`` (one row per cell), ``audit.json`` (the rows with per-seed values
and intervals), ``audit.md`` (verdict table with a legend) and ``audit.png`` (leakage against epsilon
and against codec density)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from fedpeft import report
from fedpeft.audit.grid import GRID_KEYS
from fedpeft.config import Config

VERDICT_COLORS = {"fail": "tab:red", "warn": "tab:orange", "pass": "tab:green", "n/a": "tab:gray"}


def verdict_counts(rows: list[dict[str, Any]]) -> str:
    """``"1 fail, 0 warn, 2 pass"``, with ``", 1 n/a (no attack applies)"`` where a row had no attack."""
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICT_COLORS}
    line = f"{counts['fail']} fail, {counts['warn']} warn, {counts['pass']} pass"
    return line + (f", {counts['n/a']} n/a (no attack applies)" if counts["n/a"] else "")


def not_applicable_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per attack that did not apply to some row, with its reason (the first one met)."""
    why: dict[str, str] = {}
    for r in rows:
        for attack, reason in r.get("not_applicable", {}).items():
            why.setdefault(attack, reason)
    if not why:
        return []
    return ["\nNot applicable (the attack did not run there; a row with no attack at all is `n/a`, not `pass`):\n",
            *(f"- `{a}`: {reason}" for a, reason in why.items()), ""]


def _eps(value: float) -> str:
    return "∞ (no DP)" if math.isinf(value) else f"{value:.3g}"


def metric_legend(cfg: Config) -> list[str]:
    """The verdict and leakage-metric lines of the legend (shared with the capture audit of a real run)."""
    a = cfg.audit
    return [
        f"- **verdict**: `fail` = mean best token F1 or ROUGE-2 >= {a.fail_f1:g}, or any exact sequence; `warn` = "
        f"an attack closes >= {a.warn_lift:g} of the gap between the frequency guess's ranking score and 1 "
        f"(**lift**) with binomial p-value < {a.warn_pvalue:g} / (ranking attacks) at the guess's hit rate, or the "
        f"planted canary reaches >= {a.canary_warn:g} of its maximum exposure; `pass` = no attack distinguishable "
        "from the frequency guess at that level (evidence about these attacks, not a privacy guarantee); `n/a` = "
        "none of the attacks applies to that update (reasons listed under the table): it was not attacked.",
        "- **token_f1**: bag-of-tokens F1 of the recovered set (best attack); **rouge2**, **exact**: best "
        "recovered sequence per true sequence (ROUGE-2 F, exact-match rate); **top_true**: fraction of the "
        "distinct true tokens among the top-|true| ranked tokens of the best ranking attack (threshold-free); "
        "**baseline**: the same for the frequency guess (the top-|true| most frequent tokens of public text, no "
        "update needed); **chance**: the same for a uniformly random ranking (|true| / vocabulary), for reference "
        "only; **hit_pvalue**: binomial tail of the best attack's hits at the baseline's rate; "
        "**canary_exposure**: exposure of the planted canary / its maximum.",
        "- With several seeds (victims per cell) the values are means over seeds, hits are pooled for the "
        "p-value, and [lo, hi] is the 95 % Student-t interval of the mean over seeds."]


def legend(cfg: Config) -> str:
    """What the columns and verdicts mean (written under the table)."""
    return "\n".join([
        "## Legend\n",
        *metric_legend(cfg),
        "- **epsilon**: from the real accountant at delta = "
        f"{cfg.privacy.delta:g} (`local`: Opacus DP-SGD on the client's batch, sampling rate 1, all stacked "
        "rounds x steps; `client`: the server's client-level accountant over the stacked rounds). Client-level "
        "DP noise is added *after* averaging, so the server itself sees the un-noised (clipped) update: its "
        "epsilon protects the released model, not the client's reply against this attacker.",
        "- **budget**: rows/tokens of the span test: the stacked first-block LoRA rows it reads (modules sharing "
        "the input x rank x stacked rounds) against the public token bound (batch x sequence length); the test is "
        "exact only while the rows cover the distinct inputs, beyond that it ranks.",
        "- **payload_bytes**: the encoded uplink payload (header + buffer + scales) of the observed round, without "
        "Flower's framing (about 1 kB per reply); **dense_bytes**: the same update as fp32.",
        "- **utility_cos**: utility proxy, not accuracy: cosine between what the server decoded and the same "
        "client's undefended update (1 = the defence kept the whole training signal). The accuracy of a full "
        "federated run with a codec or DP setting is what `fedpeft compare-compression` / `fedpeft simulate` "
        "report.",
        "- Grid keys: " + "; ".join(f"`{k}`: {m}" for k, (_, m) in GRID_KEYS.items()) + ".\n"])


def _ci(value: float, ci: Any) -> str:
    lo, hi = ci if ci is not None else (value, value)
    return f"{value:.2f}" if hi - lo < 5e-3 else f"{value:.2f} [{max(0.0, lo):.2f}, {min(1.0, hi):.2f}]"


def _plain(value: Any) -> Any:
    """JSON-safe: infinity as the string "inf", tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_csv(out: Path, rows: list[dict[str, Any]]) -> None:
    """audit.csv, one row per cell (replaced whole, so a reader never sees a torn row)."""
    from fedpeft.audit.run import COLUMNS

    with open(out / "audit.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "audit.csv.tmp").replace(out / "audit.csv")


def write(out: Path, cfg: Config, rows: list[dict[str, Any]], victim: str = "") -> None:
    """audit.csv, audit.json, audit.md and (if output.plots) audit.png; ``victim`` describes the victim."""
    write_csv(out, rows)
    (out / "audit.json").write_text(json.dumps({"victim": victim, "rows": _plain(rows)}, indent=1))
    varying = [k for k in GRID_KEYS if len({str(r[k]) for r in rows}) > 1]
    fixed = {k: rows[0][k] for k in GRID_KEYS if k not in varying} if rows else {}
    cols = [*varying, "budget", "verdict", "best_attack", "token_f1", "rouge2", "exact", "ranking_attack", "top_true",
            "baseline", "lift", "chance", "hit_pvalue", "canary_exposure", "epsilon", "payload_bytes", "utility_cos"]

    def cell(r: dict[str, Any], c: str) -> Any:
        if c == "epsilon":
            return _eps(r[c])
        if c == "verdict":
            return f"**{r[c]}**"
        if c in ("token_f1", "top_true"):
            return _ci(r[c], r.get(f"{c}_ci"))
        return r[c]

    table = [[cell(r, c) for c in cols] for r in rows]
    attacks = [a for a in cfg.audit.attacks if any(a in r["per_attack"] for r in rows)]
    detail = [[*(r[k] for k in varying), *(r["per_attack"].get(a, {}).get("token_f1") for a in attacks),
               *(r["per_attack"].get(a, {}).get("top_true") for a in attacks)] for r in rows]
    text = [f"# Privacy audit: `{cfg.run.name}`\n",
            f"Honest-but-curious server attacking one client's reply. Victim: {victim}; LoRA alpha "
            f"{cfg.adapter.alpha:g}, {cfg.audit.seq_len}-token private sequences, lr {cfg.train.lr:g}, "
            f"{cfg.audit.seeds} victim(s) per cell, seed {cfg.run.seed}.\n",
            "Fixed for every cell: " + ", ".join(f"`{k}={v}`" for k, v in fixed.items()) + ".\n",
            f"Verdicts: {verdict_counts(rows)} (of {len(rows)} cells).\n",
            report.markdown_table(cols, table), *not_applicable_lines(rows),
            "\n### Per attack (token F1, then top_true; means over seeds)\n",
            report.markdown_table([*varying, *(f"F1 {a}" for a in attacks), *(f"top {a}" for a in attacks)], detail),
            "", legend(cfg)]
    (out / "audit.md").write_text("\n".join(text))
    if cfg.output.plots:
        plot(rows, out / "audit.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Leakage (best token F1 and best ranking score) against epsilon and against codec density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["epsilon"] for r in rows if not math.isinf(r["epsilon"])]
    inf_x = (max(finite) * 10 if finite else 1.0)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "epsilon", "epsilon (log; rightmost = no DP)"),
                           (axes[1], "density", "codec density p (log; 1 = dense)")):
        for metric, marker in (("token_f1", "o"), ("top_true", "^")):
            for v, color in VERDICT_COLORS.items():
                pts = [r for r in rows if r["verdict"] == v]
                xs = [inf_x if key == "epsilon" and math.isinf(r[key]) else r[key] for r in pts]
                ax.scatter(xs, [r[metric] for r in pts], c=color, marker=marker, alpha=0.75,
                           label=f"{metric} ({v})" if ax is axes[0] else None)
        baseline = max((r.get("baseline", r["chance"]) for r in rows), default=0.0)
        ax.axhline(baseline, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    if any(math.isinf(r["epsilon"]) for r in rows):
        axes[0].annotate("no DP", (inf_x, 0.5), xytext=(0, 0), textcoords="offset points", rotation=90,
                         ha="right", va="center", fontsize=8, color="grey")
    axes[0].set_ylabel("leakage (best over attacks)")
    axes[0].legend(fontsize=7, loc="center left")
    fig.suptitle("leakage vs epsilon and vs density (dotted: frequency-guess baseline)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
