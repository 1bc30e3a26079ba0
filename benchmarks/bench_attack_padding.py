"""Exact-sequence recovery of padded batches by ``span_decode``, on independent victims.

Usage: ``python benchmarks/bench_attack_padding.py [--archs llama,gpt2] [--dtypes float64,float32]
[--texts random,words] [--updates gradient,sgd:0.01] [--batch-sizes 1,2,4] [--seeds 3] [--r 32] [--pad-in-loss]
[--no-append]``

Each victim is a tiny causal LM built with plain transformers + peft (``tests/plain_victims.py``: 2 layers,
hidden 64, float64 or float32, LoRA on the attention input with a trained global adapter) and one client step
on a batch of sentences of different lengths, right-padded to 12 tokens with attention mask 0 and label -100
on padding (``--pad-in-loss``: labels = ids, the padding stays in the loss): ``random`` sentences of 4-12
token ids below 300 ending in EOS, or ``words``, 3-10 English words
through the packaged MiniLM WordPiece tokenizer (``[CLS] the ... [SEP]``, vocabulary 30,522). The update is
the gradient itself, or one SGD step (``sgd:LR``: local − global in the model's dtype, which the server
rescales by −1/lr). Per (model, text, update, dtype, batch size), one value per seed: the visible tokens
(what the layer-1 span must hold), exact-sequence rate and ROUGE-L (true sentences without padding, each
against its best recovered sequence), bag-of-token F1; the mean exact rate over seeds and the slowest
attack's time. Appends a dated section to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # the independent victims
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, table  # noqa: E402
from plain_victims import padded_victim  # noqa: E402

from fedpeft.attacks import run_attack  # noqa: E402
from fedpeft.attacks.metrics import summarize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="llama,gpt2")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--texts", default="random,words")
    ap.add_argument("--updates", default="gradient,sgd:0.01")
    ap.add_argument("--batch-sizes", default="1,2,4")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--r", type=int, default=32, help="LoRA rank (within budget: visible tokens <= modules x r)")
    ap.add_argument("--pad-in-loss", action="store_true", help="the client keeps the padding in the loss")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    cells = [(a, t, u, d) for a in args.archs.split(",") for t in args.texts.split(",")
             for u in args.updates.split(",") for d in args.dtypes.split(",")]
    for arch, text, update, dtype in cells:
        sgd_lr = float(update.split(":", 1)[1]) if update.startswith("sgd:") else None
        for b in (int(v) for v in args.batch_sizes.split(",")):
            per: dict[str, list[float]] = {"visible": [], "exact": [], "rougeL": [], "token_f1": [], "s": []}
            for seed in range(args.seeds):
                obs, ids, mask = padded_victim(b, seed, arch=arch, r=args.r, dtype=getattr(torch, dtype), text=text,
                                               sgd_lr=sgd_lr, pad_in_loss=args.pad_in_loss)
                t0 = time.perf_counter()
                m = summarize(run_attack("span_decode", obs), ids, mask)
                m.update(visible=float((mask.sum(1) - 1).sum()), s=time.perf_counter() - t0)
                for k, v in per.items():
                    v.append(m[k])
            rows.append([arch, text, update, dtype, b, " / ".join(f"{v:.0f}" for v in per["visible"]),
                         f"{statistics.mean(per['exact']):.2f}",
                         *(" / ".join(f"{v:.2f}" for v in per[k]) for k in ("exact", "rougeL", "token_f1")),
                         f"{max(per['s']):.1f}"])
            print(*rows[-1], flush=True)
    out = table(["model", "text", "update", "dtype", "batch", "visible tokens", "exact (mean)", "exact", "ROUGE-L",
                 "bag F1", "max s"], rows)
    print(out)
    settings = (f"Victims: tiny {args.archs} causal LMs (plain transformers + peft), hidden 64, {args.dtypes}, "
                f"LoRA r = {args.r} (llama: q/k/v, gpt2: c_attn), trained global adapter, one step on a batch "
                "right-padded to 12 tokens (mask 0, label "
                f"{'= the pad id: padding kept in the loss' if args.pad_in_loss else '-100'}); "
                "text `random`: 4-12 token ids below 300 ending in EOS, `words`: WordPiece `[CLS] the ... [SEP]`; "
                "update: the gradient, or one SGD step at lr (local - "
                "global in the model's dtype, rescaled by -1/lr). Visible tokens: sentence lengths - 1 (the last token "
                "of each sentence is invisible to span tests, recovered from the label channel). Exact / ROUGE-L: "
                "each true sentence without padding against its best recovered sequence; bag F1: the span bag "
                "against the unpadded tokens.")
    if not args.no_append:
        append_results("span_decode on padded batches (independent plain transformers + peft victims)"
                       + (", padding kept in the loss" if args.pad_in_loss else ""),
                       f"{settings}\n\n{out}")


if __name__ == "__main__":
    main()
