"""Experiment: robust aggregation of LoRA in A/B space or in ΔW = B·A space, under a scaling attack.

Tiny model, synthetic topic data, ``--clients`` clients of which the first ``--hostile`` (by node id) send
their honest update x ``--scale``. Each variant runs the real in-process federation with the attack
applied to the decoded updates before aggregation; the reference is FedAvg over the honest clients
alone. Reported: the final global ΔW's relative error against the reference,
``sqrt(sum_m |B_m A_m - B_ref A_ref|^2) / sqrt(sum_m |B_ref A_ref - B_0 A_0|^2)``, and eval accuracy.

``median (ΔW + SVD)`` is the alternative the library does not ship: the coordinate median of the clients'
ΔW changes, added to the global ``B·A`` and refitted to rank r by a truncated SVD every round.

    python benchmarks/robust_lora_space.py [--clients 7] [--hostile 2] [--scale 10] [--rounds 3] [--seeds 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fedpeft import config, report  # noqa: E402
from fedpeft.runtime import get_runtime  # noqa: E402
from fedpeft.server import loop  # noqa: E402
from fedpeft.server.aggregators import Aggregator, make_aggregator  # noqa: E402
from fedpeft.server.aggregators.krum import delta_w, lora_pairs  # noqa: E402
from fedpeft.server.aggregators.robust import middle, stacked  # noqa: E402
from fedpeft.server.replies import RoundReplies  # noqa: E402
from fedpeft.simulation import runner  # noqa: E402

from conftest import tiny_overrides, write_classification  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402


class DeltaWMedian(Aggregator):
    """Coordinate median of each client's ΔW change, refitted to rank r (SVD) onto the global factors."""

    def aggregate(self, replies: RoundReplies, global_state: dict) -> dict:
        deltas = replies.deltas
        out = dict(global_state)
        pairs = lora_pairs(global_state)
        for a, b in pairs.items():
            x = delta_w(deltas, global_state, a, b).T.contiguous()  # (out*in, clients)
            med = middle(x.sort(dim=1).values, torch.full((x.shape[0],), x.shape[1]))
            ga, gb = global_state[a], global_state[b]
            target = gb @ ga + self.cfg.server_lr * med.reshape(gb.shape[0], ga.shape[1])
            u, s, vh = torch.linalg.svd(target, full_matrices=False)
            r = ga.shape[0]
            out[b], out[a] = u[:, :r] * s[:r].sqrt(), s[:r].sqrt().unsqueeze(1) * vh[:r]
        for k in global_state:
            if k not in pairs and k not in pairs.values():
                x = stacked(deltas, k)
                med = middle(x.sort(dim=1).values, torch.full((x.shape[0],), x.shape[1]))
                out[k] = global_state[k] + self.cfg.server_lr * med.reshape(global_state[k].shape)
        self.t += 1
        return out


class Attacked(Aggregator):
    """Scale the updates of the ``hostile`` lowest node ids by ``scale`` (or drop them: ``scale`` None)."""

    def __init__(self, inner: Aggregator, hostile: int, scale: float | None) -> None:
        super().__init__(inner.cfg)
        self.inner, self.hostile, self.scale = inner, hostile, scale

    def aggregate(self, replies: RoundReplies, global_state: dict) -> dict:
        bad = set(sorted(replies.nodes)[:self.hostile])
        clients = []
        for c in replies.clients:
            if c.node not in bad:
                clients.append(c)
            elif self.scale is not None:
                clients.append(dataclasses.replace(c, delta={k: v * self.scale for k, v in c.delta.items()}))
        return self.inner.aggregate(dataclasses.replace(replies, clients=clients), global_state)


def effective(state: dict) -> dict:
    return {a: state[b] @ state[a] for a, b in lora_pairs(state).items()}


def run(cfg: config.Config, make: object, hostile: int, scale: float | None) -> tuple[dict, float]:
    original = loop.make_aggregator
    loop.make_aggregator = lambda fed, privacy=None: Attacked(make(fed), hostile, scale)  # type: ignore[assignment]
    try:
        run_dir = runner.simulate(cfg)
    finally:
        loop.make_aggregator = original
    final = load_file(str(run_dir / "checkpoint" / "global.safetensors"))
    return effective(final), report.read_metrics(run_dir)[-1]["eval_accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=7)
    ap.add_argument("--hostile", type=int, default=2)
    ap.add_argument("--scale", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    f = args.hostile
    variants = [("fedavg (attacked)", "fedavg", {}), ("median (A/B)", "median", {}),
                ("median (ΔW + SVD)", "median", {"dw": True}), ("trimmed_mean (A/B)", "trimmed_mean", {}),
                ("krum (A/B distances)", "krum", {"krum_space": "factors"}),
                ("krum (ΔW distances)", "krum", {"krum_space": "delta_w"}),
                ("multi-krum n-f (A/B distances)", "krum", {"krum_space": "factors", "multi_krum": 0}),
                ("multi-krum n-f (ΔW distances)", "krum", {"krum_space": "delta_w", "multi_krum": 0})]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in variants}
    ref_acc = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_classification(Path(tmp) / "topics.jsonl", n=420)
        for seed in range(args.seeds):
            def cfg_for(strategy: str, extra: dict, seed: int = seed) -> config.Config:
                sets = {"federation.strategy": strategy, "data.num_clients": args.clients, "run.seed": seed,
                        "federation.rounds": args.rounds, "train.local_steps": 5, "federation.byzantine_clients": f,
                        "federation.trim_fraction": f / args.clients,
                        **{f"federation.{k}": v for k, v in extra.items() if k != "dw"}}
                return config.load(None, tiny_overrides(data, Path(tmp) / "runs", **sets))

            init = effective(get_runtime(cfg_for("fedavg", {})).initial_adapter())
            ref, acc = run(cfg_for("fedavg", {}), make_aggregator, f, None)
            ref_acc.append(acc)
            norm = math.sqrt(sum((ref[k] - init[k]).square().sum().item() for k in ref))
            for name, strategy, extra in variants:
                make = DeltaWMedian if extra.get("dw") else make_aggregator
                got, acc = run(cfg_for(strategy, extra), make, f, args.scale)
                err = math.sqrt(sum((got[k] - ref[k]).square().sum().item() for k in ref)) / norm
                results[name].append((err, acc))
                print(f"seed {seed}: {name}: error {err:.3f}, accuracy {acc:.3f}", flush=True)
    rows = [[name, f"{statistics.mean(e for e, _ in r):.3f}", f"{statistics.mean(a for _, a in r):.3f}"]
            for name, r in results.items()]
    print(f"\n{args.clients} clients, {f} sending x{args.scale:g} their honest update, {args.rounds} rounds, tiny-bert "
          f"LoRA r=4, {args.seeds} seed(s); honest-only FedAvg accuracy {statistics.mean(ref_acc):.3f}\n")
    print(table(["aggregator", "final ΔW error vs honest mean", "eval accuracy"], rows))


if __name__ == "__main__":
    main()
