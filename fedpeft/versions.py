"""Installed versions of the key dependencies against the ranges fedpeft is tested with.

The tested ranges are the dependency bounds of the installed ``fedpeft`` distribution (``pyproject.toml``
is their one source): a version outside its range is not known to work. ``fedpeft doctor`` prints the
table, every command warns once when a key dependency is outside its range, and every run writes
``versions.json`` so that a result can be reproduced.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

log = logging.getLogger(__name__)
KEY_PACKAGES = ("torch", "transformers", "peft", "opacus", "flwr", "numpy", "grpcio", "safetensors")
VERSIONS_FILE = "versions.json"


@dataclass(frozen=True)
class PackageStatus:
    """One key dependency: what is installed and whether it lies in the tested range."""

    name: str
    installed: str | None
    tested: str
    ok: bool


def tested_ranges() -> dict[str, str]:
    """The version specifier of each key dependency, read from fedpeft's own package metadata."""
    ranges: dict[str, str] = {}
    for line in metadata.requires("fedpeft") or []:
        req = Requirement(line)
        if req.marker is None and req.name in KEY_PACKAGES:
            ranges[req.name] = str(req.specifier)
    return ranges


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def in_range(version: str | None, spec: str) -> bool:
    """Whether ``version`` satisfies ``spec``; a local build tag such as ``+cpu`` is ignored."""
    if version is None:
        return False
    try:
        public = Version(version).public
    except InvalidVersion:
        return False
    return Requirement(f"x{spec}").specifier.contains(public, prereleases=True)


def check() -> list[PackageStatus]:
    """The status of every key dependency (in ``KEY_PACKAGES`` order)."""
    ranges = tested_ranges()
    out = []
    for name in KEY_PACKAGES:
        version, spec = _installed(name), ranges.get(name, "")
        out.append(PackageStatus(name, version, spec or "any", in_range(version, spec)))
    return out


def warn_if_untested() -> list[PackageStatus]:
    """Log one warning naming every key dependency outside its tested range; returns those."""
    bad = [s for s in check() if not s.ok]
    if bad:
        names = ", ".join(f"{s.name} {s.installed or 'missing'} (tested {s.tested})" for s in bad)
        log.warning("outside the tested versions: %s; results may differ or fail (`fedpeft doctor` shows all)",
                    names)
    return bad


def device_facts() -> dict[str, Any]:
    """The training device torch would use here, bf16 support and the thread settings."""
    import torch

    facts: dict[str, Any] = {"torch_threads": torch.get_num_threads(),
                             "torch_interop_threads": torch.get_num_interop_threads(),
                             "cpu_count": os.cpu_count(),
                             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    if torch.cuda.is_available():
        facts.update(device="cuda", device_name=torch.cuda.get_device_name(0),
                     cuda=torch.version.cuda, bf16=bool(torch.cuda.is_bf16_supported()))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        facts.update(device="mps", bf16=False)
    else:  # bf16: native on this CPU, the rule train.precision = "auto" follows
        from fedpeft.training import cpu_has_native_bf16

        facts.update(device="cpu", device_name=platform.processor() or platform.machine(),
                     cpu_capability=torch.backends.cpu.get_cpu_capability(), bf16=cpu_has_native_bf16())
    return facts


def environment() -> dict[str, Any]:
    """Everything needed to reproduce a result's software environment (written into each run)."""
    return {"fedpeft": _installed("fedpeft"), "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": [asdict(s) for s in check()], "device": device_facts()}


def write_versions(run_dir: Path) -> None:
    """Write :func:`environment` as ``versions.json`` into ``run_dir``."""
    (run_dir / VERSIONS_FILE).write_text(json.dumps(environment(), indent=1) + "\n")
