"""Benchmark federation.lora_aggregation: seconds per round of server aggregation for 100 client updates of
LoRA r = 16 on all-MiniLM-L6 shapes (12 modules of 384 x 384 on query/value + the 5-label head), one thread.
Target (issue 19): <= 1 s per round on one core.

Each mode aggregates what travels under it: ``naive`` the A and B deltas with FedAvg plus the
``lora_agg_error`` the server computes every round, ``exact``, ``svd``, ``svd_delta`` (which also steps its
dense float64 state) and ``stack`` (which folds into its correction) the same deltas by their product means,
``zeropad`` the factors, ``freeze_a`` B only, ``share_a`` A only (both with FedAvg). All clients at r = 16.
Updates are dense Gaussian deltas (codec ``none``); the global factors are non-zero (a later round).

    python benchmarks/bench_lora_agg.py [--clients 100] [--repeats 3] [--no-append]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedpeft import lora  # noqa: E402
from fedpeft.server.replies import ClientReply, RoundReplies  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_robust_aggregation import RANK, minilm_lora, seconds  # noqa: E402
from common import append_results, machine, table  # noqa: E402

TARGET_S = 1.0
MODES = ("naive", "exact", "svd", "svd_delta", "zeropad", "stack", "freeze_a", "share_a")
HELD_BACK = {"freeze_a": ".lora_A.", "share_a": lora.PERSONAL}  # the factor that does not travel


def travelling(state: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` that are sent under ``mode``."""
    return {k: v for k, v in state.items() if mode not in HELD_BACK or HELD_BACK[mode] not in k}


def error_seconds(rounds: RoundReplies, global_state: dict, repeats: int) -> tuple[float, float]:
    """(median wall, median thread-CPU) seconds of the loop's per-round ``lora_agg_error`` under ``naive``."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.thread_time()
        lora.agg_error(lora.pair_means(rounds.deltas, rounds.weights, global_state))
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    global_state = minilm_lora(torch.Generator().manual_seed(99), 0.02)
    deltas = [minilm_lora(g, 1e-3) for _ in range(args.clients)]
    rows = []
    for mode in MODES:
        sent = travelling(global_state, mode)
        rounds = RoundReplies(clients=[ClientReply(i, 100.0, {"num-examples": 100.0}, travelling(d, mode))
                                       for i, d in enumerate(deltas)])
        wall, cpu = seconds("fedavg", {"lora_aggregation": mode}, rounds, sent, args.repeats)
        if mode == "naive":  # the loop adds the error of factor averaging every round
            wall, cpu = (x + y for x, y in zip((wall, cpu), error_seconds(rounds, sent, args.repeats)))
        rows.append([mode, f"{sum(v.numel() for v in sent.values()):,}", f"{wall:.3f}", f"{cpu:.3f}",
                     "yes" if cpu <= TARGET_S else "NO"])
        print(rows[-1], flush=True)
    body = (f"{args.clients} client updates (all-MiniLM-L6 shapes, LoRA r = {RANK} on query/value + head), 1 thread, "
            f"seconds of server aggregation per round (median of {args.repeats}, wall and thread CPU); target <= "
            f"{TARGET_S:g} s of one core (judged on the CPU time)\n\n"
            + table(["lora_aggregation", "elements per update", "wall s", "CPU s", "<= 1 s"], rows))
    print(f"\n{machine()}\n\n{body}")
    if not args.no_append:
        append_results("LoRA aggregation speed", body)


if __name__ == "__main__":
    main()
