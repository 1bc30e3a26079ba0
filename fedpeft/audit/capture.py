"""Capture mode of ``fedpeft audit``: attack the updates of a real federated run.

The scenario runs on the in-process engine (:func:`fedpeft.simulation.runner.simulate`, imported when
a capture starts, so this module needs no Flower) with an observer in the server loop
(:class:`fedpeft.server.loop.ObservedUpdate`): every update the server decoded — after the real uplink
codec, the client's clip and any local DP noise — is kept (references, no copies) for the selected
rounds and clients (under FedBuff every buffered update, with the adapter its client was sent:
:mod:`fedpeft.server.asynchronous`). After the run each one becomes an attack
:class:`~fedpeft.attacks.observation.Observation` (the run's model and frozen base, the adapter the client
started from, the decoded delta, the public ``[train]`` metadata, optionally the same client's earlier
updates) and the configured attacks run on it.

Ground truth (metrics only): the tokens of the examples the client trained on in that round. Without
local DP the client's seeded sampler is replayed (:func:`drawn_indices`: ``client_seed`` and
``train_local``'s shuffled loader), so the truth is exactly the drawn batches (``truth = drawn``).
Under local DP-SGD the Poisson sample (Opacus, inside :mod:`fedpeft.privacy`) is not replayed and the
truth is the client's whole partition (``truth = partition``).

Verdicts use :func:`fedpeft.audit.run.verdict` and the grid audit's thresholds; ``audit.md``,
``audit.csv`` and ``audit.png`` are written into the run directory beside its ``metrics.jsonl``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedpeft import report
from fedpeft.attacks.metrics import ranking_score, rouge_l, rouge_n, token_prf
from fedpeft.attacks.observation import Observation, State
from fedpeft.audit import run
from fedpeft.audit.report import metric_legend, not_applicable_lines, plot, verdict_counts
from fedpeft.config import Config
from fedpeft.errors import ConfigError

if TYPE_CHECKING:  # the server loop imports flwr: audit/ names the type only
    from fedpeft.server.loop import ObservedUpdate

log = logging.getLogger(__name__)

#: audit.csv columns of a captured run (one row per attacked (round, client) update)
COLUMNS = ["round", "client", "node", "staleness", "truth", "examples", "stacked", "density", "verdict", "best_attack",
           "token_f1", "rouge2", "exact", "top_true", "baseline", "lift", "chance", "hit_pvalue", "canary_exposure",
           "epsilon", "epsilon_client",
           "payload_bytes", "dense_bytes", "train_loss", "eval_accuracy", "eval_loss", "eval_perplexity", "seconds"]
UpdateCallback = Callable[[int, int, dict[str, Any]], None]


@dataclass
class Captured:
    """One selected update and the same client's earlier updates (oldest first)."""

    update: ObservedUpdate
    history: list[ObservedUpdate] = field(default_factory=list)


