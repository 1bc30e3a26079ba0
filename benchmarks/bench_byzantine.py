"""Byzantine robustness (issue 15): aggregation strategies under the adversary harness.

MiniLM-L6 + LoRA on BBC News (the embedded default), 10 clients of which 2 attack (``[adversary]``, drawn
from the seed): scaling x10, sign flip, weight inflation, a backdoor; each strategy x uplink codec x seed also
runs clean (no attacker) as the reference. The table gives, per strategy, uplink and attack, the mean over
seeds (and per seed) of the final clean accuracy, the eval loss and the backdoor success rate (held-out examples of
the other labels with the trigger, classified as the target; for the clean run the same measurement on its final
adapter: the per-seed floor a defence cannot go below), and the differences to the clean run of the same seed.
Targets: the best robust aggregator within 2 points of the clean run (also with compeft:0.1), backdoor success
<= 10 % with the defence.

Strategies default to fedavg and every registered aggregator that reads the individual updates (the robust
ones: ``robust`` where an aggregator declares it, else ``needs_individual_updates``).

Usage: python benchmarks/bench_byzantine.py [--quick] [--strategies fedavg,median] [--uplinks none,compeft:0.1]
       [--attacks scale:10,sign_flip,weight_inflation,backdoor] [--seeds 0,1,2] [--set k=v] [--no-append]
``--quick``: 2 rounds x 2 local steps (lr 5e-3) on shorter, fewer examples, one evaluation and one seed (unless
--seeds is given), to check the grid end to end; its numbers are not the issue's targets. A quick run is 40
MiniLM steps of 8 x 64 tokens plus one evaluation: measured 2.3 CPU-minutes per run on 2 cores that other jobs
kept at a load of 7, so on such a machine give it one or two strategies (--strategies) to stay near 15 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from common import append_results, table  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedpeft import (  # noqa: E402
    adversary,  # noqa: E402
    config,
    models,
    report,
)
from fedpeft.runtime import get_runtime  # noqa: E402
from fedpeft.server.aggregators import AGGREGATORS  # noqa: E402
from fedpeft.simulation import runner  # noqa: E402
from fedpeft.simulation.sweep import split_codecs  # noqa: E402
from fedpeft.training import evaluate  # noqa: E402

QUICK = ["federation.rounds=2", "federation.eval_every=2", "train.local_steps=2", "train.batch_size=8",
         "train.lr=0.005", "model.max_length=64", "data.max_examples=500", "train.max_eval_examples=120"]
CLEAN = "clean"


def robust_strategies() -> list[str]:
    """fedavg, then every registered aggregator that reads the individual updates."""
    return ["fedavg", *(name for name in AGGREGATORS if name != "fedavg" and getattr(
        AGGREGATORS.get(name), "robust", AGGREGATORS.get(name).needs_individual_updates))]


def attack_sets(spec: str) -> list[str]:
    """``scale:10`` -> the attack's overrides (the value sets its first ``[adversary]`` key, here factor)."""
    name, _, value = spec.partition(":")
    sets = [f'adversary.attack="{name}"']
    if value:
        keys = adversary.ATTACKS.get(name).keys
        if not keys:
            raise SystemExit(f"--attacks {spec}: {name} takes no value")
        sets.append(f"adversary.{keys[0]}={value}")
    return sets


def backdoor_rate(cfg: config.Config, run_dir: Path) -> float:
    """The backdoor success rate of a run's final global adapter (the clean runs' reference)."""
    rt = get_runtime(cfg)  # the run's own runtime, still cached in this process
    models.set_adapter_state(rt.model, load_file(str(run_dir / "checkpoint" / "global.safetensors")))
    ds = adversary.backdoor_eval_set(rt)
    return evaluate(rt.model, ds, rt.collate, cfg.train.eval_batch_size, rt.device, "classification")["eval_accuracy"]


