"""Roofline of local training on MiniLM (issue 21): the machine's torch.mm rate at the model's shapes, fp32
and bf16, beside the FLOP rate a real training step achieves in each precision.

A step's FLOPs are counted exactly by ``torch.utils.flop_counter.FlopCounterMode`` over one forward and
backward pass of the embedded default's model (LoRA r = 8, batch 16 x 128 tokens): every matmul autograd
really runs (frozen weights get input gradients only, LoRA factors both, attention both operands).
The step times come from ``fedpeft.training.train_local`` (AdamW, clipping) in fp32 and under CPU bf16
autocast, the two interleaved so that the ratio is measured side by side.

Usage: python benchmarks/bench_roofline.py [--steps 4] [--threads 2] [--no-append]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import append_results, table  # noqa: E402


def mm_rate(m: int, k: int, n: int, dtype, seconds: float = 1.0) -> float:
    """GFLOP/s of torch.mm (m x k) @ (k x n) in ``dtype`` (median of repeated timings over ``seconds``)."""
    import torch

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * m * k * n / times[len(times) // 2] / 1e9


def step_flops(rt, batch) -> int:
    """FLOPs of one forward + backward pass, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    rt.model.train()
    with FlopCounterMode(display=False) as counter:
        rt.model(**batch).loss.backward()
    rt.model.zero_grad(set_to_none=True)
    rt.model.eval()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="training steps per timing (after one warm-up step)")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved fp32/bf16 timings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    import torch

    from fedpeft import config, models
    from fedpeft.runtime import get_runtime
    from fedpeft.training import cpu_has_native_bf16, train_local

    torch.set_num_threads(args.threads)
    cfg = config.load(None, [])
    rt = get_runtime(cfg)
    tokens, d = cfg.train.batch_size * cfg.model.max_length, rt.model.config.hidden_size
    ff = rt.model.config.intermediate_size
    shapes = [(tokens, d, d), (tokens, d, ff), (tokens, ff, d)]
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        flops = sum(2 * m * k * n for m, k, n in shapes)
        secs = sum(2 * m * k * n / (mm_rate(m, k, n, dtype) * 1e9) for m, k, n in shapes)
        rates[name] = flops / secs / 1e9  # the FLOP-weighted rate over the layer shapes
    dataset = rt.client_dataset(0)
    batch = rt.collate([dataset[i] for i in range(cfg.train.batch_size)])
    assert batch["input_ids"].shape == (cfg.train.batch_size, cfg.model.max_length), "BBC texts fill 128 tokens"
    flops = step_flops(rt, batch)
    start = rt.initial_adapter()
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.repeat):
        for precision in ("fp32", "bf16"):
            train = dataclasses.replace(cfg.train, precision=precision, local_steps=1)
            models.set_adapter_state(rt.model, start)
            train_local(rt.model, dataset, rt.collate, train, rt.device, seed=1)  # warm-up
            train = dataclasses.replace(train, local_steps=args.steps)
            times[precision].append(train_local(rt.model, dataset, rt.collate, train, rt.device, seed=1).seconds
                                    / args.steps)
    rows = []
    for precision in ("fp32", "bf16"):
        step = min(times[precision])
        achieved = flops / step / 1e9
        rows.append([precision, f"{rates[precision]:.1f}", f"{step:.3f}", f"{achieved:.1f}",
                     f"{100 * achieved / rates[precision]:.0f}%", f"{100 * achieved / rates['bf16']:.0f}%"])
    speedup = min(times["fp32"]) / min(times["bf16"])
    body = table(["precision", "torch.mm GFLOP/s at MiniLM shapes", "train step s", "step GFLOP/s",
                  "of this precision's mm rate", "of the bf16 mm rate"], rows)
    body += (f"\n\nOne step = {flops / 1e9:.1f} GFLOP (FlopCounterMode, forward + backward, batch "
             f"{cfg.train.batch_size} x {cfg.model.max_length}, LoRA r = {cfg.adapter.r}); mm shapes {shapes}; "
             f"{args.threads} threads; native bf16: {cpu_has_native_bf16()}; bf16 step speed-up {speedup:.2f}x "
             f"(best of {args.repeat} interleaved timings of {args.steps} steps each).")
    print(body)
    if not args.no_append:
        append_results("Roofline: MiniLM LoRA training step vs torch.mm (bench_roofline.py)", body)


if __name__ == "__main__":
    main()