class Recorder:
    """The server-loop observer: keeps the selected updates, attacks nothing (cheap inside the loop).

    ``rounds`` / ``clients`` (partition ids; None = all) select what is attacked; ``stack`` earlier
    updates of the same client are kept as history (the state dicts are referenced, not copied).
    ``fallback``: in a selected round where none of ``clients`` took part (a sampled federation), the update of
    the lowest partition that did is selected instead (:meth:`finish`), so the round is not left unattacked.
    """

    def __init__(self, rounds: Sequence[int] | None = None, clients: Sequence[int] | None = None,
                 stack: int = 0, fallback: bool = False) -> None:
        self.rounds = set(rounds) if rounds else None
        self.clients = set(clients) if clients else None
        self.stack = stack
        self.fallback = fallback
        self.captured: list[Captured] = []
        self._past: dict[int, deque[ObservedUpdate]] = {}
        self._lowest: dict[int, ObservedUpdate] = {}  # fallback: per selected round, its lowest partition's update

    def __call__(self, u: ObservedUpdate) -> None:
        if self.fallback and u.partition_id >= 0 and (self.rounds is None or u.round in self.rounds):
            low = self._lowest.get(u.round)
            if low is None or u.partition_id < low.partition_id:
                self._lowest[u.round] = u
        if self.clients is not None and u.partition_id not in self.clients and u.partition_id >= 0:
            return  # (a secure sum, partition -1, is always kept)
        past = self._past.setdefault(u.partition_id, deque(maxlen=max(1, self.stack)))
        if self.rounds is None or u.round in self.rounds:
            self.captured.append(Captured(u, list(past) if self.stack else []))
        if self.stack:
            past.append(u)

    def finish(self) -> None:
        """After the run: under ``fallback``, each selected round without a selected client's update gets its
        lowest partition's update (no history)."""
        covered = {c.update.round for c in self.captured if c.update.partition_id >= 0}
        self.captured += [Captured(u) for rnd, u in sorted(self._lowest.items()) if rnd not in covered]
        self._lowest = {}


def _rouge_to(target: Sequence[int], candidate: Sequence[int]) -> float:
    """ROUGE-L of ``candidate`` against ``target`` (argument order fits ``functools.partial``)."""
    return rouge_l(candidate, target)

def check(cfg: Config, attacks: Sequence[str] | None = None, grid: Sequence[str] | None = None) -> Config:
    """Validate a capture audit before any work: known attacks, no grid, the in-process engine."""
    if grid:
        raise ConfigError("--grid and --capture exclude each other: a capture audit attacks the scenario's own "
                          "run; vary the scenario with --set instead")
    cfg = run.with_attacks(cfg, attacks)
    if cfg.split.enabled:
        raise ConfigError("--capture attacks whole-adapter updates; with split.enabled the server sees activations "
                          "instead: use the smashed attack (docs/audit.md, 'Split learning')")
    if cfg.run.engine != "inprocess":
        log.info("capture audit: run.engine %r -> 'inprocess' (the observer hook is in-process only)",
                 cfg.run.engine)
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, engine="inprocess"))
    return cfg


def drawn_indices(cfg: Config, rnd: int, partition_id: int, num_examples: int) -> list[int]:
    """The partition indices the client's seeded sampler drew in round ``rnd`` (no local DP), in order
    of first use: ``train_local``'s shuffled loader replayed with ``client_seed`` on indices only."""
    from fedpeft.training import _batches, client_seed, num_local_steps  # the loader the client itself uses

    steps = num_local_steps(cfg.train, num_examples)
    gen = torch.Generator().manual_seed(client_seed(cfg.run.seed, rnd, partition_id))
    batches = _batches(list(range(num_examples)), list, cfg.train.batch_size, gen)  # type: ignore[arg-type]
    return list(dict.fromkeys(i for _ in range(steps) for i in next(batches)))


def _single_step(cfg: Config) -> bool:
    """A one-step SGD delta at a constant public lr is exactly −lr·gradient (the server rescales it)."""
    t = cfg.train
    unclipped = t.max_grad_norm == 0 or cfg.privacy.mode in ("local", "both")  # DP-SGD clips per example
    return (t.local_steps == 1 and t.optimizer == "sgd" and t.weight_decay == 0 and t.schedule == "constant"
            and t.warmup_steps == 0 and t.lr > 0 and unclipped)


