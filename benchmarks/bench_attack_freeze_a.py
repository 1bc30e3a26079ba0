"""What the server reads from each LoRA aggregation mode's update, freeze_a (FFA-LoRA: only dB travels) beside
naive (dA and dB) and share_a (dA only), 3 seeds.

Usage: ``python benchmarks/bench_attack_freeze_a.py [--seeds 3] [--ranks 16,64] [--batches 1,2,4] [--no-append]``

1. ``fedpeft audit --capture`` of real runs, the setting of ``tests/test_audit_capture.py``: tiny LLaMA (hidden
   128), LoRA r on q/k/v, 3 clients, one SGD step on one private example of random characters (about 32 distinct
   tokens) per client and round, round 2 attacked with ``span`` and ``subspace_opt``; ``run.seed`` = seed. Per
   mode and r: the best attack's token F1 and top_true (mean over seeds x clients), the frequency-prior baseline,
   verdicts, uplink payload per reply.
2. An independent victim (plain transformers + peft, ``tests/test_attacks_freeze_a.py::victim``): tiny LLaMA
   (hidden 64, vocab 300), LoRA r = 16 on q/k/v, later round, one SGD gradient on B padded random sentences, A
   frozen (freeze_a) or trained (naive): bag F1 of ``span`` and of ``grad_match`` (span candidates, one sweep).

Appends a dated section to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # the capture setting and the independent victim
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, table  # noqa: E402
from test_attacks_freeze_a import victim  # noqa: E402
from test_audit_capture import FAST, _rows, _sets  # noqa: E402

from fedpeft import config  # noqa: E402
from fedpeft.attacks import run_attack  # noqa: E402
from fedpeft.attacks.metrics import token_prf  # noqa: E402
from fedpeft.audit import capture  # noqa: E402

MODES = ("naive", "share_a", "freeze_a")


def _mean(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f}" if values else "-"


def captured(seeds: int, ranks: list[int]) -> str:
    """Part 1: the audit of real runs per mode and rank."""
    rows = []
    for r in ranks:
        for mode in MODES:
            got: list[dict[str, str]] = []
            t0 = time.perf_counter()
            for seed in range(seeds):
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = config.load(None, _sets(Path(tmp), **{"federation.lora_aggregation": mode,
                                                                       "adapter.r": r, "run.seed": seed}))
                    got += _rows(capture.audit_run(cfg, FAST, rounds=[2]))
            verdicts = {v: sum(g["verdict"] == v for g in got) for v in ("fail", "warn", "pass")}
            rows.append([mode, r, len(got), _mean([float(g["token_f1"]) for g in got]),
                         f"{min(float(g['token_f1']) for g in got):.2f}-{max(float(g['token_f1']) for g in got):.2f}",
                         _mean([float(g["top_true"]) for g in got]), _mean([float(g["baseline"]) for g in got]),
                         "/".join(str(verdicts[v]) for v in verdicts), sorted({g["best_attack"] for g in got}),
                         int(statistics.mean(int(g["payload_bytes"]) for g in got)),
                         f"{time.perf_counter() - t0:.0f}"])
            print(*rows[-1], flush=True)
    return table(["mode", "r", "updates", "token F1 (mean)", "range", "top_true", "prior baseline",
                  "fail/warn/pass", "best attack", "payload B", "seconds"], rows)


def independent(seeds: int, batches: list[int]) -> str:
    """Part 2: span and grad_match on the plain-peft victim, A frozen or trained."""
    rows = []
    for b in batches:
        for frozen in (True, False):
            f1: dict[str, list[float]] = {"span": [], "grad_match": []}
            distinct = []
            for seed in range(seeds):
                obs, truth = victim(frozen, b, seed=seed)
                distinct.append(len(set(truth)))
                f1["span"].append(token_prf(run_attack("span", obs).bag, truth)["f1"])
                if b > 1:
                    f1["grad_match"].append(token_prf(run_attack("grad_match", obs, sweeps=1).bag, truth)["f1"])
            rows.append([b, "freeze_a" if frozen else "naive", _mean([float(d) for d in distinct]),
                         _mean(f1["span"]), " / ".join(f"{x:.2f}" for x in f1["span"]), _mean(f1["grad_match"]),
                         " / ".join(f"{x:.2f}" for x in f1["grad_match"]) or "-"])
            print(*rows[-1], flush=True)
    return table(["B", "mode", "distinct tokens", "span F1", "per seed", "grad_match F1", "per seed"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    part1 = captured(args.seeds, [int(v) for v in args.ranks.split(",")])
    part2 = independent(args.seeds, [int(v) for v in args.batches.split(",")])
    body = ("1. `fedpeft audit --capture` (tests/test_audit_capture.py's setting: tiny LLaMA hidden 128, LoRA r on "
            "q/k/v, 3 clients, one SGD step on one private example of random characters, about 32 distinct tokens; "
            f"round 2; span + subspace_opt; run.seed 0..{args.seeds - 1}):\n\n" + part1
            + "\n\n2. Independent victim (plain transformers + peft, tiny LLaMA hidden 64, vocab 300, LoRA r = 16 on "
            "q/k/v, later round, one SGD gradient on B padded random sentences of <= 12 tokens; grad_match: span "
            "candidates, one discrete sweep, not run at B = 1):\n\n" + part2)
    print(body)
    if not args.no_append:
        append_results(f"What each LoRA aggregation mode exposes: freeze_a's dB beside naive and share_a "
                       f"({args.seeds} seeds)", body)


if __name__ == "__main__":
    main()
