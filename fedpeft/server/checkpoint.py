"""Resumable server checkpoints: global adapter, server-optimizer state, sampling RNG, round, client state.

A checkpoint directory holds ``<group>.safetensors`` per tensor group, ``server.json`` (round, RNG state,
JSON state), ``config.toml`` (the configuration it was written under), ``nodes/`` (the in-process engine's
client state) and ``manifest.json``, written last: the round, the sha256 and size of every other file, and
the length and sha256 of ``metrics.jsonl`` as it stood (rows 1..round). Nothing is pickled.

Writing (:func:`save`): every file goes into ``checkpoint.tmp/`` and is fsynced, the manifest last (tmp file,
fsync, rename), then the directories are swapped (``checkpoint`` -> ``checkpoint.old``, ``checkpoint.tmp`` ->
``checkpoint``, ``checkpoint.old`` removed). A crash at any point leaves at least one complete copy.

Resuming (:func:`recover`): each copy (``checkpoint``, ``checkpoint.tmp``, ``checkpoint.old``) is verified
against its manifest before anything is read; the newest verified copy is used and moved to ``checkpoint/``
(logged when it is not the main one). Then its round must lie in 1..``federation.rounds``, its configuration
must match the run's except for :data:`RESUMABLE_KEYS`, and ``metrics.jsonl`` must begin with exactly the rows
the manifest recorded; rows after them (a crash after the row was written but before the checkpoint, a
partial last line) are dropped with a log line and replayed. Anything else raises :class:`CheckpointError`
naming the file: a resume never continues silently from a corrupt or inconsistent checkpoint. A checkpoint
never holds NaN or inf: :func:`save` refuses to write one and :func:`load` to read one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedpeft import config
from fedpeft.errors import CheckpointError, FedPeftError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = 1
# keys that may differ between the checkpoint's configuration and the resumed run's: where and how fast it
# runs, how long it waits, how often it evaluates and saves, and how many rounds it runs in all
RESUMABLE_KEYS = frozenset({"run.name", "run.engine", "run.device", "run.threads", "federation.rounds",
                            "federation.round_timeout", "federation.node_wait_timeout", "federation.eval_every",
                            "federation.ray_num_cpus", "federation.ray_num_gpus", "train.eval_batch_size",
                            "output.dir", "output.checkpoint_every", "output.plots",
                            # where the split server is and the credentials for it, and its own limits
                            "split.address", "split.ca_cert", "split.client_cert", "split.client_key",
                            "split.max_sessions", "split.max_sessions_per_identity", "split.max_clients_per_identity",
                            "split.max_streams", "split.max_streams_per_identity", "split.idle_timeout",
                            "split.max_frame_tokens"})


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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file (or a directory entry list) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(directory: Path, rnd: int, metrics: Path | None = None) -> None:
    """Write ``manifest.json`` last: sha256 and size of every file in ``directory``, the round, and the
    length and sha256 of ``metrics`` as it stands now (the rows this checkpoint commits)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        data = path.read_bytes()
        files[path.relative_to(directory).as_posix()] = {"sha256": _sha256(data), "size": len(data)}
        _fsync(path)
    manifest: dict[str, Any] = {"format": FORMAT, "round": rnd, "files": files}
    if metrics is not None:
        data = metrics.read_bytes() if metrics.is_file() else b""
        manifest["metrics"] = {"rows": data.count(b"\n"), "bytes": len(data), "sha256": _sha256(data)}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync(tmp)
    tmp.rename(directory / MANIFEST)
    _fsync(directory)


def save(ckpt: ServerCheckpoint, directory: Path, metrics: Path | None = None, config_text: str | None = None,
         write_more: Callable[[Path], None] | None = None) -> None:
    """Write ``ckpt`` atomically into ``directory`` (replacing an older checkpoint); refuses NaN or inf.

    ``metrics``: the run's metrics.jsonl, whose rows so far the checkpoint commits; ``config_text``: the run's
    configuration; ``write_more(tmp_dir)`` adds files (client state) before the manifest seals the copy.
    """
    bad = non_finite(ckpt.tensors)
    if bad:
        raise FedPeftError(f"round {ckpt.round}: refusing to checkpoint non-finite tensors {bad[:3]}; the "
                           f"previous checkpoint in {directory} is kept")
    tmp, old = _copy(directory, ".tmp"), _copy(directory, ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, tensors in ckpt.tensors.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
    meta = {"round": ckpt.round, "tensors": sorted(ckpt.tensors), "rng_state": ckpt.rng_state, "extra": ckpt.extra}
    (tmp / "server.json").write_text(json.dumps(meta, indent=1))
    if config_text is not None:
        (tmp / "config.toml").write_text(config_text)
    if write_more is not None:
        write_more(tmp)
    seal(tmp, ckpt.round, metrics)
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    _fsync(directory.parent)
    shutil.rmtree(old, ignore_errors=True)


def _copy(directory: Path, suffix: str) -> Path:
    return directory.with_name(directory.name + suffix)


def verify(directory: Path) -> dict[str, Any]:
    """The manifest of ``directory`` after checking every file it lists (and no file beyond them)."""
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete (or older than manifests); "
                              "cannot resume from it")
    try:
        manifest = json.loads(path.read_bytes())
        files, rnd = dict(manifest["files"]), manifest["round"]
        if manifest["format"] != FORMAT or not isinstance(rnd, int) or isinstance(rnd, bool):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is corrupt (not a fedpeft checkpoint manifest); cannot resume") from None
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {MANIFEST}
    unlisted = sorted(present - set(files))
    if unlisted:
        raise CheckpointError(f"{directory / unlisted[0]} is not in the checkpoint's manifest (added after it was "
                              "written); cannot resume")
    for name, want in sorted(files.items()):
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing from the checkpoint; cannot resume")
        data = file.read_bytes()
        if not isinstance(want, dict) or len(data) != want.get("size") or _sha256(data) != want.get("sha256"):
            raise CheckpointError(f"{file} does not match the checkpoint's manifest (size or sha256 differs: "
                                  "corrupt, truncated or edited); cannot resume")
    return manifest