def observation(model: torch.nn.Module, cfg: Config, cap: Captured, public: State | None = None) -> Observation:
    """What the server knows about ``cap``: model + base, start adapter, decoded delta, public metadata.
    ``public``: the seeded initial adapter, which fills in the tensors that never travel (share_a's B, a personal
    head: the server knows only their init).

    ``num_examples`` is the public bound on the examples one round touches: min(reported examples,
    batch size x local steps).
    """
    from fedpeft.training import num_local_steps

    u = cap.update
    reported = int(u.metrics.get("num-examples", cfg.train.batch_size))
    steps = num_local_steps(cfg.train, reported)
    touched = max(1, min(reported, cfg.train.batch_size * steps))
    pairs: list[tuple[State, State]] = [({**(public or {}), **h.start_state}, h.delta)
                                        for h in [*cap.history, u]]
    if _single_step(cfg):
        scale = -1.0 / cfg.train.lr
        pairs = [(g, {k: v * scale for k, v in d.items()}) for g, d in pairs]
        return Observation(model=model, global_state=pairs[-1][0], update=pairs[-1][1], kind="gradient",
                           history=pairs[:-1], batch_size=cfg.train.batch_size, num_examples=touched,
                           seq_len=cfg.model.max_length, local_steps=1, lr=cfg.train.lr, optimizer="sgd",
                           task=cfg.model.task)
    return Observation.from_round(model, pairs[-1][0], pairs[-1][1], cfg.train, touched, cfg.model.max_length,
                                  task=cfg.model.task, history=pairs[:-1], local_steps=steps)


def score(result: Any, rows: list[list[int]]) -> dict[str, float]:
    """The grid's per-attack metrics against variable-length true sequences (no padding tokens)."""
    flat = [t for r in rows for t in r]
    out = {f"token_{k}": v for k, v in token_prf(result.bag, flat).items()}
    if result.token_scores is not None:
        out.update(ranking_score(result.token_scores, flat))
    if result.sequences:
        best = [max(result.sequences, key=functools.partial(_rouge_to, t)) for t in rows]
        n = max(1, len(rows))
        out.update({"rouge1": sum(rouge_n(b, t, 1) for b, t in zip(best, rows)) / n,
                    "rouge2": sum(rouge_n(b, t, 2) for b, t in zip(best, rows)) / n,
                    "exact": sum(list(b) == t for b, t in zip(best, rows)) / n})
    return out


def attack_update(obs: Observation, rows: list[list[int]], vocab: int, cfg: Config, canary: list[int],
                  alphabet: list[int], prior: torch.Tensor | None = None) -> dict[str, Any]:
    """Run the configured attacks on one observation and aggregate them like one grid cell (one seed).
    ``prior``: token counts of text the client does not hold (the frequency-guess baseline; None = chance)."""
    per, skipped, canary_frac = run.run_attacks(obs, cfg.audit, canary, alphabet, cfg.run.seed,
                                                functools.partial(score, rows=rows))
    distinct = len({t for r in rows for t in r})
    chance = distinct / vocab
    flat = [t for r in rows for t in r]
    baseline = ranking_score(prior, flat)["top_true"] if prior is not None and flat else chance
    ranking = sorted(a for a, m in per.items() if "top_true" in m and run.RANKING_COPIES.get(a) not in per)
    tops = [per[a]["top_true"] for a in ranking]
    pvalues = [run.binomial_tail(round(t * distinct), distinct, baseline) for t in tops]
    best = {k: max((float(m.get(k, 0.0)) for m in per.values()), default=0.0)
            for k in ("token_f1", "rouge2", "exact")}
    row: dict[str, Any] = {
        **best, "best_attack": max(per, key=lambda a: (per[a].get("token_f1", 0.0), per[a].get("top_true", 0.0)),
                                   default="-"),
        "top_true": max(tops, default=0.0), "baseline": baseline, "chance": chance,
        "hit_pvalue": min(pvalues, default=1.0),
        "ranking_attacks": len(ranking), "canary_exposure": canary_frac,
        "per_attack": {a: {k: m.get(k, 0.0) for k in ("token_f1", "top_true", "rouge2", "exact")}
                       for a, m in per.items()}, "not_applicable": skipped}
    row["lift"] = run.lift(row["top_true"], baseline)
    row["verdict"] = run.verdict(row, cfg.audit)
    return row


