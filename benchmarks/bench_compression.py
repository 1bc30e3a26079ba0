"""Benchmark fedpeft.compression: ComPEFT size vs the entropy bound, single-core speed, and every
codec on a LoRA-sized delta. Prints the tables and appends them to benchmarks/RESULTS.md.

    python benchmarks/bench_compression.py [--d 10000000] [--repeats 7] [--no-append]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedpeft.compression import Layout, codec_names, entropy_bound_bits, make_codec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DENSITIES = (0.2, 0.1, 0.05, 0.01)
TARGET_MBPS = 300.0


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(median wall, min wall, median thread-CPU) seconds over ``repeats`` runs after a warm-up.

    The CPU time of this thread is reported too: on a shared machine the wall time includes waiting
    for a core, the CPU time does not.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    return statistics.median(wall), min(wall), statistics.median(cpu)


def machine() -> list[str]:
    cpu = cpu_model()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return [f"CPU: {cpu}, {os.cpu_count()} cores (benchmark pinned to 1 thread), load average at start: {load}",
            f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"{platform.system()} {platform.release()}"]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)]


def bench_sizes(d: int, repeats: int) -> list[str]:
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(d).astype(np.float32))
    state = {"delta": x}
    layout = Layout.from_state(state)
    rows = []
    for p in DENSITIES:
        codec = make_codec(f"compeft:{p}")
        payload = codec.encode(state, layout)
        bound = entropy_bound_bits(d, p) / 8
        enc, _, _ = timed(partial(codec.encode, state, layout), max(3, repeats // 2))
        dec, _, _ = timed(partial(codec.decode, payload, layout), max(3, repeats // 2))
        coding = "bitmap" if payload.fields[3] == 0 else f"golomb m={payload.fields[4]}"
        rows.append([f"{p:g}", f"{payload.nbytes:,}", f"{bound:,.0f}", f"{payload.nbytes / bound:.4f}",
                     f"{4 * d / payload.nbytes:.1f}x", f"{32 / (bound * 8 / d):.1f}x", coding,
                     f"{enc * 1e3:.1f}", f"{dec * 1e3:.1f}"])
    return [f"ComPEFT size on a random-sign (standard normal) vector, d = {d:,} (median ms of encode/decode)", "",
            *table(["p", "payload B", "bound B", "payload/bound", "vs fp32", "ideal", "positions",
                    "enc ms", "dec ms"], rows)]


def bench_speed(d: int, repeats: int) -> list[str]:
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(d).astype(np.float32))
    state = {"delta": x}
    layout = Layout.from_state(state)
    codec = make_codec("compeft:0.05")
    arr = x.numpy()
    copy_med, copy_min, copy_cpu = timed(lambda: arr.copy(), repeats)

    def pipeline() -> None:
        codec.decode(codec.encode(state, layout), layout)

    med, best, cpu = timed(pipeline, repeats)
    enc_med, _, enc_cpu = timed(lambda: codec.encode(state, layout), repeats)
    payload = codec.encode(state, layout)
    dec_med, _, dec_cpu = timed(lambda: codec.decode(payload, layout), repeats)
    mb = 4 * d / 1e6
    verdict = "meets" if mb / med >= TARGET_MBPS else "MISSES"
    rows = [["median wall", f"{med * 1e3:.1f}", f"{mb / med:.0f}", f"{copy_med * 1e3:.2f}", f"{med / copy_med:.1f}x"],
            ["best wall", f"{best * 1e3:.1f}", f"{mb / best:.0f}", f"{copy_min * 1e3:.2f}", f"{best / copy_min:.1f}x"],
            ["median CPU", f"{cpu * 1e3:.1f}", f"{mb / cpu:.0f}", f"{copy_cpu * 1e3:.2f}", f"{cpu / copy_cpu:.1f}x"]]
    return [f"Speed: compeft:0.05 top-k + encode + decode of a {d:,}-element fp32 delta ({mb:.0f} MB), "
            f"1 thread; {repeats} runs after a warm-up", "",
            *table(["", "total ms", "MB/s fp32 in", "numpy copy ms", "vs copy"], rows), "",
            f"encode {enc_med * 1e3:.1f} ms + decode {dec_med * 1e3:.1f} ms wall (CPU {enc_cpu * 1e3:.1f} + "
            f"{dec_cpu * 1e3:.1f} ms); target >= {TARGET_MBPS:.0f} MB/s: {verdict} the target (median wall)."]


def lora_delta(seed: int = 0) -> dict[str, torch.Tensor]:
    """12 layers x (A: 16x3072, B: 3072x16) = 24 tensors, 1,179,648 elements; B smaller, as after training."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(12):
        out[f"layer{i:02d}.lora_A"] = torch.randn(16, 3072, generator=g) * 0.02
        out[f"layer{i:02d}.lora_B"] = torch.randn(3072, 16, generator=g) * 0.002
    return out


def bench_codecs(repeats: int) -> list[str]:
    delta = lora_delta()
    layout = Layout.from_state(delta)
    flat = layout.flatten(delta)
    specs = codec_names() + ["compeft:0.05", "compeft:0.01", "compeft:0.05,scale=std", "topk:0.01"]
    rows = []
    rng = np.random.default_rng(0)
    for spec in specs:
        codec = make_codec(spec)
        payload = codec.encode(delta, layout, rng=rng)
        out = layout.flatten(codec.decode(payload, layout))
        err = float(np.linalg.norm(out - flat) / np.linalg.norm(flat))
        enc, _, _ = timed(partial(codec.encode, delta, layout, rng=rng), repeats)
        dec, _, _ = timed(partial(codec.decode, payload, layout), repeats)
        rows.append([codec.spec, f"{payload.nbytes:,}", f"{4 * layout.total / payload.nbytes:.1f}x",
                     f"{enc * 1e3:.2f}", f"{dec * 1e3:.2f}", f"{err:.3f}"])
    return [f"Every codec on a LoRA-sized delta: {len(layout.names)} tensors, {layout.total:,} elements "
            f"({4 * layout.total / 1e6:.2f} MB fp32), 1 thread, median of {repeats}", "",
            *table(["codec", "bytes", "vs fp32", "enc ms", "dec ms", "rel L2 err"], rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=10_000_000, help="vector length for size and speed")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = machine()
    sections = [bench_sizes(args.d, args.repeats), bench_speed(args.d, args.repeats), bench_codecs(args.repeats)]
    text = "\n\n".join("\n".join(s) for s in sections)
    print("\n".join(info) + "\n\n" + text)
    if not args.no_append:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        md = f"\n## compression ({stamp})\n\n" + "\n".join(f"- {line}" for line in info) + "\n\n" + text + "\n"
        with RESULTS.open("a") as f:
            if f.tell() == 0:
                f.write("# Benchmark results\n")
            f.write(md)
        print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()
