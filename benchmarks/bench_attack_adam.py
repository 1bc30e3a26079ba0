"""Span attacks on five AdamW steps: one English sentence, independent victims, 3 seeds.

Usage: ``python benchmarks/bench_attack_adam.py [--victims llama-first,llama-later,minilm-first]
[--seeds 3] [--no-append]``

Victims are built with plain transformers + peft (``tests/plain_victims.py::adamw_victim``), float32: the
client trains five torch AdamW steps (lr 1e-3, betas 0.9/0.999, weight decay 0.01) on one sentence and
sends local − global; the server knows the optimiser, the steps and the learning rate.

* ``llama-*``: tiny random LLaMA (2 layers, hidden 64, RoPE, dropout off) over the packaged MiniLM WordPiece
  vocabulary (30,522), LoRA r = 8 on q/k/v, the first 16 WordPiece tokens of an English sentence.
* ``minilm-*``: the packaged pretrained all-MiniLM-L6-v2 (hidden 384, learned positions, its own dropout 0.1
  on while training: a new mask every step), new 2-class head, LoRA r = 8 on query/value, the first 12 tokens.
* ``first``: first round (peft's LoRA init, B = 0: dL/dA is 0 in the first step); ``later``: every LoRA
  tensor moved off its init.

Attacks: ``sign_span`` (its default ``fit="auto"``: the soft signs where the magnitudes vary, else the signs),
``sign_span (signs)`` (the logistic pursuit on the signs alone, as first measured: ``fit="sign"``),
``subspace_opt`` and ``span`` (the attacks that existed for this case). Bag-of-token F1 against the
sentence; exact: the recovered sequence is the sentence (learned-position models only). Seed s: sentence s
of ``plain_victims.SENTENCES``, model seed s. Appends a dated section to ``benchmarks/RESULTS.md``.
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
from plain_victims import SENTENCES, adamw_victim, wordpiece  # noqa: E402

from fedpeft.attacks import run_attack  # noqa: E402
from fedpeft.attacks.metrics import token_prf  # noqa: E402

#: victim -> (plain_victims.adamw_victim arch, later round, tokens)
VICTIMS = {"llama-first": ("llama", False, 16), "llama-later": ("llama", True, 16),
           "minilm-first": ("minilm", False, 12), "minilm-later": ("minilm", True, 12)}
#: row name -> (registered attack, parameters); "sign_span (signs)" is the attack as first measured
ATTACKS = {"sign_span": ("sign_span", {}),
           "sign_span (signs)": ("sign_span", {"fit": "sign"}),
           "subspace_opt": ("subspace_opt", {}), "span": ("span", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--victims", default="llama-first,llama-later,minilm-first")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated rows of ATTACKS to run")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    attacks = {name: ATTACKS[name] for name in args.attacks.split(",")}
    torch.set_num_threads(1)
    tok = wordpiece()
    summary, rows = [], []
    for name in args.victims.split(","):
        arch, later, length = VICTIMS[name]
        f1s: dict[str, list[float]] = {a: [] for a in attacks}
        exact: dict[str, list[float]] = {a: [] for a in attacks}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            ids = torch.tensor([tok(SENTENCES[seed])["input_ids"][:length]])
            obs = adamw_victim(arch, seed, ids, later=later)
            for attack, (registered, params) in attacks.items():
                t0 = time.perf_counter()
                result = run_attack(registered, obs, **params)
                f1 = token_prf(result.bag, ids[0].tolist())["f1"]
                hit = float(bool(result.sequences) and result.sequences[0] == ids[0].tolist())
                f1s[attack].append(f1)
                exact[attack].append(hit)
                rows.append([name, attack, seed, f"{f1:.2f}", f"{hit:.0f}", len(result.bag),
                             f"{time.perf_counter() - t0:.1f}"])
                print(*rows[-1], flush=True)
        for attack in attacks:
            summary.append([name, attack, f"{statistics.mean(f1s[attack]):.2f}",
                            " / ".join(f"{v:.2f}" for v in f1s[attack]), f"{statistics.mean(exact[attack]):.2f}"])
    body = ("Five torch AdamW steps (lr 1e-3, weight decay 0.01) on one English sentence, B = 1, LoRA r = 8, "
            "float32, victims built with plain transformers + peft (tests/plain_victims.py::adamw_victim): tiny "
            "random LLaMA (hidden 64, q/k/v, 16 WordPiece tokens) and the packaged MiniLM (dropout 0.1 on, "
            "query/value, 12 tokens); first round (B = 0) or later round. Token-bag F1 per seed; exact: the "
            "recovered sequence is the sentence.\n\n"
            + table(["victim", "attack", "mean bag F1", "per seed", "exact"], summary)
            + "\n\n" + table(["victim", "attack", "seed", "bag F1", "exact", "bag size", "seconds"], rows))
    print(body)
    if not args.no_append:
        append_results(f"Span attacks on five AdamW steps, B = 1 (seeds {args.first_seed}-"
                       f"{args.first_seed + args.seeds - 1})", body)


if __name__ == "__main__":
    main()