def _prior(rt: Any, partition: int, vocab: int) -> torch.Tensor:
    """Token counts over the other clients' partitions: same-domain text the attacked client does not hold."""
    counts = torch.zeros(vocab)
    for p in range(len(rt.partitions)):
        if p != partition:
            for ids in rt.client_dataset(p).input_ids:
                counts += torch.bincount(torch.as_tensor(list(ids), dtype=torch.long), minlength=vocab)[:vocab]
    return counts


def _canary_setup(rt: Any, cfg: Config) -> tuple[int, list[int]]:
    """(length of the prefix every example shares — a public template, not a secret — and the public
    alphabet: every token id of the training data)."""
    if "label_and_canary" not in cfg.audit.attacks:
        return 0, []
    seqs = [list(ids) for p in range(len(rt.partitions)) for ids in rt.client_dataset(p).input_ids]
    common = 0
    while seqs and all(len(s) > common and s[common] == seqs[0][common] for s in seqs):
        common += 1
    return common, sorted({t for s in seqs for t in s})


def _truth(rt: Any, cfg: Config, cap: Captured) -> tuple[list[list[int]], str]:
    """True token rows of the stacked rounds and how they were determined (``drawn`` / ``partition``; ``sum``:
    a SecAgg+ mean, scored against every client's truth of that round)."""
    updates = [*cap.history, cap.update]
    if cap.update.partition_id < 0:  # a secure sum: what every client drew (all of them are in the default sum)
        parts = [replace(cap, update=replace(cap.update, partition_id=p), history=[])
                 for p in range(len(rt.partitions))]
        return [r for part in parts for r in _truth(rt, cfg, part)[0]], "sum"
    dataset = rt.client_dataset(cap.update.partition_id)
    if cfg.privacy.mode in ("local", "both"):
        return [list(x) for x in dataset.input_ids], "partition"
    idx = list(dict.fromkeys(i for u in updates for i in drawn_indices(cfg, u.round, u.partition_id, len(dataset))))
    return [list(dataset.input_ids[i]) for i in idx], "drawn"


def _round_metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    return {int(r["round"]): r for r in report.read_metrics(run_dir)}


def _row(cfg: Config, cap: Captured, truth: str, rows: list[list[int]], found: dict[str, Any],
         metrics: dict[str, Any], density: float, dense_bytes: int) -> dict[str, Any]:
    """One report row: the attack's outcome plus this client's epsilon and the round's bytes and utility."""
    u = cap.update
    replies = max(1, int(metrics.get("replies") or 1))
    payload = (metrics.get("bytes_up", 0) - metrics.get("up_framing", 0)) / replies
    eps_client = metrics.get("epsilon_client")
    eps = u.metrics.get("epsilon-local", eps_client if eps_client is not None else math.inf)
    stale = u.metrics.get("staleness")  # FedBuff only
    return {"round": u.round, "client": u.partition_id, "node": u.node,
            "staleness": None if stale is None else int(stale), "truth": truth, "examples": len(rows),
            "stacked": len(cap.history), "density": density, **found, "epsilon": float(eps),
            "epsilon_client": eps_client, "payload_bytes": int(payload), "dense_bytes": dense_bytes,
            "train_loss": u.metrics.get("train-loss"), "eval_accuracy": metrics.get("eval_accuracy"),
            "eval_loss": metrics.get("eval_loss"), "eval_perplexity": metrics.get("eval_perplexity")}


