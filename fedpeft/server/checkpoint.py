"""Resumable server checkpoints: global adapter, server-optimizer state, sampling RNG, round.

Tensors go to safetensors files, everything else to JSON; nothing is pickled, so a checkpoint is
safe to load even if it came from elsewhere. Files are written to a temporary directory and swapped
in, so a crash mid-write leaves the previous checkpoint intact. A checkpoint never holds NaN or inf:
:func:`save` refuses to write one (the previous checkpoint stays, so a resume still works) and
:func:`load` refuses to read one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedpeft.errors import ConfigError, FedPeftError


@dataclass
class ServerCheckpoint:
    """What the server needs to continue a run exactly."""

    round: int
    tensors: dict[str, dict[str, torch.Tensor]]  # e.g. "global", "optimizer", "broadcast"
    rng_state: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def non_finite(tensors: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """``group/name`` of every floating-point tensor holding a NaN or inf."""
    return [f"{group}/{name}" for group, named in tensors.items() for name, t in named.items()
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]


def save(ckpt: ServerCheckpoint, directory: Path) -> None:
    """Write ``ckpt`` atomically into ``directory`` (replacing an older checkpoint); refuses NaN or inf."""
    bad = non_finite(ckpt.tensors)
    if bad:
        raise FedPeftError(f"round {ckpt.round}: refusing to checkpoint non-finite tensors {bad[:3]}; the "
                           f"previous checkpoint in {directory} is kept")
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, tensors in ckpt.tensors.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
    meta = {"round": ckpt.round, "tensors": sorted(ckpt.tensors), "rng_state": ckpt.rng_state, "extra": ckpt.extra}
    (tmp / "server.json").write_text(json.dumps(meta, indent=1))
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load(directory: Path) -> ServerCheckpoint:
    """Read a checkpoint written by :func:`save`."""
    meta_path = directory / "server.json"
    if not meta_path.is_file():
        raise ConfigError(f"no checkpoint in {directory} (expected {meta_path.name}); cannot resume")
    meta = json.loads(meta_path.read_text())
    tensors = {name: load_file(str(directory / f"{name}.safetensors")) for name in meta["tensors"]}
    bad = non_finite(tensors)
    if bad:
        raise ConfigError(f"the checkpoint in {directory} holds non-finite tensors {bad[:3]}; cannot resume from it")
    return ServerCheckpoint(round=int(meta["round"]), tensors=tensors, rng_state=meta["rng_state"],
                            extra=meta.get("extra", {}))
