"""Distributed DP under SecAgg+ with >= 100 clients per round: accuracy against the same SecAgg+ integer uplink
without noise, on MiniLM + LoRA and Rotten Tomatoes (natural movie clients).

Usage: ``HF_HUB_OFFLINE=1 python benchmarks/bench_distributed_utility.py [--arms clear ddp] [--eps 8]
[--num-clients 500] [--per-round 100] [--rounds 3] [--steps 2] [--resume] [--no-append] [--set KEY=VALUE ...]``

Arms (each one ``fedpeft.simulate`` run on the in-process engine, real Flower SecAgg+ workflow and client mod):

- ``clear``: SecAgg+ integer uplink without noise (``privacy.secagg_bits``, weighted FedAvg): the non-private
  run with the same codec;
- ``clip``: distributed DP's clip and grid with a negligible noise multiplier (0.01): what clipping alone costs;
- ``ddp``: distributed DP at ``--eps`` with delta = 1 / N^1.1 (N = ``--num-clients``), the noise multiplier the
  accountant needs over ``--rounds`` rounds (replace-one, no amplification: the server sees who is in the sum).

Settings are cut to fit a shared 2-core CPU (few local steps, short sequences, few rounds; say so when quoting).
Each finished arm is appended to ``--log`` (JSON lines); ``--resume`` skips arms already there with the same
settings, so a killed benchmark continues. The table compares every arm with ``clear`` of the same settings.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fedpeft  # noqa: E402
from fedpeft import config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, table  # noqa: E402


def base_settings(args: argparse.Namespace) -> dict[str, object]:
    """What every arm shares."""
    return {"data.source": "rotten_tomatoes", "data.partition": "natural", "data.num_clients": args.num_clients,
            "federation.clients_per_round": args.per_round, "federation.rounds": args.rounds,
            "train.local_steps": args.steps, "train.batch_size": args.batch, "train.lr": args.lr,
            "model.max_length": args.max_length, "train.max_eval_examples": args.eval_examples,
            "privacy.secure_aggregation": "secaggplus", "privacy.secagg_num_shares": 17,
            "run.threads": 1, "run.seed": args.seed, "output.plots": False, **dict(args.set)}


def arm_settings(arm: str, args: argparse.Namespace, delta: float) -> dict[str, object]:
    """The overrides of one arm."""
    if arm == "clear":
        return {"privacy.secagg_bits": 8, "privacy.secagg_clipping_range": args.range}
    ddp = {"privacy.mode": "distributed", "privacy.clip_norm": args.clip, "privacy.delta": delta,
           "privacy.secagg_min_survivors": int(0.8 * args.per_round)}
    if arm == "clip":
        return {**ddp, "privacy.server_noise_multiplier": 0.01}
    return {**ddp, "privacy.target_epsilon": args.eps}  # the run derives its z (fedpeft.privacy.tuning)


def adapter_change(run_dir: Path) -> torch.Tensor:
    """The global adapter's change over a run: final - initial (the same seeded initial adapter in every arm)."""
    import tempfile

    from safetensors.torch import load_file

    from fedpeft.server.loop import FederatedServer

    cfg = config.load(str(run_dir / "config.toml"), [])
    with tempfile.TemporaryDirectory() as tmp:
        start = FederatedServer(cfg, Path(tmp)).global_state
    final = load_file(str(run_dir / "checkpoint" / "global.safetensors"))
    return torch.cat([(final[k].float() - start[k].float()).flatten() for k in sorted(start)])


def update_norms(run_dir: Path) -> dict[str, float]:
    """Signal against noise: the L2 norm of the global adapter's change over the run and, under distributed DP,
    the norm its noise alone is expected to have (per-coordinate std of the released mean x the server learning
    rate x sqrt(elements x rounds), at the fewest survivors)."""
    from fedpeft import protocol

    cfg = config.load(str(run_dir / "config.toml"), [])
    change = adapter_change(run_dir)
    out = {"elements": float(change.numel()), "change_norm": float(change.norm())}
    field = protocol.secure_field(cfg.privacy, change.numel(), cfg.federation.clients_per_round)
    if field.ddp is not None:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        n = min(int(r["replies"]) for r in rows)
        std = field.ddp.mean_noise_std(n) * cfg.federation.server_lr  # per coordinate of one round's step
        out["noise_norm"] = std * (change.numel() * len(rows)) ** 0.5
    return out


