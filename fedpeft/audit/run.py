"""``fedpeft audit``: run the attack suite over a grid of victim settings and give each cell a verdict.

Per cell (see :mod:`fedpeft.audit.grid` for the grid and how a cell's client update is
produced): every configured attack runs on the server's observation; its result is scored against
the private batch (only here does ground truth meet an attack's output). The cell keeps the best
value over attacks of token F1, ROUGE-2, exact-sequence rate and the threshold-free ranking score
(true tokens among the top-|true| ranked), the chance level of that ranking, canary exposure, the
real accountant's epsilon, the payload bytes and the update's fidelity.

Verdicts (thresholds from ``[audit]``; defaults below):

* ``fail`` — a leak: best token F1 >= :data:`FAIL_F1` or best ROUGE-2 >= :data:`FAIL_F1`, or any
  exact sequence recovered.
* ``warn`` — measurably above chance: some attack ranks >= :data:`WARN_FACTOR` x chance of the true
  tokens into its top-|true| *and* that many hits has a one-sided binomial p-value below
  :data:`WARN_PVALUE` / (number of ranking attacks); or a planted canary reaches
  :data:`CANARY_WARN` of its maximum exposure.
* ``pass`` — no attack distinguishable from chance at that level. This is evidence about *these*
  attacks, not a privacy proof (that is what epsilon is for).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedpeft.attacks.label_and_canary import canary_rank
from fedpeft.attacks.metrics import exposure, summarize
from fedpeft.attacks.observation import ATTACKS, NotApplicable, run_attack
from fedpeft.audit.grid import GRID_KEYS, ClientView, client_view, parse_dp, plan
from fedpeft.audit.victim import WORDS
from fedpeft.config import AuditSection, Config
from fedpeft.errors import ConfigError
from fedpeft.rundir import new_run_dir

log = logging.getLogger(__name__)

_DEFAULTS = AuditSection()
FAIL_F1: float = _DEFAULTS.fail_f1  #: fail at or above this best token F1 / ROUGE-2 (0.5)
WARN_FACTOR: float = _DEFAULTS.warn_factor  #: warn: ranking hits at least this multiple of chance (3)
WARN_PVALUE: float = _DEFAULTS.warn_pvalue  #: warn: ... and binomial p-value below this / #attacks (0.01)
CANARY_WARN: float = _DEFAULTS.canary_warn  #: warn: canary exposure >= this fraction of its maximum (0.8)
CANARY_LEN = 8  #: tokens of the planted canary (the start of the victim's first sequence)
#: attacks whose token ranking is another attack's (not counted twice in the warn test's Bonferroni factor)
RANKING_COPIES = {"span_decode": "span", "label_and_canary": "subspace_opt"}

COLUMNS = [*GRID_KEYS, "density", "verdict", "best_attack", "token_f1", "rouge2", "exact", "top_true",
           "chance", "hit_pvalue", "canary_exposure", "epsilon", "payload_bytes", "dense_bytes", "utility_cos",
           "seconds"]


def binomial_tail(hits: int, n: int, p: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, p): how surprising ``hits`` right guesses are at chance ``p``."""
    if hits <= 0:
        return 1.0
    p = min(max(p, 0.0), 1.0)
    return min(1.0, sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(hits, n + 1)))


def canary_exposure(scores: torch.Tensor, canary: list[int], alphabet: list[int], samples: int = 20000,
                    seed: int = 0) -> tuple[float, float]:
    """(exposure, maximum) of ``canary`` under per-token ``scores`` (rank from
    :func:`fedpeft.attacks.label_and_canary.canary_rank`: ties count as half, so a flat ranking
    exposes nothing)."""
    rank, space = canary_rank(canary, scores, alphabet, samples, seed)
    return exposure(rank, space), math.log2(space)


def _alphabet(vocab: int) -> list[int]:
    """Public canary format: the tokens of the victim's text distribution (letters and space)."""
    from fedpeft.models import byte_tokenizer

    tok = byte_tokenizer()
    ids = {i for w in WORDS for i in tok(w + " ", add_special_tokens=False)["input_ids"]}
    return sorted(i for i in ids if i < vocab)


def _attack_params(audit: AuditSection, name: str, canary: list[int], alphabet: list[int],
                   seed: int = 0) -> dict[str, Any]:
    if name == "grad_match":
        return {"iterations": audit.grad_match_iterations, "candidates": audit.grad_match_candidates}
    if name == "label_and_canary":
        return {"canaries": [canary], "alphabet": alphabet, "ranking": "subspace_opt", "samples": 20000,
                "seed": seed}
    return {}