def recover(directory: Path, metrics: Path, cfg: config.Config) -> int:
    """Make ``directory`` hold the newest verified checkpoint and ``metrics`` exactly its rows; returns its round.

    Idempotent (the CLI runs it before starting an engine, the ServerApp again before loading).
    """
    copies = [d for d in (directory, _copy(directory, ".tmp"), _copy(directory, ".old")) if d.is_dir()]
    if not copies:
        raise CheckpointError(f"no checkpoint in {directory} (expected {MANIFEST}); cannot resume")
    verified, problems = [], []
    for d in copies:
        try:
            verified.append((verify(d)["round"], d))
        except CheckpointError as e:
            problems.append(str(e))
    if not verified:
        raise CheckpointError(problems[0])
    rnd, best = max(verified, key=lambda v: (v[0], v[1] == directory))
    if best != directory:
        log.warning("resuming from %s (round %d), the newest complete verified copy%s", best.name, rnd,
                    f"; {problems[0]}" if problems else "")
        if any(d == directory for _, d in verified):  # complete but older: superseded by ``best``
            shutil.rmtree(directory)
        elif directory.exists():  # corrupt: kept for inspection
            shutil.rmtree(_copy(directory, ".corrupt"), ignore_errors=True)
            directory.rename(_copy(directory, ".corrupt"))
        best.rename(directory)
    _check_config(directory, rnd, cfg)
    _check_metrics(verify(directory), metrics, rnd)
    return rnd


def _check_config(directory: Path, rnd: int, cfg: config.Config) -> None:
    """The checkpoint's round within the run and its configuration equal to the run's where it matters."""
    if not 1 <= rnd <= cfg.federation.rounds:
        raise CheckpointError(f"{directory / MANIFEST}: the checkpoint is at round {rnd}, outside 1.."
                              f"{cfg.federation.rounds} (federation.rounds); cannot resume")
    path = directory / "config.toml"
    if not path.is_file():
        return  # written without a configuration (a bare checkpoint)
    try:
        saved = config.loads(path.read_text()).to_dict()
    except (FedPeftError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    now = cfg.to_dict()
    changed = [f"{s}.{k} ({v!r} -> {now[s][k]!r})" for s, section in saved.items() for k, v in section.items()
               if f"{s}.{k}" not in RESUMABLE_KEYS and now[s][k] != v]
    if changed:
        raise CheckpointError(f"the run's configuration differs from the checkpoint's ({path}) in "
                              f"{', '.join(changed)}; only {', '.join(sorted(RESUMABLE_KEYS))} may change on resume")


def _check_metrics(manifest: dict[str, Any], metrics: Path, rnd: int) -> None:
    """``metrics`` must begin with the bytes the checkpoint committed; anything after them is dropped."""
    want = manifest.get("metrics")
    if want is None:
        return  # a bare checkpoint, written without a metrics file
    if not metrics.is_file():
        raise CheckpointError(f"{metrics} is missing but the checkpoint (round {rnd}) committed {want['rows']} "
                              "row(s) to it; cannot resume")
    data = metrics.read_bytes()
    head, rows = data[:want["bytes"]], data.count(b"\n")
    if len(head) < want["bytes"]:
        raise CheckpointError(f"{metrics} holds {rows} complete row(s), fewer than the "
                              f"{want['rows']} the checkpoint (round {rnd}) committed; cannot resume")
    if _sha256(head) != want["sha256"]:
        raise CheckpointError(f"{metrics}: rows 1..{want['rows']} differ from those the checkpoint (round {rnd}) "
                              "committed (edited or corrupt); cannot resume")
    tail = data[want["bytes"]:]
    if tail:
        log.warning("%s: dropping %d row(s) written after the checkpoint's round %d%s; they are replayed", metrics,
                    tail.count(b"\n") + (not tail.endswith(b"\n")), rnd,
                    " (the last one partial)" if not tail.endswith(b"\n") else "")
        with open(metrics, "r+b") as f:
            f.truncate(want["bytes"])
            os.fsync(f.fileno())


def load(directory: Path) -> ServerCheckpoint:
    """Read a checkpoint written by :func:`save`, after verifying it against its manifest."""
    manifest = verify(directory)
    meta_path = directory / "server.json"
    try:
        meta = json.loads(meta_path.read_bytes())
        rnd = meta["round"]
        if rnd != manifest["round"]:
            raise ValueError(f"round {rnd!r} but the manifest says {manifest['round']}")
        tensors = {name: load_file(str(directory / f"{name}.safetensors")) for name in meta["tensors"]}
        ckpt = ServerCheckpoint(round=rnd, tensors=tensors, rng_state=dict(meta["rng_state"]),
                                extra=dict(meta.get("extra", {})))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint ({type(e).__name__}: {e}); cannot resume") from None
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(f"the checkpoint in {directory} holds non-finite tensors {bad[:3]}; cannot resume "
                              "from it")
    return ckpt
