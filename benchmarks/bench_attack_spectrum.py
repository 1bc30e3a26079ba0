"""Span cut rules where a float32 update's tail sinks into its rounding noise (SmolLM2's B = 16 at r = 64, on a
stand-in that runs without the SmolLM2 package): bag F1 per cut, and span_decode's exact rate at B >= 4.

Usage: ``python benchmarks/bench_attack_spectrum.py [--batches 4,16,32] [--ranks 8,64] [--lrs 1e-2,1e-4]
[--seeds 3] [--decode-batches 4] [--decode-ranks 64] [--no-append]``

Victims are built with plain transformers + peft (``tests/plain_victims.py::padded_victim``): a random 2-layer
LLaMA (RoPE) of width 384 whose input embeddings are the packaged MiniLM's pretrained WordPiece ones (so
non-members lie close to the span, as in a pretrained LM), LoRA r on q/k/v (3 x r first-block rows), a trained
global adapter, float32, one SGD step at lr (local − global rescaled by −1/lr: the smaller lr, the larger the
rounding noise against the gradient) on B of the 50 English sentences (``plain_victims.ENGLISH``) right-padded
to 24 tokens. Bag F1 of ``span`` against the unpadded tokens for its cuts: ``gap`` (largest residual gap, else
nothing), ``outlier`` (else the robust outliers), ``spectrum`` (else the m best-ranked inputs, m = the stacked
rows' singular values above their noise bulk); ``span_decode`` (cut ``spectrum``) exact-sequence rate on the
``--decode-batches`` x ``--decode-ranks`` cells (minutes each). Appends a dated section to RESULTS.md.
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
from fedpeft.attacks.metrics import summarize, unpadded  # noqa: E402

CUTS = ("gap", "outlier", "spectrum")


def ints(text: str) -> list[int]:
    """A comma-separated list of integers."""
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="4,16,32")
    ap.add_argument("--ranks", default="8,64")
    ap.add_argument("--lrs", default="1e-2,1e-4")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--decode-batches", default="4")
    ap.add_argument("--decode-ranks", default="64")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    decode = {(b, r) for b in ints(args.decode_batches) for r in ints(args.decode_ranks)}
    got: dict[tuple, dict[str, list[float]]] = {}
    rows = []
    for r in ints(args.ranks):
        for b in ints(args.batches):
            for lr in (float(v) for v in args.lrs.split(",")):
                for seed in range(args.seeds):
                    obs, ids, mask = padded_victim(b, seed, arch="llama", r=r, hidden=384, seq_len=24,
                                                   dtype=torch.float32, sgd_lr=lr, text="english",
                                                   embeddings="minilm")
                    visible = len({t for row in unpadded(ids, mask) for t in row[:-1]})
                    cell = got.setdefault((r, b, lr), {})
                    line = [r, b, f"{lr:g}", seed, visible, 3 * r]
                    for cut in CUTS:
                        result = run_attack("span", obs, cut=cut)
                        cell.setdefault(cut, []).append(summarize(result, ids, mask)["token_f1"])
                        line += [len(result.bag), f"{cell[cut][-1]:.2f}"]
                    line += [result.extra["rank"], result.extra["signal_rank"]]
                    if (b, r) in decode:
                        t0 = time.perf_counter()
                        m = summarize(run_attack("span_decode", obs, cut="spectrum"), ids, mask)
                        cell.setdefault("exact", []).append(m["exact"])
                        line += [f"{m['exact']:.2f}", f"{time.perf_counter() - t0:.0f}"]
                    else:
                        line += ["-", "-"]
                    rows.append(line)
                    print(*line, flush=True)
    summary = [[r, b, f"{lr:g}", len(v["gap"]), *(f"{statistics.mean(v[c]):.2f}" for c in CUTS),
                f"{statistics.mean(v['exact']):.2f}" if "exact" in v else "-"] for (r, b, lr), v in got.items()]
    body = ("Stand-in victim (tests/plain_victims.py::padded_victim, embeddings=\"minilm\"): random 2-layer LLaMA, "
            "d = 384, MiniLM's pretrained WordPiece input embeddings, LoRA r on q/k/v (3 x r first-block rows), "
            "later round, float32, one SGD step at lr (rescaled by -1/lr), B English sentences padded to 24 tokens. "
            "Bag F1 of span per cut rule; exact: span_decode (cut spectrum) sentences equal to the true ones.\n\n"
            + table(["r", "B", "lr", "seeds", "gap F1", "outlier F1", "spectrum F1", "exact (decode)"], summary)
            + "\n\n" + table(["r", "B", "lr", "seed", "visible", "rows", "gap bag", "gap F1", "outlier bag",
                              "outlier F1", "spectrum bag", "spectrum F1", "rank", "signal rank", "exact",
                              "decode s"], rows))
    print(body)
    if not args.no_append:
        append_results("Span cut rules on a float32 update whose tail sinks into its rounding noise (issue 17)", body)


if __name__ == "__main__":
    main()
