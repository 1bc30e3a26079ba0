"""Run directories: ``<output.dir>/<name>-<timestamp>``, one new directory per call.

Every command that writes results (simulate, run, audit, compare-compression) names its directory
here, so they all follow one pattern and two runs started in the same second never share one.
"""

from __future__ import annotations

import time
from pathlib import Path

TIME_FORMAT = "%Y%m%d-%H%M%S"


def new_run_dir(parent: str | Path, name: str) -> Path:
    """Create and return ``<parent>/<name>-<timestamp>``; ``-2``, ``-3``, ... keep concurrent runs apart."""
    base = Path(parent) / f"{name}-{time.strftime(TIME_FORMAT)}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
