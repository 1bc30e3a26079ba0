"""Run directories: ``<output.dir>/<name>-<timestamp>``, one new directory per call.

Every command that writes results (simulate, run, audit, compare-compression) names its directory
here, so they all follow one pattern and two runs started in the same second never share one.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedpeft.errors import ConfigError

TIME_FORMAT = "%Y%m%d-%H%M%S"


def new_run_dir(parent: str | Path, name: str) -> Path:
    """Create and return ``<parent>/<name>-<timestamp>``; ``-2``, ``-3``, ... keep concurrent runs apart.

    ``parent`` is ``output.dir``: one that is a file, or where nothing can be created or written, is a
    :class:`ConfigError` naming it.
    """
    base = Path(parent) / f"{name}-{time.strftime(TIME_FORMAT)}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        except OSError as e:  # a file in the way, no permission, a read-only file system
            blocker = next((p for p in (Path(parent), *Path(parent).parents) if p.exists()), None)
            why = f"{blocker} is a file" if blocker is not None and not blocker.is_dir() else e.strerror or str(e)
            raise ConfigError(f"output.dir = {str(parent)!r}: cannot create the run directory {path.name} there "
                              f"({why})") from None
