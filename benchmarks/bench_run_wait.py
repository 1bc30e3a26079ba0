"""What waiting on a deployed run costs the machine that waits: one ``flwr ls`` process per status poll
against fedpeft's in-process Control API client (``deploy.flower.wait_run``), side by side on one SuperLink.

``fedpeft run --wait`` and the Ray engine poll the run's status every 2 s for the whole run. Each poll as a
``flwr ls`` process starts Python and imports Flower's CLI; the in-process client opens one connection and
sends one request per poll. Measured: CPU seconds (user + system, of this process or of its children) and
wall seconds per poll, over ``--polls`` polls each, both listing the runs of an insecure loopback SuperLink
(none: the request, not the answer's size, is what is measured). The share of one core is what a poll every
2 s takes from the run it waits for.

Usage: python benchmarks/bench_run_wait.py [--polls 20] [--no-append]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, table  # noqa: E402

from fedpeft.deploy import flower  # noqa: E402

POLL_EVERY = 2.0  # seconds between two polls of wait_run


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--polls", type=int, default=20)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        procs = flower.FlowerProcesses(home)
        try:
            port = flower.free_port()
            link = procs.start([sys.executable, "-m", "fedpeft.cli", "superlink", "--host", "127.0.0.1", "--port",
                                str(port), "--insecure", "--no-auth", "--flwr-home", str(home / "link")], "superlink")
            flower.wait_healthy(port, link)
            flower.write_connection(home, f"127.0.0.1:{port}")
            results = {}
            c0, t0 = children_cpu(), time.perf_counter()
            for _ in range(args.polls):
                flower.flwr(home, "ls", flower.CONNECTION)
            results["flwr ls process"] = (children_cpu() - c0, time.perf_counter() - t0)
            p0, t0 = time.process_time(), time.perf_counter()
            from flwr.proto.control_pb2 import ListRunsRequest

            with flower.control_client(home) as client:
                for _ in range(args.polls):
                    client.ListRuns(ListRunsRequest())
            results["in-process client"] = (time.process_time() - p0, time.perf_counter() - t0)
        finally:
            procs.stop()
    base = results["flwr ls process"][0]
    rows = [[name, f"{cpu / args.polls * 1e3:.1f}", f"{wall / args.polls * 1e3:.1f}",
             f"{100 * cpu / args.polls / POLL_EVERY:.1f} %", f"{base / cpu:.0f}x" if cpu > 0 else "-"]
            for name, (cpu, wall) in results.items()]
    text = table(["status poll", "CPU ms / poll", "wall ms / poll", "share of a core at one poll / 2 s",
                  "CPU vs flwr ls"], rows)
    print(text)
    if not args.no_append:
        append_results("Waiting on a deployed run: flwr ls processes vs the in-process Control API client",
                       f"{text}\n\nCommand: `python benchmarks/bench_run_wait.py --polls {args.polls}` (insecure "
                       "loopback SuperLink; the in-process client's first poll includes importing Flower's CLI).\n")


if __name__ == "__main__":
    main()
