"""Start-up of the ``fedpeft`` command as whole processes (issue 21: --help <= 0.5 s, config <= 1 s).

Each command runs ``--repeat`` times in a fresh interpreter; the table gives the median wall time and the
median CPU time (user + system) of the process. CPU time moves less than wall time on a loaded machine.

Usage: python benchmarks/bench_startup.py [--repeat 5] [--no-append]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FEDPEFT = [sys.executable, "-c", "import sys; from fedpeft.cli import main; sys.exit(main())"]
COMMANDS = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
    "fedpeft --help": [*FEDPEFT, "--help"],
    "fedpeft config": [*FEDPEFT, "config"],
    "fedpeft simulate, bad codec spec (refused)": [*FEDPEFT, "simulate", "--set", "compression.uplink=bogus:1"],
    "fedpeft simulate, impossible client DP (refused)": [*FEDPEFT, "simulate", "--set", "privacy.mode=client",
                                                         "--set", "federation.clients_per_round=1"],
}


def measure(argv: list[str], repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``argv`` as a whole process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    walls, cpus = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    rows = []
    for name, argv in COMMANDS.items():
        wall, cpu = measure(argv, args.repeat)
        rows.append([name, f"{wall:.2f}", f"{cpu:.2f}"])
        print(name, f"{wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    body = table(["command (whole process)", "wall s (median)", "CPU s (median)"], rows)
    body += (f"\n\n{args.repeat} runs each; `fedpeft` through `python -c 'from fedpeft.cli import main'` "
             f"(the console script does the same; installed at {shutil.which('fedpeft')}). No run directory is "
             "left by the refused runs (tests/test_startup.py checks that and the imports).")
    print(body)
    if not args.no_append:
        append_results("Start-up (bench_startup.py)", body)


if __name__ == "__main__":
    main()
