"""Shared by the benchmark scripts: machine description, plain-text tables, RESULTS.md appends."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_model() -> str:
    """The CPU model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU model, cores, memory, load, Python and library versions."""
    import numpy
    import torch

    cpu = cpu_model()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {gpu}, load average {load}; "
            f"Python {platform.python_version()}, "
            f"torch {torch.__version__}, numpy {numpy.__version__}")


def table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table (readable as plain text too)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def append_results(title: str, body: str) -> None:
    """Append a dated section with the machine line to benchmarks/RESULTS.md."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with RESULTS.open("a") as f:
        f.write(f"\n## {title} ({stamp})\n\nMachine: {machine()}\n\n{body}\n")
    print(f"appended to {RESULTS}")
