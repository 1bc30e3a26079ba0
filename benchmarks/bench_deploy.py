"""Deployment benchmark (issue 7): per-round overhead of a real SuperLink + SuperNodes vs the in-process
engine, for the same tiny scenario, with cold ClientApp processes (Flower's default: a new
``flwr-clientapp`` per message) and warm ones (``fedpeft node --warm``: ``--isolation process`` plus
one long-lived executor per node that keeps the model loaded).

Every deployment runs on loopback with TLS and SuperNode authentication on, two SuperNodes that train
on scenario partitions 0 and 1 (the same data the in-process engine gives its two clients), so the
metrics must match and only the seconds differ. Round 1 includes start-up; the steady state is the
mean of rounds 2..R.

``--polling`` compares warm nodes with Flower 1.41's fixed polling (the ServerApp pulls replies every 3 s,
an idle SuperNode asks for work every 3 s: ``federation.poll_interval = 3``, ``fedpeft node --poll-interval
3``) against fedpeft's defaults (0.2 s and 0.5 s), side by side in one run, instead of cold vs warm.

Usage: python benchmarks/bench_deploy.py [--rounds 4] [--polling] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from common import append_results, table  # noqa: E402

from fedpeft import certs, config, report  # noqa: E402
from fedpeft.deploy import flower, submit  # noqa: E402
from fedpeft.simulation import runner  # noqa: E402

from conftest import tiny_overrides, write_classification  # noqa: E402


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "fedpeft.cli", *map(str, args)]


def deployed(cfg: config.Config, root: Path, warm: bool, node_poll: float = 0.5) -> tuple[list[dict], float]:
    """Run ``cfg`` on a real SuperLink + 2 SuperNodes polling every ``node_poll`` s when idle; returns (metrics
    rows, wall seconds from submit)."""
    procs = flower.FlowerProcesses(root)
    try:
        pki = certs.make_certs("localhost", root / "certs")
        port = flower.free_port()
        address = f"127.0.0.1:{port}"
        link = procs.start(_cli("superlink", "--host", "127.0.0.1", "--port", port, "--certs", root / "certs",
                                "--flwr-home", root / "link"), "superlink")
        flower.wait_healthy(port, link, ca=pki.ca_cert)
        submit.connect(root, address, pki.ca_cert)
        for pid in range(2):
            key = certs.make_node_key(root / "keys", name=f"n{pid}")
            submit.register_node(root, key.public)
            procs.start(_cli("node", "--superlink", address, "--ca", pki.ca_cert, "--key", key.private,
                             "--port", flower.free_port(), "--partition-id", pid, "--num-partitions", 2,
                             "--flwr-home", root / f"node{pid}", "--poll-interval", node_poll,
                             *(["--warm"] if warm else [])), f"node{pid}")
        time.sleep(5 if warm else 3)  # both nodes connected (and the warm executors imported)
        t0 = time.perf_counter()
        run_id, run_dir = submit.submit(root, cfg)
        status = submit.wait(root, run_id, timeout=900)
        wall = time.perf_counter() - t0
        if status != "finished:completed":
            raise RuntimeError(f"run {run_id}: {status}\n{procs.log_tail('superlink')}")
        return report.read_metrics(run_dir), wall
    finally:
        procs.stop()


def summarize(name: str, rows: list[dict], wall: float, base: float | None) -> list[object]:
    steady = statistics.mean(r["seconds"] for r in rows[1:])
    over = "" if base is None else f"{steady - base:+.2f}"
    return [name, f"{rows[0]['seconds']:.2f}", f"{steady:.2f}", over, f"{wall:.1f}",
            f"{rows[-1]['eval_loss']:.5f}", f"{rows[-1]['eval_accuracy']:.3f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--polling", action="store_true", help="warm nodes: Flower's 3 s polling vs fedpeft's")
    ap.add_argument("--node-poll", type=float, default=0.5, help="fedpeft node --poll-interval (default 0.5)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    data = write_classification(root / "topics.jsonl", n=240)
    sets = tiny_overrides(data, root / "runs", **{
        "data.num_clients": 2, "federation.rounds": args.rounds, "run.threads": 1,
        "compression.uplink": "compeft:0.2", "federation.round_timeout": 300.0})
    cfg = config.load(None, sets)
    t0 = time.perf_counter()
    local_rows = report.read_metrics(runner.simulate(cfg, engine="inprocess"))
    local_wall = time.perf_counter() - t0
    base = statistics.mean(r["seconds"] for r in local_rows[1:])
    results = [summarize("in-process engine", local_rows, local_wall, None)]
    # (name, warm, ServerApp poll s, SuperNode poll s)
    variants = ([("warm, Flower's polling (3 s / 3 s)", True, 3.0, 3.0),
                 (f"warm, fedpeft's polling (0.2 s / {args.node_poll:g} s)", True, 0.2, args.node_poll)]
                if args.polling else
                [("cold clients", False, 0.2, args.node_poll), ("warm clients", True, 0.2, args.node_poll)])
    for i, (name, warm, server_poll, node_poll) in enumerate(variants):
        run_cfg = config.load(None, [*sets, f"federation.poll_interval={server_poll}"])
        rows, wall = deployed(run_cfg, root / f"v{i}", warm, node_poll)
        results.append(summarize(f"deployment, {name}", rows, wall, base))
        same = all(abs(a["eval_loss"] - b["eval_loss"]) < 1e-4 for a, b in zip(rows, local_rows))
        results[-1].append("yes" if same else "NO")
    results[0].append("-")
    header = ["engine", "round 1 s", f"rounds 2-{args.rounds} s/round", "overhead s/round vs in-process",
              "wall s", "final eval loss", "final acc", "same metrics"]
    body = (f"Tiny BERT + LoRA r=4, 2 clients x 10 local steps, uplink compeft:0.2, {args.rounds} rounds; "
            "deployments: loopback, TLS + node auth, 2 SuperNodes on scenario partitions 0/1. "
            "`wall s` counts from submit (in-process: from the call).\n\n" + table(header, results))
    print(body)
    print(json.dumps({"rows": results}))
    if not args.no_append:
        append_results("Deployment: warm nodes, Flower's fixed polling vs fedpeft's poll intervals" if args.polling
                       else "Deployment: real SuperLink + SuperNodes, cold vs warm ClientApps", body)
    subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    main()