def audit_run(cfg: Config, attacks: Sequence[str] | None = None, rounds: Sequence[int] | None = None,
              clients: Sequence[int] | None = None, stack: int = 0,
              on_update: UpdateCallback | None = None, fallback: bool = False) -> Path:
    """Run the scenario, attack the selected (round, client) updates the server decoded, and write
    ``audit.md`` / ``audit.csv`` / ``audit.png`` into the run directory (returned).

    ``rounds`` / ``clients`` (partition ids) select the attacked updates (None = all); ``stack`` gives
    each attack that many earlier updates of the same client as history; ``fallback``: a selected round that
    none of ``clients`` took part in is attacked on its lowest partition's update (:class:`Recorder`).
    ``on_update(i, total, row)`` is called after each attacked update (progress display).
    """
    from fedpeft.compression import make_codec
    from fedpeft.runtime import get_runtime
    from fedpeft.simulation import runner

    cfg = check(cfg, attacks)
    recorder = Recorder(rounds, clients, stack, fallback)
    run_dir = runner.simulate(cfg, observers=[recorder])
    recorder.finish()
    log.info("capture: %d update(s) selected in %s", len(recorder.captured), run_dir)
    rt = get_runtime(cfg)
    model = rt.model
    vocab = model.get_input_embeddings().num_embeddings
    per_round = _round_metrics(run_dir)
    density = float(getattr(make_codec(cfg.compression.uplink).params, "p", 1.0))
    dense_bytes = 4 * rt.layout.total
    common, alphabet = _canary_setup(rt, cfg)
    todo = sorted(recorder.captured, key=lambda c: (c.update.round, c.update.partition_id))
    recorder.captured = []
    total = len(todo)
    out: list[dict[str, Any]] = []
    with torch.random.fork_rng(devices=[]):
        for i in range(total):
            cap = todo.pop(0)  # drop each update's states once attacked
            start = time.perf_counter()
            rows, truth = _truth(rt, cfg, cap)
            first = rows[0] if rows else []
            canary = first[common:common + run.CANARY_LEN] or first[-run.CANARY_LEN:]
            obs = observation(model, cfg, cap, rt.full_state({}))
            prior = _prior(rt, cap.update.partition_id, vocab) if cap.update.partition_id >= 0 else None
            found = attack_update(obs, rows, vocab, cfg, canary, sorted(set(alphabet) | set(canary)), prior)
            row = _row(cfg, cap, truth, rows, found, per_round.get(cap.update.round, {}), density, dense_bytes)
            row["seconds"] = time.perf_counter() - start
            out.append(row)
            log.info("capture: round %d client %d -> %s (F1 %.2f)", row["round"], row["client"], row["verdict"],
                     row["token_f1"])
            if on_update:
                on_update(i, total, row)
    write(run_dir, cfg, out, list(per_round.values()))
    return run_dir


def _run_summary(cfg: Config, metrics: list[dict[str, Any]]) -> str:
    """The run's utility, bytes and epsilon (from metrics.jsonl) in one paragraph."""
    if not metrics:
        return "The run wrote no metrics."
    last = metrics[-1]
    evals = [m for m in metrics if m.get("eval_accuracy") is not None or m.get("eval_perplexity") is not None]
    util = "-"
    if evals:
        e = evals[-1]
        util = (f"eval accuracy {e['eval_accuracy']:.3f}" if e.get("eval_accuracy") is not None
                else f"eval perplexity {e['eval_perplexity']:.3g}") + f" after round {e['round']}"
    eps = [f"local epsilon {max(m['epsilon_local'] for m in metrics if 'epsilon_local' in m):.3g}"] \
        if any("epsilon_local" in m for m in metrics) else []
    eps += [f"client-level epsilon {last['epsilon_client']:.3g}"] if last.get("epsilon_client") is not None else []
    up = sum(m.get("bytes_up", 0) for m in metrics)
    down = sum(m.get("bytes_down", 0) for m in metrics)
    return (f"Run: {len(metrics)} round(s), {util}; {', '.join(eps) or 'no DP (epsilon ∞)'} at delta "
            f"{cfg.privacy.delta:g}; {report.human_bytes(up)} up, {report.human_bytes(down)} down in total.")


