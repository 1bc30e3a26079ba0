"""A node's client state on its own disk, so that it survives a resumed deployment (``fedpeft node --state-dir``).

Flower keeps a node's ``context.state`` in the SuperNode's memory for one Flower run; ``fedpeft run --resume``
starts a new one, so without a store a resumed deployment forgets what never reaches the server: personal tensors
(``share_a``'s B, a personal head), error-feedback residuals, SCAFFOLD's ``c_i``, a self-pruned rank and the
node-local DP accountant. With a store the ClientApp writes that state after every training round to
``<state-dir>/<run name>/node-<node id>/round-<k>.safetensors`` (the run name is the run directory's name, which
a resume keeps; arrays as tensors ``<record>/<key>``, config records as JSON in the header; written to a
temporary file and renamed, so a crash leaves the previous file whole) and, when a Flower run's first message
reaches a node with empty state, reads back the newest file of a round before the message's round. Nothing is
unpickled. A file that is not such a state, names another run or node, or (checked by the ClientApp) has other
tensors or shapes than the run's adapter is refused with :class:`NodeStateError`; the ClientApp logs it and
starts fresh. Flower-free: records are plain dicts of numpy arrays and JSON values.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.errors import FedPeftError

FORMAT = "fedpeft-node-state/1"
KEEP = 2  # files kept per node: the newest, and the one before (a resume may restart the round after it)
_FILE = re.compile(r"^round-(\d+)\.safetensors$")


class NodeStateError(FedPeftError):
    """A stored node state cannot be used for this run: the node starts fresh."""


@dataclass
class NodeState:
    """One node's client state after a training round: array records and config records, by record name."""

    round: int
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)


def node_dir(state_dir: Path, run: str, node: int) -> Path:
    """Where ``node``'s states of ``run`` live (the run name must be a plain file name)."""
    if not run or run in (".", "..") or any(c in run for c in "/\\\0"):
        raise NodeStateError(f"run name {run!r} cannot name a directory")
    return Path(state_dir) / run / f"node-{int(node)}"


def _rounds(directory: Path) -> dict[int, Path]:
    found = {}
    if directory.is_dir():
        for path in directory.iterdir():
            if m := _FILE.match(path.name):
                found[int(m.group(1))] = path
    return found


def save(state_dir: Path, run: str, node: int, state: NodeState, keep: int = KEEP) -> Path:
    """Write ``state`` atomically; drop files of later rounds (a future the resume discarded) and all but the
    newest ``keep``."""
    from safetensors.numpy import save_file

    directory = node_dir(state_dir, run, node)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{rec}/{key}": np.ascontiguousarray(arr) for rec, arrays in state.arrays.items()
               for key, arr in arrays.items()}
    meta = {"format": FORMAT, "run": run, "node": str(int(node)), "round": str(int(state.round)),
            "configs": json.dumps(state.configs)}
    final = directory / f"round-{int(state.round)}.safetensors"
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    rounds = _rounds(directory)
    kept = sorted(r for r in rounds if r <= state.round)[-keep:]
    for rnd, path in rounds.items():
        if rnd not in kept:
            path.unlink(missing_ok=True)
    return final


def load(state_dir: Path, run: str, node: int, before_round: int) -> NodeState | None:
    """The newest state of ``node`` in ``run`` saved after a round before ``before_round`` (None: there is none;
    files of later rounds belong to rounds the resumed run trains again and are ignored)."""
    from safetensors import SafetensorError, safe_open

    found = {r: p for r, p in _rounds(node_dir(state_dir, run, node)).items() if r < before_round}
    if not found:
        return None
    path = found[max(found)]
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  # safe_open is not a mapping
    except (SafetensorError, OSError, ValueError) as e:
        raise NodeStateError(f"node state {path} is not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise NodeStateError(f"node state {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("run") != run or meta.get("node") != str(int(node)) or meta.get("round") != str(max(found)):
        raise NodeStateError(f"node state {path} was saved for run {meta.get('run')!r}, node {meta.get('node')}, "
                             f"round {meta.get('round')}, not run {run!r}, node {node}, round {max(found)}")
    try:
        configs = json.loads(meta.get("configs", "{}"))
    except json.JSONDecodeError as e:
        raise NodeStateError(f"node state {path}: its config records are not JSON ({e})") from e
    if not isinstance(configs, dict) or not all(isinstance(v, dict) for v in configs.values()):
        raise NodeStateError(f"node state {path}: its config records are not a mapping of mappings")
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        rec, sep, key = name.partition("/")
        if not sep or not key:
            raise NodeStateError(f"node state {path}: tensor {name!r} is not named <record>/<key>")
        arrays.setdefault(rec, {})[key] = arr
    return NodeState(max(found), arrays, configs)


def check_shapes(state: NodeState, expected: dict[str, dict[str, tuple[int, ...]]]) -> None:
    """Refuse ``state`` unless every array of record ``rec`` is named and shaped as ``expected[rec]`` says
    (records not in ``expected`` are not checked), and float32."""
    for rec, arrays in state.arrays.items():
        shapes = expected.get(rec)
        if shapes is None:
            continue
        for key, arr in arrays.items():
            if key not in shapes:
                raise NodeStateError(f"stored {rec} tensor {key!r} is not one of this run's ({len(shapes)} known)")
            if tuple(arr.shape) != tuple(shapes[key]) or arr.dtype != np.float32:
                raise NodeStateError(f"stored {rec} tensor {key!r} is {arr.dtype} {tuple(arr.shape)}, this run's is "
                                     f"float32 {tuple(shapes[key])}")
