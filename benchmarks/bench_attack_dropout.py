"""Dropout-aware attacks: one sentence read through the client's dropout, on independent victims.

Usage: ``python benchmarks/bench_attack_dropout.py [--victims
bert,bert-lora-dropout,gpt2,gpt2-words,gpt2-cut,gpt2-r8,minilm] [--seeds 3] [--no-append]``

Each victim is built with plain transformers + peft (``tests/plain_victims.py::dropout_victim``): a client
in a later round (LoRA B ≠ 0) trains one SGD step (lr 0.1) on one sentence with dropout on, float64, LoRA
dropout off; the server rescales the step to the gradient and knows the dropout rate (the model's config).

* ``bert``: tiny bidirectional classifier (2 layers, hidden 128, dropout 0.1), LoRA r = 16 on query/value,
  12 random token ids below 2000; attack ``span``. ``bert-lora-dropout``: the same with LoRA dropout 0.1
  besides (an independent mask per adapted module; combined rate 0.19).
* ``gpt2``: tiny causal LM (2 layers, hidden 128, dropout 0.1 on embeddings, residuals, attention), LoRA
  r = 16 on c_attn, 12 random ids; attack ``span_decode`` (the last token from the label channel).
* ``gpt2-words``: the same GPT-2 over MiniLM's WordPiece vocabulary (30,522), an English sentence (its last
  token, from the label channel, is then always ``[SEP]``). ``gpt2-cut``: the same sentences cut before their
  final full stop and ``[SEP]``, so that the last token is a word ("morning", "stairs", "busy", "week").
  ``gpt2-r8``: ``gpt2-words`` at r = 8 (8 rows for 11-12 visible tokens: over the span test's budget); attack
  ``unroll`` (6,000 replays, 2 refill steps: ``UNROLL``), whose "exact test" mode compares whole updates (no
  dropout noise directions).
* ``minilm``: the packaged pretrained all-MiniLM-L6-v2 (hidden 384, its own dropout 0.1, new 2-class head),
  LoRA r = 8 on query/value (16 rows for at most 14 tokens), an English sentence; attack ``span``.

Per victim and seed: bag-of-token F1 and exact sentence, for the dropout-aware attack and for the same attack
told dropout = 0 (the exact subspace test); for ``unroll`` with dropout, the final text's consistency p-value
(``Replay.consistency``: uniform where the text is the client's; the search and the refill stop at 0.5). Appends a
dated section to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from plain_victims import dropout_victim, wordpiece  # noqa: E402

from fedpeft.attacks import Observation, run_attack  # noqa: E402
from fedpeft.attacks.metrics import summarize  # noqa: E402

SENTENCES = [
    "The old man walked slowly to the station every morning.",
    "She found a small wooden box under the stairs.",
    "We should leave early because the roads will be busy.",
    "My brother bought a new bicycle last week.",
]
#: victim -> (plain_victims.dropout_victim arch, rank, attack, English text (None: random ids; else the number of
#: final WordPiece tokens cut off), LoRA dropout)
VICTIMS = {"bert": ("bert", 16, "span", None, 0.0), "bert-lora-dropout": ("bert", 16, "span", None, 0.1),
           "gpt2": ("gpt2", 16, "span_decode", None, 0.0), "gpt2-words": ("gpt2", 16, "span_decode", 0, 0.0),
           "gpt2-cut": ("gpt2", 16, "span_decode", 2, 0.0), "gpt2-r8": ("gpt2", 8, "unroll", 0, 0.0),
           "minilm": ("minilm", 8, "span", 0, 0.0)}
UNROLL = {"replays": 6000, "fill": 2}  #: unroll's budget here (its defaults take several times longer)


def _victim(name: str, seed: int) -> tuple[Observation, torch.Tensor]:
    arch, rank, _, cut, lora_dropout = VICTIMS[name]
    if cut is None:
        return dropout_victim(arch, seed, r=rank, lora_dropout=lora_dropout)
    tok = wordpiece()
    ids = torch.tensor([tok(SENTENCES[seed % len(SENTENCES)], truncation=True, max_length=14)["input_ids"]])
    ids = ids[:, :ids.shape[1] - cut]
    return dropout_victim(arch, seed, r=rank, vocab=len(tok), ids=ids, lora_dropout=lora_dropout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--victims", default=",".join(VICTIMS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, summary = [], []
    for name in args.victims.split(","):
        attack = VICTIMS[name][2]
        per: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            obs, ids = _victim(name, seed)
            for mode, view in (("aware", obs), ("exact test", dataclasses.replace(obs, dropout=0.0, _cache={},
                                                                                  _shared=set()))):
                t0 = time.perf_counter()
                res = run_attack(attack, view, **(UNROLL if attack == "unroll" else {}))
                m, p = summarize(res, ids), res.extra.get("consistency")
                f1, exact = m["token_f1"], m.get("exact", 0.0)
                per.setdefault(f"{mode} f1", []).append(f1)
                per.setdefault(f"{mode} exact", []).append(exact)
                rows.append([name, attack, mode, seed, ids.shape[1], f"{obs.dropout:.2f}", f"{f1:.2f}",
                             f"{exact:.0f}", "-" if p is None else f"{p:.2f}", f"{time.perf_counter() - t0:.1f}"])
                print(*rows[-1], flush=True)
        summary.append([name, attack, *(f"{statistics.mean(per[k]):.2f}" for k in
                                        ("aware f1", "aware exact", "exact test f1", "exact test exact"))])
    body = ("One sentence, one SGD step with dropout on, later round; bag-of-token F1 and exact sentence, mean over "
            f"{args.seeds} seeds (victims: see the script's docstring).\n\n"
            + table(["victim", "attack", "aware F1", "aware exact", "exact-test F1", "exact-test exact"], summary)
            + "\n\n" + table(["victim", "attack", "mode", "seed", "tokens", "dropout", "F1", "exact", "consistency p",
                                "seconds"],
                             rows))
    print(body)
    if not args.no_append:
        append_results(f"Dropout-aware attacks, B = 1 ({args.seeds} seeds)", body)


if __name__ == "__main__":
    main()