def run_arm(sets: dict[str, object], out: str) -> dict[str, object]:
    """One run; accuracy per round, final epsilon and seconds."""
    start = time.perf_counter()
    result = fedpeft.simulate(None, {**sets, "output.dir": out})
    evals = [m for m in result.metrics if m.get("eval_accuracy") is not None]
    return {"accuracy": [round(float(m["eval_accuracy"]), 4) for m in evals],
            "replies": [int(m.get("replies", 0)) for m in result.metrics],
            "epsilon": max((float(m.get("epsilon_distributed", 0.0)) for m in result.metrics), default=0.0),
            "bytes_up": int(result.metrics[-1].get("bytes_up", 0)),
            "range_clipped": int(sum(float(m.get("secagg_clipped", 0.0)) for m in result.metrics)),
            "seconds": round(time.perf_counter() - start, 1), "run_dir": str(result.run_dir),
            "z": result.config.privacy.server_noise_multiplier,
            **update_norms(result.run_dir)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", default=["clear", "ddp"], choices=["clear", "clip", "ddp"])
    p.add_argument("--eps", type=float, default=8.0)
    p.add_argument("--num-clients", type=int, default=500)
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--range", type=float, default=0.1, help="clear arm: +-range of its 8-bit grid per element")
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--eval-examples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra overrides shared by every arm (TOML values, else strings, as fedpeft's --set)")
    p.add_argument("--log", default="runs/bench_distributed_utility.jsonl")
    p.add_argument("--out", default="runs/bench-ddp-utility")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--norms", nargs="*", default=[], metavar="RUN_DIR",
                   help="only print update_norms of finished run directories (two: clear, then DP: also the cosine "
                        "of their changes)")
    args = p.parse_args()
    if args.norms:
        for run_dir in args.norms:
            print(run_dir, json.dumps(update_norms(Path(run_dir))))
        if len(args.norms) == 2:  # clear, then DP: how much of the DP release points the clear update's way
            a, b = (adapter_change(Path(d)) for d in args.norms)
            print(f"cosine of the two changes: {float(a @ b / (a.norm() * b.norm())):.4f}")
        return
    args.set = [(f"{section}.{key}", value) for section, key, value in map(config.parse_override, args.set)]
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    delta = 1.0 / args.num_clients**1.1
    base = base_settings(args)
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(x) for x in log.read_text().splitlines()] if args.resume and log.exists() else []
    rows: dict[str, dict] = {}
    for arm in args.arms:
        sets = {**base, **arm_settings(arm, args, delta)}
        key = json.dumps(sets, sort_keys=True)
        prior = [r for r in done if r["key"] == key]
        if prior:
            rows[arm] = prior[-1]
            continue
        rows[arm] = {"arm": arm, "key": key, **run_arm(sets, f"{args.out}/{arm}")}
        with log.open("a") as f:
            f.write(json.dumps(rows[arm]) + "\n")
        print(json.dumps({k: v for k, v in rows[arm].items() if k != "key"}), flush=True)
    ref = rows.get("clear", {}).get("accuracy", [None])[-1]
    out = []
    for arm, r in rows.items():
        final = r["accuracy"][-1]
        out.append([arm, f"{r['z']:.4g}" if arm != "clear" else "",
                    f"{r['epsilon']:.2f}" if arm != "clear" else "inf", " / ".join(f"{a:.3f}" for a in r["accuracy"]),
                    f"{100 * (final - ref):+.1f}" if ref is not None else "", min(r["replies"]),
                    f"{r['change_norm']:.3f}" if "change_norm" in r else "",
                    f"{r['noise_norm']:.3f}" if "noise_norm" in r else "", r["bytes_up"], r["seconds"]])
    body = table(["arm", "z", "epsilon", "accuracy per round", "vs clear (points)", "fewest replies",
                  "|global change|", "of it noise (expected)", "bytes up (last round)", "seconds"], out)
    print(body)
    if not args.no_append:
        append_results(
            "Distributed DP under SecAgg+ at 100+ clients per round: utility (issue 18)",
            "`python benchmarks/bench_distributed_utility.py " + " ".join(sys.argv[1:]) + "`: MiniLM + LoRA r8 "
            f"(adapter settings of the scenario unless --set), Rotten Tomatoes, natural movie partition over "
            f"{args.num_clients} clients, {args.per_round} per round, {args.rounds} rounds x {args.steps} local "
            f"steps of {args.batch}, length {args.max_length}, lr {args.lr:g}, SecAgg+ with 17 shares; distributed "
            f"DP: clip {args.clip:g}, delta = 1/N^1.1 = {delta:.3g}, minimum survivors 0.8 m; clear = SecAgg+ "
            f"8-bit integer uplink (range +-{args.range:g}) without noise; accuracy on {args.eval_examples} held-out "
            "examples; one torch thread, shared machine (seconds are loaded wall times).\n\n" + body)


if __name__ == "__main__":
    main()
