"""Wall time of one distributed-DP round under SecAgg+ as the clients per round grow (m = 10, 30, 100), beside
the same round in the clear, on the tiny test model (Rotten Tomatoes, natural movie clients).

Usage: ``HF_HUB_OFFLINE=1 python benchmarks/bench_distributed_scale.py [--clients 10 30 100] [--shares 17]
[--no-append]``

Per m, one training round of each arm on the in-process engine (real Flower SecAgg+ workflow and client mod):
``clear`` (no secure aggregation, no DP), ``ddp shares=all`` (every client shares its secrets with every other:
Flower's default, grows as m^2; run where m <= 30) and ``ddp shares=k`` (``privacy.secagg_num_shares = k``,
an odd k below m). ``collect`` is Flower's masked-vector stage, which includes each client's training;
``setup``, ``share keys`` and ``unmask`` are the clients' SecAgg+ work (keys, key agreement, Shamir shares);
``server between stages`` is the rest of the round: the server's own SecAgg+ work (reconstructing secrets
from Shamir shares, regenerating and removing masks) and the aggregation. Ratios are
against the clear round of the same m, measured in the same process, in CPU seconds of the process (wall times
move with the load of a shared machine) and in wall seconds. One thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import append_results, table  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedpeft import config  # noqa: E402
from fedpeft.clients.app import app as client_app  # noqa: E402
from fedpeft.server.loop import FederatedServer  # noqa: E402
from fedpeft.simulation import runner  # noqa: E402
from fedpeft.simulation.inprocess import InProcessGrid  # noqa: E402

TINY = {"model.name": "tiny-bert", "model.tiny_hidden_size": 64, "model.max_length": 48, "adapter.r": 4,
        "data.source": "rotten_tomatoes", "data.partition": "natural", "train.local_steps": 2,
        "train.batch_size": 8, "train.max_eval_examples": 200, "federation.rounds": 2,
        "federation.eval_every": 1000, "run.threads": 1, "output.plots": False}
DDP = {"privacy.secure_aggregation": "secaggplus", "privacy.mode": "distributed", "privacy.clip_norm": 1.0,
       "privacy.server_noise_multiplier": 1.0}
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")  # SecAgg+ stages timed by the server


def one_round(sets: dict[str, object], out: Path) -> tuple[dict, float, float]:
    """Round 1 with ``sets``: its metrics row, wall and CPU seconds of this process (the server's set-up, model
    load included, is outside the timing). CPU time is what a loaded shared machine distorts least."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = config.load(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    server = FederatedServer(cfg, out)
    grid = InProcessGrid(client_app, cfg.data.num_clients, runner.run_config(cfg, out, False))
    t0, c0 = time.perf_counter(), time.process_time()
    row = server.run_round(grid, 1)
    return row, time.perf_counter() - t0, time.process_time() - c0


def arms(m: int, shares: int) -> list[tuple[str, dict[str, object]]]:
    """(label, settings) of the arms measured at ``m`` clients per round."""
    ddp = {**DDP, "privacy.secagg_min_survivors": max(2, int(0.8 * m))}
    out: list[tuple[str, dict[str, object]]] = [("clear", {})]
    if m <= 30:
        out.append(("ddp shares=all", {**ddp, "privacy.secagg_num_shares": 1.0}))
    k = shares if shares < m else m - 1 if (m - 1) % 2 else m - 2
    out.append((f"ddp shares={k}", {**ddp, "privacy.secagg_num_shares": k}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--shares", type=int, default=17, help="secagg_num_shares of the bounded arm (odd)")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    rows = []
    population = max(args.clients) + max(args.clients) // 5
    with tempfile.TemporaryDirectory() as tmp:
        warm = {**TINY, **DDP, "data.num_clients": population, "federation.clients_per_round": 3,
                "privacy.secagg_min_survivors": 3, "output.dir": f"{tmp}/warm"}
        one_round(warm, Path(tmp) / "warm")  # untimed: the first SecAgg+ round of a process loads its crypto
        for m in args.clients:
            clear = clear_cpu = 0.0
            for label, sets in arms(m, args.shares):
                out = Path(tmp) / f"{m}-{len(rows)}"
                row, seconds, cpu = one_round({**TINY, **sets, "data.num_clients": population,
                                          "federation.clients_per_round": m, "output.dir": str(out)}, out)
                clear, clear_cpu = clear or seconds, clear_cpu or cpu
                stage = [row.get(f"secagg_seconds_{s}", 0.0) for s in STAGES]
                rest = seconds - sum(stage)
                cells = [f"{t:.1f}" for t in stage] + [f"{rest:.1f}"] if sum(stage) else [""] * (len(STAGES) + 1)
                rows.append([m, label, row["replies"], f"{seconds:.1f}", f"{cpu:.1f}", *cells, f"{cpu / m:.2f}",
                             f"{cpu / clear_cpu:.2f}x", f"{seconds / clear:.2f}x", int(row["bytes_up"]) // m])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    body = table(["m", "arm", "replies", "round wall s", "round CPU s", "setup s", "share keys s",
                  "collect s (incl. training)", "unmask s", "server between stages s", "CPU s / client",
                  "vs clear (CPU)", "vs clear (wall)", "bytes up / client"], rows)
    print(body)
    if not args.no_append:
        note = ("One round per arm of the tiny test model (BERT, hidden 64, LoRA r4, 2 local steps of 8, length 48) "
                f"on Rotten Tomatoes (natural movie clients, {population} clients), in-process engine, one thread; "
                "distributed DP with clip 1, z = 1, minimum survivors 0.8 m. 'collect' includes the clients' "
                "training; 'setup', 'share keys' and 'unmask' are the clients' SecAgg+ crypto, 'server between "
                "stages' the server's (Shamir reconstruction, mask removal) and the aggregation (stage columns are "
                "wall seconds). CPU seconds are this process's (all threads): the load of the shared machine "
                "changes wall times between arms far more.")
        append_results("Distributed DP under SecAgg+: round time against clients per round", note + "\n\n" + body)


if __name__ == "__main__":
    main()