def write(out: Path, cfg: Config, rows: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> None:
    """audit.csv, audit.md and (if output.plots and there are rows) audit.png of a captured run."""
    with open(out / "audit.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    utility = "eval_accuracy" if cfg.model.task == "classification" else "eval_perplexity"
    cols = ["round", "client", "truth", "examples", "verdict", "best_attack", "token_f1", "rouge2", "exact",
            "top_true", "baseline", "lift", "chance", "hit_pvalue", "canary_exposure", "epsilon", "payload_bytes",
            utility]
    table = [[("∞" if math.isinf(r[c]) else r[c]) if c == "epsilon" else (f"**{r[c]}**" if c == "verdict" else r[c])
              for c in cols] for r in rows]
    attacks = [a for a in cfg.audit.attacks if any(a in r["per_attack"] for r in rows)]
    detail = [[r["round"], r["client"], *(r["per_attack"].get(a, {}).get("token_f1") for a in attacks),
               *(r["per_attack"].get(a, {}).get("top_true") for a in attacks)] for r in rows]
    a, t = cfg.adapter, cfg.train
    targets = "+".join(a.target_modules) or "peft default"
    text = [f"# Privacy audit of a federated run: `{cfg.run.name}`\n",
            f"An honest-but-curious server attacking the updates it decoded in this run (`{out.name}`): after the "
            f"uplink codec `{cfg.compression.uplink}`, privacy mode `{cfg.privacy.mode}`. Model `{cfg.model.name}` "
            f"({cfg.model.task}), adapter `{a.type}` (r {a.r}, targets {targets}). Public metadata given to the "
            f"attacks: batch size {t.batch_size}, local steps {t.local_steps or t.local_epochs}, lr {t.lr:g}, "
            f"optimizer {t.optimizer}, sequence length <= {cfg.model.max_length}.\n",
            _run_summary(cfg, metrics) + "\n",
            f"Verdicts: {verdict_counts(rows)} (of {len(rows)} observed updates).\n"]
    if not rows:
        text.append("No individual update was observed (secure aggregation, or nothing selected): there is "
                    "nothing for this server to attack.\n")
    else:
        text += [report.markdown_table(cols, table), *not_applicable_lines(rows),
                 "\n### Per attack (token F1, then top_true)\n",
                 report.markdown_table(["round", "client", *(f"F1 {x}" for x in attacks),
                                        *(f"top {x}" for x in attacks)], detail)]
    text += ["", "## Legend\n", *metric_legend(cfg), *NOTES, *(FEDBUFF_NOTES if cfg.federation.buffer_size else [])]
    (out / "audit.md").write_text("\n".join(text) + "\n")
    if cfg.output.plots and rows:
        plot(rows, out / "audit.png")


NOTES = [
    "- **truth**: `drawn` = scored against exactly the examples this client's seeded sampler drew in that round "
    "(replayed from `client_seed` and `train_local`'s loader); `partition` = against the client's whole partition "
    "(local DP-SGD: the Poisson sample is not replayed); `sum` = under SecAgg+ the server holds only the mean of the "
    "summed updates (client -1), scored against every client's truth of that round. **examples**: how many true "
    "examples that is; **client**: the partition id.",
    "- **epsilon**: this client's local DP-SGD epsilon after that round (the reply's `epsilon-local`), else the "
    "server's client-level epsilon after that round (it protects the released model, not a reply against this "
    "server), else ∞.",
    "- **payload_bytes**: mean encoded uplink payload per reply in that round (metrics.jsonl `bytes_up` minus "
    "Flower framing, over the replies); **eval_accuracy** / **eval_perplexity**: the global model after that round "
    "(`-` where the round did not evaluate).",
]
FEDBUFF_NOTES = [
    "- **FedBuff** (`federation.buffer_size`): **round** is the round the client was sent, i.e. it trained from the "
    "global adapter after round - 1 (and its sampler is replayed for that round); audit.csv's **staleness** says how "
    "many updates later the server applied it. The attacked delta is the decoded one, before the staleness weight.",
]
