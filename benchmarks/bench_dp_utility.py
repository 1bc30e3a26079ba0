"""Benchmark DP-friendly training settings: final accuracy of local DP-SGD on the embedded default.

Each setting is one ``fedpeft.simulate`` run of the embedded default (MiniLM + LoRA r8, BBC News, 4 clients,
3 rounds) with ``privacy.mode = "local"``, ``privacy.target_epsilon = EPS``, ``privacy.delta = 1e-4`` and the
setting's overrides (learning rate, batch size = the Poisson-sampled logical batch, local steps, clip). Runs go
one after another; each finished run is appended to ``--log`` (JSON lines), so a killed benchmark keeps what it
measured and ``--resume`` skips the settings already there. The table (and RESULTS.md) compares each setting
with the non-DP accuracy passed as ``--baseline`` (0.9416 measured for the embedded default, RESULTS.md).

    python benchmarks/bench_dp_utility.py --eps 8 --settings lr=1e-2 "lr=1e-2,batch=64,steps=4" [--threads 1]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fedpeft  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, table  # noqa: E402

#: short setting names -> config keys
KEYS = {"lr": "train.lr", "batch": "train.batch_size", "steps": "train.local_steps", "clip": "privacy.max_grad_norm",
        "agg": "federation.lora_aggregation", "rounds": "federation.rounds", "opt": "train.optimizer",
        "seed": "run.seed"}


def parse_setting(text: str) -> dict[str, object]:
    """``lr=1e-2,batch=64`` -> ``{"train.lr": 0.01, "train.batch_size": 64}``."""
    out: dict[str, object] = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=", 1)
        full = KEYS.get(key, key)
        try:
            out[full] = int(value) if value.isdigit() else float(value)
        except ValueError:
            out[full] = value
    return out


def run_one(eps: float, setting: str, out_dir: str) -> dict[str, object]:
    """One DP (or, at eps 0, non-DP) run of the embedded default; its final accuracy and seconds."""
    overrides: dict[str, object] = {"output.dir": out_dir, "output.plots": False, "privacy.delta": 1e-4}
    if eps > 0:
        # release_client_metrics: the clients report their accountant's epsilon (a benchmark, not a deployment)
        overrides.update({"privacy.mode": "local", "privacy.target_epsilon": eps,
                          "privacy.release_client_metrics": True})
    overrides.update(parse_setting(setting))
    start = time.perf_counter()
    result = fedpeft.simulate(None, overrides)
    last = [m for m in result.metrics if m.get("eval_accuracy") is not None][-1]
    return {"eps": eps, "setting": setting, "accuracy": last["eval_accuracy"], "eval_loss": last["eval_loss"],
            "epsilon": max((m.get("epsilon_local", 0.0) for m in result.metrics), default=0.0),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eps", type=float, default=8.0, help="target epsilon (0 = no DP)")
    p.add_argument("--settings", nargs="+", default=["lr=1e-3"], help="comma-separated key=value overrides")
    p.add_argument("--baseline", type=float, default=0.9416, help="non-DP accuracy to compare with")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log", default="runs/bench_dp_utility.jsonl")
    p.add_argument("--out", default="runs/bench-dp")
    p.add_argument("--resume", action="store_true", help="skip settings already in --log")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(x) for x in log.read_text().splitlines()] if args.resume and log.exists() else []
    rows = [r for r in done if r["eps"] == args.eps and r["setting"] in args.settings]
    for setting in args.settings:
        if any(r["setting"] == setting for r in rows):
            continue
        row = run_one(args.eps, setting, args.out)
        rows.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    body = table(["target eps", "setting", "reported eps", "accuracy", "vs non-DP (points)", "eval loss", "seconds"],
                 [[r["eps"], r["setting"], f"{r['epsilon']:.3g}", f"{r['accuracy']:.3f}",
                   f"{100 * (r['accuracy'] - args.baseline):+.1f}", f"{r['eval_loss']:.3f}", r["seconds"]]
                  for r in rows])
    print(body)
    if not args.no_append:
        append_results(f"Local DP-SGD settings at epsilon {args.eps:g} on the embedded default",
                       "`python benchmarks/bench_dp_utility.py " + " ".join(sys.argv[1:]) + "`: embedded default "
                       "(MiniLM + LoRA r8, BBC News, 4 clients, 3 rounds), local DP-SGD, delta 1e-4, seed 0 unless "
                       f"the setting says otherwise, {args.threads} torch thread(s). `batch` is the expected Poisson "
                       "batch (Opacus), `steps` the DP-SGD steps per round. Non-DP accuracy of the default: "
                       f"{args.baseline}.\n\n" + body)


if __name__ == "__main__":
    main()
