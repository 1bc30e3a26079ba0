"""``unroll`` against ``sign_span`` on five AdamW steps: one English sentence, independent victims.

Usage: ``python benchmarks/bench_attack_unroll.py [--seeds 0,1,2] [--replays 15000] [--fill 8] [--later]
[--no-append]``

Victim: ``tests/plain_victims.py::adamw_victim("llama", ...)`` (plain transformers + peft): a tiny random
LLaMA (2 layers, hidden 64, RoPE, dropout off) over the packaged MiniLM WordPiece vocabulary (30,522), LoRA
r = 8 on q/k/v, five torch AdamW steps (lr 1e-3, weight decay 0.01) on the first 16 WordPiece tokens of
sentence s, first round (B = 0) unless ``--later``. The server knows the optimiser, its settings and the
steps. Per seed: ``sign_span``'s bag F1 (the start of the search), the bag F1 of the tokens the replay
confirms after the search and after ``--fill`` refill steps from the whole vocabulary, how many
of the 16 positions the final sequence has right, whether it is the sentence, the cosine of its replayed
update with the received one after the search and at the end, the replays spent and the seconds.
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

HEADER = ["seed", "sign_span F1", "search F1", "unroll F1", "positions right", "sentence", "cosine search / end",
          "replays", "s"]


def measure(seed: int, replays: int, later: bool, fill: int) -> list[object]:
    ids = torch.tensor([wordpiece()(SENTENCES[seed])["input_ids"][:16]])
    truth = ids[0].tolist()
    obs = adamw_victim("llama", seed, ids, later=later)
    start = time.perf_counter()
    base = token_prf(run_attack("sign_span", obs).bag, truth)["f1"]
    result = run_attack("unroll", obs, replays=replays, fill=fill)
    seq, x = result.sequences[0], result.extra
    search = token_prf(x["bag_before_fill"], truth)["f1"] if fill else token_prf(result.bag, truth)["f1"]
    return [seed, f"{base:.2f}", f"{search:.2f}", f"{token_prf(result.bag, truth)['f1']:.2f}",
            f"{sum(a == b for a, b in zip(seq, truth))}/16", "yes" if seq == truth else "no",
            f"{x['cosine_before_fill']:.4f} / {x['cosine']:.4f}", x["replays"], f"{time.perf_counter() - start:.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--replays", type=int, default=15000)
    ap.add_argument("--later", action="store_true")
    ap.add_argument("--fill", type=int, default=8, help="refill steps from the whole vocabulary (unroll's fill)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(measure(seed, args.replays, args.later, args.fill))
        print(*rows[-1], flush=True)
    means = ["mean", *(f"{statistics.mean(float(r[i]) for r in rows):.2f}" for i in (1, 2, 3))]
    body = (f"Tiny random LLaMA, {'later' if args.later else 'first'} round, five torch AdamW steps on one "
            f"16-token English sentence (tests/plain_victims.py::adamw_victim), replay budget {args.replays}, "
            f"{args.fill} refill step(s) from the whole vocabulary, one torch thread. search F1: the bag "
            "the replay confirms after the search; unroll F1: after the refill.\n\n"
            + table(HEADER, [*rows, means + [""] * (len(HEADER) - 4)]))
    print(body)
    if not args.no_append:
        append_results(f"unroll: the client's training replayed as a verifier, seeds {args.seeds} (issue 17)", body)


if __name__ == "__main__":
    main()