def run_one(sets: list[str]) -> dict[str, Any]:
    """One simulation; its final metrics."""
    cfg = config.load(None, sets)
    run_dir = runner.simulate(cfg)
    rows = report.read_metrics(run_dir)
    last = rows[-1]
    bd = last.get("backdoor_success")
    return {"accuracy": last["eval_accuracy"], "loss": last["eval_loss"],
            "backdoor": bd if bd is not None else backdoor_rate(cfg, run_dir),
            "weight": statistics.mean([r["adversary_weight"] for r in rows if r.get("adversary_weight") is not None]
                                      or [0.0]),
            "dropped": sum(len(r.get("dropped_nodes", {})) for r in rows),
            "excluded": sum(len(r.get("excluded_nodes", {})) for r in rows),
            "attackers_out": sum(len(r.get("adversaries_dropped", {})) + len(r.get("adversaries_excluded", {}))
                                 for r in rows)}


def cells(runs: list[dict[str, Any]], clean: list[dict[str, Any]]) -> list[str]:
    """Table cells of one attack over the seeds: means, and mean differences to the clean run of each seed."""
    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in runs)

    def vs_clean(key: str) -> float:
        return statistics.mean(r[key] - c[key] for r, c in zip(runs, clean))

    def per_seed(key: str, scale: float, fmt: str) -> str:
        return " / ".join(f"{scale * r[key]:{fmt}}" for r in runs)

    return [f"{mean('accuracy'):.4f}", per_seed("accuracy", 1, ".3f"), f"{mean('loss'):.4g}", f"{mean('backdoor'):.3f}",
            per_seed("backdoor", 100, ".1f"),
            f"{100 * vs_clean('accuracy'):+.1f}", f"{vs_clean('loss'):+.3g}", f"{mean('weight'):.2f}",
            str(sum(r["dropped"] for r in runs)), str(sum(r["excluded"] for r in runs)),
            str(sum(r["attackers_out"] for r in runs))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", default=",".join(robust_strategies()),
                    help="registered aggregators (default: fedavg + the registered robust ones)")
    ap.add_argument("--uplinks", default="none,compeft:0.1")
    ap.add_argument("--attacks", default="scale:10,sign_flip,weight_inflation,backdoor",
                    help="attack[:value of its first key], e.g. scale:100")
    ap.add_argument("--seeds", default=None, help="default 0,1,2 (0 with --quick)")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--adversaries", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="few rounds and local steps, short examples, one seed")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="extra setting for every run (e.g. a robust aggregator's parameter, run.threads=1)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in strategies:
        AGGREGATORS.get(s)  # an unknown name lists the registered ones, before any run
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    attacks = [CLEAN, *(a.strip() for a in args.attacks.split(",") if a.strip())]
    uplinks = split_codecs(args.uplinks)
    results: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as out:
        base = [f'output.dir="{out}"', "output.plots=false", "data.source=\"bbc_news\"",
                f"data.num_clients={args.clients}", *(QUICK if args.quick else []), *args.overrides]
        for strategy in strategies:
            for uplink in uplinks:
                for seed in seeds:
                    for attack in attacks:
                        sets = [*base, f'federation.strategy="{strategy}"', f'compression.uplink="{uplink}"',
                                f"run.seed={seed}"]
                        if attack != CLEAN:
                            sets += [*attack_sets(attack), f"adversary.fraction={args.adversaries / args.clients}"]
                        results[strategy, uplink, attack, seed] = r = run_one(sets)
                        print(json.dumps({"strategy": strategy, "uplink": uplink, "attack": attack, "seed": seed,
                                          **r}), flush=True)
    rows = []
    for strategy in strategies:
        for uplink in uplinks:
            for attack in attacks:
                rows.append([strategy, uplink, attack, *cells([results[strategy, uplink, attack, s] for s in seeds],
                                                              [results[strategy, uplink, CLEAN, s] for s in seeds])])
    header = ["strategy", "uplink", "attack", "clean accuracy", "per seed", "eval loss", "backdoor success",
              "per seed (%)", "accuracy vs clean (pt)", "loss vs clean", "attacker weight share", "dropped updates",
              "left out by the aggregator", "attacker updates dropped or left out"]
    settings = " ".join([*(QUICK if args.quick else []), *args.overrides]) or "the embedded default's"
    body = (f"MiniLM-L6 + LoRA r8 on BBC News, {args.clients} clients, {args.adversaries} attacking (drawn from the "
            f"seed), seeds {seeds}, settings: {settings}; means over seeds, differences to the clean run of the same "
            "seed.\n\n" + table(header, rows))
    print(body)
    if not args.no_append:
        append_results("Byzantine clients: strategies under the adversary harness", body)


if __name__ == "__main__":
    main()
