"""``fedpeft audit``: run the attack suite over a grid of victim settings and give each cell a verdict.

Per cell (see :mod:`fedpeft.audit.grid` for the grid and how a cell's client update is
produced), ``audit.seeds`` victims are trained, each on its own private batch. Every configured
attack runs on the server's observation; its result is scored against the private batch (only here
does ground truth meet an attack's output). The cell reports the mean over seeds (with a 95 %
t-interval) of the best token F1, ROUGE-2 and exact-sequence rate, and for the best ranking attack
the share of the true tokens among its top-|true| (hits pooled over seeds). The baseline is not
uniform chance but an attacker who guesses the top-|true| most frequent tokens of public text
(:class:`fedpeft.audit.victim.VictimSource`); chance is reported beside it.

Verdicts (thresholds from ``[audit]``; defaults below):

* ``fail`` — a leak: mean best token F1 >= :data:`FAIL_F1` or ROUGE-2 >= :data:`FAIL_F1`, or any
  exact sequence recovered.
* ``warn`` — measurably better than the frequency guess: some attack closes >= :data:`WARN_LIFT` of
  the gap between the guess's ranking score and 1 (:func:`lift`) *and* its pooled hits have a
  one-sided binomial p-value below :data:`WARN_PVALUE` / (number of ranking attacks) at the guess's
  hit rate; or a planted canary reaches :data:`CANARY_WARN` of its maximum exposure.
* ``pass`` — no attack distinguishable from the frequency guess at that level. This is evidence about
  *these* attacks, not a privacy proof (that is what epsilon is for).
* ``n/a`` — none of the configured attacks applies to this update (each one's reason is kept in
  ``not_applicable``): the suite says nothing about it, so it is not a ``pass``.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedpeft.attacks.label_and_canary import canary_rank
from fedpeft.attacks.metrics import exposure, ranking_score, summarize
from fedpeft.attacks.observation import ATTACKS, AttackResult, NotApplicable, Observation, run_attack
from fedpeft.audit.grid import GRID_KEYS, ClientView, client_view, parse_dp, plan
from fedpeft.audit.victim import VictimSource, victim_source
from fedpeft.config import AuditSection, Config
from fedpeft.errors import ConfigError
from fedpeft.rundir import new_run_dir

log = logging.getLogger(__name__)

_DEFAULTS = AuditSection()
FAIL_F1: float = _DEFAULTS.fail_f1  #: fail at or above this best token F1 / ROUGE-2 (0.5)
WARN_LIFT: float = _DEFAULTS.warn_lift  #: warn: an attack closes this much of the baseline's gap to 1 (0.1)
WARN_PVALUE: float = _DEFAULTS.warn_pvalue  #: warn: ... and binomial p-value below this / #attacks (0.01)
CANARY_WARN: float = _DEFAULTS.canary_warn  #: warn: canary exposure >= this fraction of its maximum (0.8)
CANARY_LEN = 8  #: tokens of the planted canary (the start of the victim's first sequence)
#: attacks whose token ranking is another attack's (not counted twice in the warn test's Bonferroni factor)
RANKING_COPIES = {"span_decode": "span", "label_and_canary": "subspace_opt"}

COLUMNS = [*GRID_KEYS, "density", "budget", "verdict", "best_attack", "token_f1", "token_f1_ci", "rouge2", "exact",
           "ranking_attack", "top_true", "top_true_ci", "baseline", "lift", "chance", "seeds", "hit_pvalue",
           "canary_exposure", "epsilon", "payload_bytes", "dense_bytes", "utility_cos", "seconds", "cpu_seconds"]


def binomial_tail(hits: int, n: int, p: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, p): how surprising ``hits`` right guesses are at chance ``p``."""
    if hits <= 0:
        return 1.0
    p = min(max(p, 0.0), 1.0)
    if hits > n or p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    # in logs: C(n, k) overflows a float from n ~ 1,030 (a frontier cell's distinct tokens reach thousands)
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
            + (n - k) * math.log1p(-p) for k in range(hits, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def canary_exposure(scores: torch.Tensor, canary: list[int], alphabet: list[int], samples: int = 20000,
                    seed: int = 0) -> tuple[float, float]:
    """(exposure, maximum) of ``canary`` under per-token ``scores`` (rank from
    :func:`fedpeft.attacks.label_and_canary.canary_rank`: ties count as half, so a flat ranking
    exposes nothing)."""
    rank, space = canary_rank(canary, scores, alphabet, samples, seed)
    return exposure(rank, space), math.log2(space)


def interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t confidence interval of the mean of ``values`` (a point for one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def _attack_params(audit: AuditSection, name: str, canary: list[int], alphabet: list[int],
                   seed: int = 0) -> dict[str, Any]:
    if name == "grad_match":
        return {"iterations": audit.grad_match_iterations, "candidates": audit.grad_match_candidates}
    if name == "label_and_canary":
        return {"canaries": [canary], "alphabet": alphabet, "ranking": "subspace_opt", "samples": 20000,
                "seed": seed}
    return {}


def run_attacks(obs: Observation, audit: AuditSection, canary: list[int], alphabet: list[int], seed: int,
                score: Callable[[AttackResult], dict[str, float]]) -> tuple[dict[str, dict[str, float]],
                                                                            dict[str, str], float]:
    """Every configured attack on one observation, with the grid's attack settings (so the grid and a captured
    run are comparable): each attack's metrics (``score(result)``, plus ``span_rows`` for ``span`` and
    ``canary_exposure`` for ``label_and_canary``: its own tie-aware rank), the attacks that did not apply (with
    why) and the highest canary exposure (fraction of the maximum)."""
    per: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    canary_frac = 0.0
    for name in audit.attacks:
        try:
            result = run_attack(name, obs, **_attack_params(audit, name, canary, alphabet, seed))
        except NotApplicable as e:
            log.info("audit: %s not applicable: %s", name, e)
            skipped[name] = str(e)
            continue
        row = score(result)
        if name == "span" and "rows" in result.extra:
            row["span_rows"] = float(result.extra["rows"])
        if name == "label_and_canary" and result.extra.get("canaries"):
            report = result.extra["canaries"][0]
            row["canary_exposure"] = report["exposure"] / report["max_exposure"]
            canary_frac = max(canary_frac, row["canary_exposure"])
        per[name] = row
    return per, skipped, canary_frac


def attack_view(view: ClientView, audit: AuditSection, seed: int = 0,
                src: VictimSource | None = None) -> dict[str, Any]:
    """Run the configured attacks on one observation; the per-attack metrics, the cell's best values and
    the baseline: the ranking score of guessing the most frequent tokens of public text (``src.prior``)."""
    ids = view.truth.input_ids
    canary = ids[0, :CANARY_LEN].tolist()
    alphabet = sorted(set(src.alphabet() if src is not None else []) | set(canary))
    per, skipped, canary_frac = run_attacks(view.obs, audit, canary, alphabet, seed,
                                            functools.partial(summarize, truth=ids))
    distinct = len(set(ids.flatten().tolist()))
    best = {"token_f1": 0.0, "rouge2": 0.0, "exact": 0.0, "top_true": 0.0}
    for row in per.values():
        for k in best:
            best[k] = max(best[k], float(row.get(k, 0.0)))
    chance = distinct / view.truth.vocab_size
    prior = src.prior if src is not None else torch.zeros(view.truth.vocab_size)
    baseline = ranking_score(prior, ids.flatten().tolist())["top_true"]
    best_attack = max(per, key=lambda a: (per[a].get("token_f1", 0.0), per[a].get("top_true", 0.0)), default="-")
    return {"per_attack": per, "not_applicable": skipped, "distinct": distinct, "chance": chance,
            "baseline": baseline, "canary_frac": canary_frac, "best_attack": best_attack, **best}


def _budget(results: list[dict[str, Any]], tokens: int) -> str:
    """The span test's rank budget: ``rows/tokens``, the stacked first-block LoRA rows it reads (modules that
    share the input × r × rounds) against the public token bound; exact only while rows ≥ distinct inputs."""
    rows = max((int(r["per_attack"].get("span", {}).get("span_rows", 0)) for r in results), default=0)
    return f"{rows}/{tokens}" if rows else "-"


def lift(top_true: float, baseline: float) -> float:
    """How much of the gap between the frequency guess's ranking score and a perfect ranking an attack
    closes: (top_true − baseline) / (1 − baseline); 0 = no better than the guess, 1 = every token."""
    return (top_true - baseline) / (1.0 - baseline) if baseline < 1 else 0.0


def verdict(row: dict[str, Any], audit: AuditSection) -> str:
    """``fail`` / ``warn`` / ``pass`` of one aggregated cell, ``n/a`` where no attack applied (see the module
    docstring)."""
    if not row["per_attack"]:
        return "n/a"
    if row["token_f1"] >= audit.fail_f1 or row["rouge2"] >= audit.fail_f1 or row["exact"] > 0:
        return "fail"
    ranked = row["ranking_attacks"] or 1
    if (lift(row["top_true"], row["baseline"]) >= audit.warn_lift and row["hit_pvalue"] < audit.warn_pvalue / ranked) \
            or row["canary_exposure"] >= audit.canary_warn:
        return "warn"
    return "pass"


def run_cell(cfg: Config, cell: dict[str, Any], src: VictimSource | None = None,
             on_victim: Callable[[], None] | None = None) -> dict[str, Any]:
    """All seeds of one cell, aggregated into one report row: metrics are means over seeds (with a 95 %
    t-interval), each ranking attack's hits are pooled over seeds for its p-value at the baseline's rate.
    ``on_victim()`` is called after each seed's victim has been attacked (progress display)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    src = src or victim_source(cfg)
    results, views = [], []
    for s in range(cfg.audit.seeds):
        seed = cfg.run.seed * 1000 + s
        view = client_view(cfg, cell, seed, src)
        # one base model for every victim: the candidate first-layer inputs (the span attacks' costliest step,
        # a forward pass per vocabulary token) do not depend on the adapter, so the server computes them once
        shared = src.candidates.setdefault(cell["targets"], {}) if src.base is not None else {}
        view.obs.adopt(shared)
        views.append(view)
        results.append(attack_view(view, cfg.audit, seed, src))
        shared.update(view.obs.shared_values())
        if on_victim:
            on_victim()
    n = len(results)
    mean = {k: sum(r[k] for r in results) / n
            for k in ("token_f1", "rouge2", "exact", "chance", "baseline", "canary_frac")}
    ranking = sorted({a for r in results for a, m in r["per_attack"].items() if "top_true" in m
                      and RANKING_COPIES.get(a) not in r["per_attack"]})
    total = sum(r["distinct"] for r in results)
    base_rate = sum(r["baseline"] * r["distinct"] for r in results) / max(1, total)  # pooled, like the hits
    pvalues, pooled = [], []
    for a in ranking:  # pool each attack's hits over seeds; the cell's evidence is its best attack
        hits = sum(round(r["per_attack"].get(a, {}).get("top_true", 0.0) * r["distinct"]) for r in results)
        pooled.append(hits / max(1, total))
        pvalues.append(binomial_tail(hits, total, base_rate))
    best = max(range(len(ranking)), key=lambda i: (pooled[i], -pvalues[i])) if ranking else None
    per_seed = {"token_f1": [r["token_f1"] for r in results], "baseline": [r["baseline"] for r in results],
                "top_true": [r["per_attack"].get(ranking[best], {}).get("top_true", 0.0) if best is not None
                             else 0.0 for r in results]}
    row: dict[str, Any] = {**cell, "density": views[0].density,
                           "best_attack": max((r["best_attack"] for r in results), key=[r["best_attack"] for r in
                                                                                         results].count),
                           "token_f1": mean["token_f1"], "rouge2": mean["rouge2"], "exact": mean["exact"],
                           "top_true": sum(per_seed["top_true"]) / n, "baseline": mean["baseline"],
                           "chance": mean["chance"], "hit_pvalue": pvalues[best] if best is not None else 1.0,
                           "ranking_attacks": len(ranking),
                           "ranking_attack": ranking[best] if best is not None else "-", "seeds": n,
                           "per_seed": per_seed,
                           "token_f1_ci": interval(per_seed["token_f1"]),
                           "top_true_ci": interval(per_seed["top_true"]),
                           "budget": _budget(results, views[-1].obs.token_bound),
                           "canary_exposure": mean["canary_frac"], "epsilon": views[-1].epsilon,
                           "payload_bytes": views[-1].payload_bytes, "dense_bytes": views[-1].dense_bytes,
                           "utility_cos": sum(v.utility_cos for v in views) / n,
                           "per_attack": {a: {k: sum(r["per_attack"].get(a, {}).get(k, 0.0) for r in results) / n
                                              for k in ("token_f1", "top_true", "rouge2", "exact")}
                                          for a in cfg.audit.attacks if any(a in r["per_attack"] for r in results)},
                           "not_applicable": {a: why for r in results for a, why in r["not_applicable"].items()
                                              if not any(a in q["per_attack"] for q in results)}}
    row["lift"] = lift(row["top_true"], row["baseline"])
    row["verdict"] = verdict(row, cfg.audit)
    row["seconds"] = time.perf_counter() - start
    row["cpu_seconds"] = time.process_time() - cpu_start  # this process's CPU time: sizes a grid on a busy machine
    return row


def with_attacks(cfg: Config, attacks: Sequence[str] | None) -> Config:
    """``cfg`` with ``attacks`` (if given) replacing ``audit.attacks``; every name must be a known attack."""
    if attacks:
        cfg = dataclasses.replace(cfg, audit=dataclasses.replace(cfg.audit, attacks=list(attacks)))
    unknown = [a for a in cfg.audit.attacks if a not in ATTACKS.names()]
    if unknown or not cfg.audit.attacks:
        raise ConfigError(f"audit.attacks = {list(cfg.audit.attacks)}: unknown {unknown}; known attacks: "
                          f"{', '.join(ATTACKS.names())}")
    return cfg


def check(cfg: Config, extra_grid: list[str] | None = None,
          attacks: list[str] | None = None) -> tuple[Config, list[dict[str, Any]]]:
    """Validate the audit settings (``extra_grid`` axes and ``attacks`` override ``[audit]``) before any
    work starts; returns the effective config and the grid's cells."""
    cfg = with_attacks(cfg, attacks)
    cells = plan(cfg, extra_grid)

    for cell in cells:  # an unreachable target epsilon fails here, not after an hour of cells
        mode, kind, value = parse_dp(cell["dp"])
        if mode == "local" and kind == "eps":
            from fedpeft.privacy import derive_noise_multiplier

            derive_noise_multiplier(value, cfg.privacy.delta, 1.0, cell["rounds"] * cell["steps"],
                                    cfg.privacy.accountant)
    return cfg, cells


PLAN_FILE, CELLS_FILE = "plan.json", "cells.jsonl"  # the grid's cells; each finished cell's row, as it finishes


def load_progress(out: Path) -> tuple[Config, list[dict[str, Any]], list[dict[str, Any]]]:
    """(config, planned cells, finished rows) of an audit directory, to continue it; a torn last line (the
    process was killed while writing it) is dropped, that cell runs again."""
    from fedpeft import config as config_mod

    if not (out / PLAN_FILE).is_file():
        raise ConfigError(f"--resume {out}: not an audit directory (no {PLAN_FILE})")
    cfg = config_mod.load(out / "config.toml")
    cells = json.loads((out / PLAN_FILE).read_text())
    rows = []
    lines = (out / CELLS_FILE).read_text().splitlines() if (out / CELLS_FILE).is_file() else []
    for n, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines) - 1:
                raise ConfigError(f"{out / CELLS_FILE}: line {n + 1} is not JSON") from None
    for i, row in enumerate(rows):
        if i >= len(cells) or any(row[k] != cells[i][k] for k in GRID_KEYS):
            raise ConfigError(f"{out / CELLS_FILE}: row {i + 1} is not the plan's cell {i + 1}")
    return cfg, cells, rows


def _persist(out: Path, rows: list[dict[str, Any]]) -> None:
    """Append the newest row to cells.jsonl (on disk before the next cell starts) and rewrite audit.csv."""
    from fedpeft.audit import report

    with open(out / CELLS_FILE, "a") as f:
        f.write(json.dumps(rows[-1]) + "\n")
        f.flush()
        os.fsync(f.fileno())
    report.write_csv(out, rows)


def run_audit(cfg: Config, cells: list[dict[str, Any]] | None = None,
              on_cell: Callable[[int, int, dict[str, Any]], None] | None = None,
              on_victim: Callable[[], None] | None = None, resume: Path | None = None) -> Path:
    """Run every cell (default: the cells of ``cfg.audit.grid``), write ``audit.md``, ``audit.csv``,
    ``audit.json``, ``audit.png`` and ``config.toml``; returns the audit directory. ``on_cell(i, total, row)`` is
    called after each cell, ``on_victim()`` after each of its seeds (progress display). Each finished cell is
    in ``cells.jsonl`` and ``audit.csv`` at once; ``resume`` (an audit directory) runs only the cells it lacks,
    with its own config and plan (``cfg`` and ``cells`` are then not used)."""
    from fedpeft import tracking
    from fedpeft.audit import report

    if resume is not None:
        out = resume
        cfg, cells, rows = load_progress(out)
        (out / CELLS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))  # without a torn last line
        log.info("audit: resuming %s, %d of %d cell(s) done", out, len(rows), len(cells))
    else:
        if cells is None:
            cfg, cells = check(cfg)
        out = new_run_dir(cfg.output.dir, f"{cfg.run.name}-audit")
        (out / "config.toml").write_text(cfg.to_toml())
        (out / PLAN_FILE).write_text(json.dumps(cells))
        rows = []
    tracker = tracking.Tracker(cfg.tracking, Path(cfg.tracking.dir or out / "tracking"), out.name,
                               tracking.flat_params(cfg.to_dict())) if cfg.tracking.sinks else None
    src = victim_source(cfg)
    try:
        with torch.random.fork_rng(devices=[]):
            for i in range(len(rows), len(cells)):
                rows.append(json.loads(json.dumps(run_cell(cfg, cells[i], src, on_victim))))  # as a resume reads it
                gc.collect()  # free the cell's attack tables, which sit in reference cycles, before the next
                _persist(out, rows)
                log.info("audit cell %d/%d: %s -> %s", i + 1, len(cells), cells[i], rows[-1]["verdict"])
                if tracker is not None:
                    tracker.cell(i, rows[-1])
                if on_cell:
                    on_cell(i, len(cells), rows[-1])
    finally:
        if tracker is not None:
            tracker.close()
    report.write(out, cfg, rows, src.describe())
    return out