def attack_view(view: ClientView, audit: AuditSection, seed: int = 0) -> dict[str, Any]:
    """Run the configured attacks on one observation; the per-attack metrics and the cell's best values."""
    ids = view.truth.input_ids
    canary = ids[0, :CANARY_LEN].tolist()
    alphabet = sorted(set(_alphabet(view.truth.vocab_size)) | set(canary))
    per: dict[str, dict[str, float]] = {}
    canary_frac = 0.0
    for name in audit.attacks:
        try:
            result = run_attack(name, view.obs, **_attack_params(audit, name, canary, alphabet, seed))
        except NotApplicable as e:
            log.info("audit: %s not applicable: %s", name, e)
            continue
        row = summarize(result, ids)
        if name == "label_and_canary" and result.extra.get("canaries"):  # the attack's own (tie-aware) rank
            report = result.extra["canaries"][0]
            frac = report["exposure"] / report["max_exposure"]
            row["canary_exposure"] = frac
            canary_frac = max(canary_frac, frac)
        per[name] = row
    distinct = len(set(ids.flatten().tolist()))
    best = {"token_f1": 0.0, "rouge2": 0.0, "exact": 0.0, "top_true": 0.0}
    for row in per.values():
        for k in best:
            best[k] = max(best[k], float(row.get(k, 0.0)))
    chance = distinct / view.truth.vocab_size
    best_attack = max(per, key=lambda a: (per[a].get("token_f1", 0.0), per[a].get("top_true", 0.0)), default="-")
    return {"per_attack": per, "distinct": distinct, "chance": chance, "canary_frac": canary_frac,
            "best_attack": best_attack, **best}


def verdict(row: dict[str, Any], audit: AuditSection) -> str:
    """``fail`` / ``warn`` / ``pass`` of one aggregated cell (see the module docstring)."""
    if row["token_f1"] >= audit.fail_f1 or row["rouge2"] >= audit.fail_f1 or row["exact"] > 0:
        return "fail"
    ranked = row["ranking_attacks"] or 1
    if (row["top_true"] >= audit.warn_factor * row["chance"] and row["hit_pvalue"] < audit.warn_pvalue / ranked) \
            or row["canary_exposure"] >= audit.canary_warn:
        return "warn"
    return "pass"


def run_cell(cfg: Config, cell: dict[str, Any]) -> dict[str, Any]:
    """All seeds of one cell, aggregated into one report row (metrics averaged, hits pooled)."""
    start = time.perf_counter()
    results, views = [], []
    for s in range(cfg.audit.seeds):
        seed = cfg.run.seed * 1000 + s
        view = client_view(cfg, cell, seed)
        views.append(view)
        results.append(attack_view(view, cfg.audit, seed))
    n = len(results)
    mean = {k: sum(r[k] for r in results) / n for k in ("token_f1", "rouge2", "exact", "chance", "canary_frac")}
    ranking = sorted({a for r in results for a, m in r["per_attack"].items() if "top_true" in m
                      and RANKING_COPIES.get(a) not in r["per_attack"]})
    pvalues, tops = [], []
    for a in ranking:  # pool each attack's hits over seeds; the cell's evidence is its best attack
        hits = sum(round(r["per_attack"].get(a, {}).get("top_true", 0.0) * r["distinct"]) for r in results)
        total = sum(r["distinct"] for r in results)
        tops.append(hits / max(1, total))
        pvalues.append(binomial_tail(hits, total, mean["chance"]))
    row: dict[str, Any] = {**cell, "density": views[0].density,
                           "best_attack": max((r["best_attack"] for r in results), key=[r["best_attack"] for r in
                                                                                         results].count),
                           "token_f1": mean["token_f1"], "rouge2": mean["rouge2"], "exact": mean["exact"],
                           "top_true": max(tops, default=0.0), "chance": mean["chance"],
                           "hit_pvalue": min(pvalues, default=1.0), "ranking_attacks": len(ranking),
                           "canary_exposure": mean["canary_frac"], "epsilon": views[-1].epsilon,
                           "payload_bytes": views[-1].payload_bytes, "dense_bytes": views[-1].dense_bytes,
                           "utility_cos": sum(v.utility_cos for v in views) / n,
                           "per_attack": {a: {k: sum(r["per_attack"].get(a, {}).get(k, 0.0) for r in results) / n
                                              for k in ("token_f1", "top_true", "rouge2", "exact")}
                                          for a in cfg.audit.attacks if any(a in r["per_attack"] for r in results)}}
    row["verdict"] = verdict(row, cfg.audit)
    row["seconds"] = time.perf_counter() - start
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


def run_audit(cfg: Config, cells: list[dict[str, Any]] | None = None,
              on_cell: Callable[[int, int, dict[str, Any]], None] | None = None) -> Path:
    """Run every cell (default: the cells of ``cfg.audit.grid``), write ``audit.md``, ``audit.csv``,
    ``audit.png`` and ``config.toml``; returns the audit directory. ``on_cell(i, total, row)`` is
    called after each cell (progress display)."""
    from fedpeft.audit import report

    if cells is None:
        cfg, cells = check(cfg)
    out = new_run_dir(cfg.output.dir, f"{cfg.run.name}-audit")
    (out / "config.toml").write_text(cfg.to_toml())
    rows = []
    with torch.random.fork_rng(devices=[]):
        for i, cell in enumerate(cells):
            rows.append(run_cell(cfg, cell))
            log.info("audit cell %d/%d: %s -> %s", i + 1, len(cells), cell, rows[-1]["verdict"])
            if on_cell:
                on_cell(i, len(cells), rows[-1])
    report.write(out, cfg, rows)
    return out
