"""Span attacks beyond the rank budget: LLaMA r = 8, later round, one SGD step, B = 4 and 16, 3 seeds.

Usage: ``python benchmarks/bench_attack_budget.py [--batches 4,16] [--seeds 3] [--text words|english]
[--rounds 1,2,3] [--drift 0.05] [--hidden 64] [--variants "gap, first;outlier, first"] [--no-append]``

Victims are built with plain transformers + peft (``tests/plain_victims.py::padded_victim``): a tiny random
LLaMA (2 layers, hidden 64, RoPE), LoRA r = 8 on q/k/v (24 first-block rows), a trained global adapter,
float32, one SGD step (lr 0.01, local − global rescaled by −1/lr) on a right-padded batch of WordPiece
sentences: ``--text words`` (``[CLS] the <2-9 random words of a 40-word list> [SEP]``, 12 tokens) or
``--text english`` (B of the 50 hand-written sentences of ``plain_victims.ENGLISH``, 24 tokens: 14-22
tokens each, then padding). Bag-of-token F1 of
``span`` against the unpadded tokens, for its cut rules: ``gap`` (the largest residual gap; nothing where
there is no clear gap) and ``outlier`` (the gap, else the residuals' robust outliers), and its layers
(``first``, ``all``: every layer's rows, context-free inputs past the first). ``--rounds``: the server
observes the same client on the same batch in that many rounds (the global adapter moves by N(0, drift²) per
LoRA entry between two of them) and stacks their rows: rows = 24 x rounds, the effective budget
min(rows, d - 1) and the rank the basis kept (after the noise floor) per cell. ``--hidden``: the tiny
LLaMA's width d (64 by default: a batch with more visible tokens than d - 1 fills the whole input space).
Appends a dated section to ``benchmarks/RESULTS.md``.
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
from fedpeft.attacks.metrics import token_prf, unpadded  # noqa: E402

VARIANTS = {"gap, first": {}, "outlier, first": {"cut": "outlier"}, "outlier, all": {"cut": "outlier", "layers": "all"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="4,16")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--text", default="words", choices=("words", "english"))
    ap.add_argument("--rounds", default="1", help="comma-separated numbers of observed rounds")
    ap.add_argument("--drift", type=float, default=0.05, help="global adapter move between observed rounds")
    ap.add_argument("--hidden", type=int, default=64, help="the tiny LLaMA's hidden size d")
    ap.add_argument("--variants", default=";".join(VARIANTS), help="span variants: names of VARIANTS, by ';'")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    variants = {v: VARIANTS[v] for v in args.variants.split(";")}
    seq_len, what = (12, "WordPiece sentences of 12 tokens (words from a 40-word list)") if args.text == "words" \
        else (24, "hand-written English WordPiece sentences (tests/plain_victims.py::ENGLISH), padded to 24 tokens")
    torch.set_num_threads(1)
    summary, rows = [], []
    for b, n in [(int(v), int(k)) for v in args.batches.split(",") for k in args.rounds.split(",")]:
        f1s: dict[str, list[float]] = {v: [] for v in variants}
        ranks: list[int] = []
        for seed in range(args.seeds):
            obs, ids, mask = padded_victim(b, seed, arch="llama", r=8, text=args.text, seq_len=seq_len,
                                           dtype=torch.float32, sgd_lr=0.01, rounds=n, drift=args.drift,
                                           hidden=args.hidden)
            truth = [t for row in unpadded(ids, mask) for t in row]
            visible = len({t for row in unpadded(ids, mask) for t in row[:-1]})
            for name, params in variants.items():
                t0 = time.perf_counter()
                result = run_attack("span", obs, **params)
                f1s[name].append(token_prf(result.bag, truth)["f1"])
                ranks.append(result.extra["rank"])
                rows.append([b, n, seed, name, visible, result.extra["rows"], result.extra["rank"], len(result.bag),
                             f"{f1s[name][-1]:.2f}", f"{time.perf_counter() - t0:.1f}"])
                print(*rows[-1], flush=True)
        budget = f"{24 * n} / {min(24 * n, args.hidden - 1)} / {min(ranks)}-{max(ranks)}"
        summary += [[b, n, name, f"{statistics.mean(v):.2f}", " / ".join(f"{x:.2f}" for x in v), budget]
                    for name, v in f1s.items()]
    body = (f"Tiny random LLaMA (hidden {args.hidden}), LoRA r = 8 on q/k/v, later round, one SGD step (lr 0.01, "
            "float32) on B "
            f"right-padded {what}, victims built with plain "
            "transformers + peft (tests/plain_victims.py::padded_victim); span bag F1 per cut rule and layers; "
            f"rounds: the same client on the same batch observed that often (drift {args.drift} between rounds), "
            "rows stacked; budget: first-block rows / min(rows, d - 1) / rank kept.\n\n"
            + table(["B", "rounds", "span cut, layers", "mean bag F1", "per seed", "budget"], summary)
            + "\n\n" + table(["B", "rounds", "seed", "variant", "visible tokens", "rows", "rank", "bag", "bag F1",
                              "seconds"], rows))
    print(body)
    if not args.no_append:
        append_results(f"Span beyond the rank budget: LLaMA r = 8, SGD x1, B = {args.batches}, rounds {args.rounds} "
                       f"({args.seeds} seeds, {args.text})", body)


if __name__ == "__main__":
    main()
