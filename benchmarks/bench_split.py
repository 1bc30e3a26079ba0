"""Split learning vs monolithic local training, and vs one compressed adapter round.

The embedded default model (all-MiniLM-L6-v2 + LoRA r8, batch 16 x 128 tokens) cut U-shape with
one block on each side of the client. Per training step: latency of monolithic training, of split
training against an in-process body and against a split server over gRPC on loopback (fp32 and
bf16 on the wire), and the frame bytes each way. Then the bytes of one client's round (15 steps)
as split learning beside plain adapter FL (fp32 up + down) and compeft:0.1 up + fp32 down.

Usage: python benchmarks/bench_split.py [--steps 10] [--no-append]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import append_results, machine, table  # noqa: E402

from fedpeft import config, models  # noqa: E402
from fedpeft.compression import make_codec  # noqa: E402
from fedpeft.runtime import Runtime  # noqa: E402
from fedpeft.split.body import BodyServer  # noqa: E402
from fedpeft.split.client import SplitClient, SplitOptions  # noqa: E402
from fedpeft.split.plugin import split_of
from fedpeft.split.server import serve  # noqa: E402
from fedpeft.split.transport import GrpcBody  # noqa: E402
from fedpeft.training import make_optimizer  # noqa: E402

ROUND_STEPS = 15


def _batches(rt: Runtime, n: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    ds = rt.client_dataset(0)
    return [rt.collate([ds[(i * batch_size + j) % len(ds)] for j in range(batch_size)]) for i in range(n)]


def _median_ms(fn, batches: list) -> float:
    times = []
    for b in batches:
        t0 = time.perf_counter()
        fn(b)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times[1:])  # the first step warms up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = config.load(None, ["split.enabled=true", "split.front_layers=1", "split.back_layers=1"])
    rt = Runtime(cfg)
    batches = _batches(rt, args.steps, cfg.train.batch_size)
    rows, step_bytes = [], {}

    mono = Runtime(config.load(None, []))  # the same model, trained whole on the client
    mono.model.train()
    mono_opt = make_optimizer([p for p in mono.model.parameters() if p.requires_grad], cfg.train)

    def mono_step(b: dict[str, torch.Tensor]) -> None:
        mono_opt.zero_grad(set_to_none=True)
        mono.model(**b).loss.backward()
        mono_opt.step()
    mono_ms = _median_ms(mono_step, batches)
    rows.append(["monolithic (whole model on the client)", f"{mono_ms:.0f}", "1.00x", "-", "-"])

    def split_row(name: str, service, wire: str | None) -> None:
        client = SplitClient(split_of(rt).model, service, "bench", cfg.train, SplitOptions(wire_dtype=wire))
        service.open("bench", split_of(rt).model.fingerprint)
        opt = make_optimizer(list(split_of(rt).model.client_parameters().values()), cfg.train)
        sizes = []
        def step(b):  # noqa: E306
            _, nb = client.split_step(b, opt)
            sizes.append(nb)
        ms = _median_ms(step, batches)
        up, down = sizes[-1].sent, sizes[-1].received
        step_bytes[name] = (up, down)
        rows.append([name, f"{ms:.0f}", f"{ms / mono_ms:.2f}x", f"{up:,}", f"{down:,}"])

    body = BodyServer.from_split(split_of(rt).model, cfg.train, "per_client")
    split_row("split, in-process body", body, None)
    for wire in (None, "bf16"):
        server = serve(BodyServer.from_split(split_of(rt).model, cfg.train, "per_client"), "127.0.0.1", 0)
        proxy = GrpcBody(f"127.0.0.1:{server.port}", wire_dtype=wire)
        try:
            split_row(f"split, gRPC loopback, {wire or 'fp32'}", proxy, wire)
        finally:
            server.stop()

    steps_table = table(["per step (batch 16 x 128 tokens)", "median ms", "vs monolithic", "bytes up", "bytes down"],
                        rows)
    full = models.adapter_state(mono.model)
    layout_full = mono.layout
    fp32 = make_codec("none").encode(full, layout_full).nbytes
    compeft = make_codec("compeft:0.1").encode({k: torch.randn_like(v) for k, v in full.items()}, layout_full).nbytes
    client_side = make_codec("none").encode(rt.initial_adapter(), rt.layout).nbytes
    round_rows = [
        ["adapter FL, fp32 up + fp32 down", f"{2 * fp32:,}", "1.00x"],
        ["adapter FL, compeft:0.1 up + fp32 down", f"{compeft + fp32:,}", f"{(compeft + fp32) / (2 * fp32):.2f}x"],
    ]
    for name in ("split, gRPC loopback, fp32", "split, gRPC loopback, bf16"):
        up, down = step_bytes[name]
        total = ROUND_STEPS * (up + down) + 2 * client_side
        round_rows.append([f"{name} ({ROUND_STEPS} steps + client-side adapter both ways)", f"{total:,}",
                           f"{total / (2 * fp32):.1f}x"])
    round_table = table(["one client, one round", "bytes", "vs fp32 adapter FL"], round_rows)
    body_text = (f"Embedded default cut 1 | 4 | 1 blocks; {args.steps} steps per row.\n\n{steps_table}\n\n"
                 f"{round_table}")
    print(body_text)
    if not args.no_append:
        append_results("Split learning: step latency and bytes vs monolithic and adapter FL", body_text)
    else:
        print(f"\nMachine: {machine()}")


if __name__ == "__main__":
    main()
