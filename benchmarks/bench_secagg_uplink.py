"""SecAgg+ uplink bytes per round: dense (as before), the integer field, the shared subspace, distributed DP,
each beside the same quantizer sent in the clear (``sint``), on the embedded default (MiniLM + LoRA r8).

Usage: ``HF_HUB_OFFLINE=1 python benchmarks/bench_secagg_uplink.py [--clients 4 10] [--steps 1] [--no-append]``

One training round per row on the in-process engine with the real Flower SecAgg+ workflow and mod; bytes
are the serialized Flower records of every reply (all four SecAgg+ stages: keys, shares, masked vectors,
unmasking shares), exactly as a run's ``metrics.jsonl`` counts them. Training is cut to ``--steps`` local
steps: bytes do not depend on it (this script measures bytes, not accuracy). Ratios are taken within one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import append_results, table  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedpeft import config  # noqa: E402
from fedpeft.clients.app import app as client_app  # noqa: E402
from fedpeft.compression.secure import digit_groups  # noqa: E402
from fedpeft.server.loop import FederatedServer  # noqa: E402
from fedpeft.simulation import runner  # noqa: E402
from fedpeft.simulation.inprocess import InProcessGrid  # noqa: E402

STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")  # Flower's SecAgg+ stages, in order
RANGE = 0.02  # per-element range of the integer grid (bytes do not depend on it)
SECAGG = {"privacy.secure_aggregation": "secaggplus"}
DDP = {**SECAGG, "privacy.mode": "distributed", "privacy.delta": 1e-4}
ROWS: list[tuple[str, str, dict[str, object]]] = [  # (label, the same codec in the clear, settings)
    ("plain none (fp32)", "", {}),
    ("plain sint:8", "", {"compression.uplink": f"sint:8,range={RANGE}"}),
    ("plain sint:8 keep 0.25", "", {"compression.uplink": f"sint:8,range={RANGE},keep=0.25"}),
    ("plain sint:6", "", {"compression.uplink": f"sint:6,range={RANGE}"}),
    ("SecAgg+ dense (before)", "plain none (fp32)", {**SECAGG}),
    ("SecAgg+ bits 8", "plain sint:8", {**SECAGG, "privacy.secagg_bits": 8, "privacy.secagg_clipping_range": RANGE}),
    ("SecAgg+ bits 6", "plain sint:6", {**SECAGG, "privacy.secagg_bits": 6, "privacy.secagg_clipping_range": RANGE}),
    ("SecAgg+ bits 8 keep 0.25", "plain sint:8 keep 0.25",
     {**SECAGG, "privacy.secagg_bits": 8, "privacy.secagg_clipping_range": RANGE, "privacy.secagg_keep": 0.25}),
    ("distributed DP z=1", "", {**DDP}),
    ("distributed DP z=1 keep 0.25", "", {**DDP, "privacy.secagg_keep": 0.25}),
]


def one_round(sets: dict[str, object], out: Path) -> tuple[dict, str]:
    """Round 1 of the embedded default with ``sets``; returns its metrics row and the SecAgg+ field
    (modulus, and the bits a masked element takes on the wire)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = config.load(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    server = FederatedServer(cfg, out)
    grid = InProcessGrid(client_app, cfg.data.num_clients, runner.run_config(cfg, out, False))
    row = server.run_round(grid, 1)
    if not server.secagg:
        return row, ""
    modulus = server.secagg.field.modulus_range
    k, bits = digit_groups(modulus)
    return row, f"{modulus} ({bits / k:.2f} b)" if server.secagg.field.packed else str(modulus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--rows", nargs="+", default=[label for label, _, _ in ROWS],
                        help="labels of the rows to measure (their clear counterparts are added)")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    wanted = set(args.rows) | {clear for label, clear, _ in ROWS if label in args.rows and clear}
    rows_run = [row for row in ROWS if row[0] in wanted]
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    sections = []
    for m in args.clients:
        base = {"data.num_clients": m, "federation.rounds": 2, "federation.eval_every": 1000,
                "train.local_steps": args.steps, "run.threads": 1, "output.plots": False}
        measured: dict[str, tuple[dict, str]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for i, (label, _, sets) in enumerate(rows_run):
                measured[label] = one_round({**base, **sets, "output.dir": f"{tmp}/{i}"}, Path(tmp) / str(i))
                print(f"m={m} {label}: {measured[label][0]['bytes_up']} B up", flush=True)
        dense = measured.get("SecAgg+ dense (before)", ({"bytes_up": 0}, 0))[0]["bytes_up"]
        rows = []
        for label, clear, _ in rows_run:
            row, bits = measured[label]
            up = row["bytes_up"]
            masked = row.get("secagg_up_collect_masked_vectors", up)
            vs_clear = f"{up / measured[clear][0]['bytes_up']:.2f}x" if clear else ""
            vs_masked = f"{masked / measured[clear][0]['bytes_up']:.3f}x" if clear else ""
            vs_dense = f"{dense / up:.1f}x" if dense and label.startswith(("SecAgg", "distributed")) else ""
            rows.append([label, bits, up, up // m, masked, up - masked, vs_clear, vs_masked, vs_dense])
        body = table(["uplink", "field modulus (bits an element)", "bytes up / round", "per client",
                      "masked-vector stage",
                      "key exchange (setup, share keys, unmask)", "vs same codec in the clear",
                      "masked stage alone vs clear", "fewer than dense SecAgg+"], rows)
        stages = table(["uplink", *(f"{stage} B / client" for stage in STAGES)],
                       [[label, *(round(measured[label][0].get(f"secagg_up_{stage}", 0) / m) for stage in STAGES)]
                        for label, _, _ in rows_run if label.startswith(("SecAgg", "distributed"))])
        fp32 = next(iter(measured.values()))[0]["bytes_up_fp32"]
        sections.append(f"m = {m} clients per round, {fp32} B of fp32 adapter deltas per round:\n\n{body}\n\n"
                        f"SecAgg+ uplink per stage and client (serialized replies):\n\n{stages}")
        print(sections[-1], flush=True)
    if not args.no_append:
        note = ("One round of the embedded default (MiniLM + LoRA r8, {steps} local step(s)); bytes are every "
                "serialized uplink record of the round, all SecAgg+ stages included. `sint` = the same "
                "stochastic-rounding grid sent in the clear (b bits an element); SecAgg+ bits b sums it in a "
                "field of modulus m * (2**b - 2) + 1 (base-M digits packed a few to a 64-bit group). Distributed DP: "
                "z = 1, clip 1, grid 4 sqrt(d), 3 minimum survivors (a power-of-2 field). Public keys travel as "
                "compressed EC points and key shares as raw Fernet tokens (the compact key exchange).")
        append_results("SecAgg+ compressed uplink and distributed DP: bytes per round",
                       note.format(steps=args.steps) + "\n\n" + "\n\n".join(sections))


if __name__ == "__main__":
    main()
