"""``fedpeft superlink`` and ``fedpeft node``: Flower's SuperLink / SuperNode as foreground processes.

Both build the ``flower-*`` command line from a few options and supervise the child processes:
SIGTERM/SIGINT are passed on, and the exit code of the Flower process is returned (a SuperNode whose
key is not registered exits with 305, after retrying for as long as an old session of the node could
hold it off: :func:`run_node`). ``--warm`` runs the SuperNode with ``--isolation process``
plus one long-lived :mod:`fedpeft.deploy.warm` executor, so the model stays loaded across rounds.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedpeft.deploy import flower
from fedpeft.errors import FedPeftError

log = logging.getLogger(__name__)
# Flower 1.41 answers an activation with HTTP 412 and this message both for a key that is not registered and
# for a registered node whose previous session is still alive on the SuperLink
ACTIVATION_REFUSED = b"Failed to activate SuperNode"
# that session ends HEARTBEAT_PATIENCE (2) x the 30 s heartbeat interval after the node's last heartbeat
SESSION_EXPIRY = 60.0
RETRY_WINDOW = 90.0  # the session's life plus room for the retries (each start of a SuperNode takes seconds)
RETRY_FIRST_DELAY = 2.0
RETRY_MAX_DELAY = 8.0


def default_home() -> Path:
    """``$FLWR_HOME`` if set, else ``~/.fedpeft/flwr`` (connections, installed app bundles)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".fedpeft" / "flwr").expanduser()


def _existing(path: Path | None, what: str) -> Path | None:
    if path is not None and not Path(path).is_file():
        raise FedPeftError(f"{what} {path}: no such file")
    return None if path is None else Path(path).resolve()


def superlink_args(host: str = "0.0.0.0", port: int = 8000, certs: Path | None = None, insecure: bool = False,
                   auth: bool = True, database: Path | None = None, extra: list[str] | None = None) -> list[str]:
    """The ``flower-superlink`` command: TLS from ``certs`` (ca.crt, server.crt, server.key), node auth."""
    args = [flower.flower_bin("flower-superlink"), "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if insecure:
        if auth:
            raise FedPeftError("SuperNode authentication needs TLS: give --certs DIR (see `fedpeft certs`) "
                               "or add --no-auth to --insecure")
        args.append("--insecure")
    else:
        if certs is None:
            raise FedPeftError("give --certs DIR with ca.crt, server.crt and server.key (make them with "
                               "`fedpeft certs --host NAME --out DIR`), or --insecure for a local test")
        files = {flag: _existing(Path(certs) / name, "certificate file") for flag, name in
                 (("--ssl-ca-certfile", "ca.crt"), ("--ssl-certfile", "server.crt"), ("--ssl-keyfile", "server.key"))}
        for flag, path in files.items():
            args += [flag, str(path)]
    if auth:
        args.append("--enable-supernode-auth")
    if database is not None:
        args += ["--database", str(Path(database).resolve())]
    return args + list(extra or [])


@dataclass
class NodeOptions:
    """What ``fedpeft node`` needs to start one SuperNode."""

    superlink: str
    data: Path | None = None
    partition_id: int | None = None
    num_partitions: int | None = None
    ca: Path | None = None
    key: Path | None = None
    port: int = 9094
    insecure: bool = False
    warm: bool = False
    max_wait: float | None = None
    poll_interval: float = 0.5  # seconds between the SuperNode's pulls when idle (Flower 1.41's own: 3)
    rank: int | None = None  # node config "rank": this node's LoRA rank (adapter.rank_rule = "node")
    state_dir: Path | None = None  # node config "state-dir": client state kept across resumed runs
    max_epsilon: float | None = None  # node config "max-epsilon": this node trains only under DP-SGD within it


def node_config(opts: NodeOptions) -> str:
    """The ``--node-config`` string: ``data-path`` (absolute) and/or ``partition-id``/``num-partitions``, ``rank``
    and ``state-dir`` (absolute), ``max-epsilon``, and ``deployed``."""
    items = []
    if opts.data is not None:
        path = Path(opts.data).expanduser().resolve()
        if not path.is_file():
            raise FedPeftError(f"--data {opts.data}: no such file")
        if any(c in str(path) for c in ' "\\'):
            raise FedPeftError(f"--data {path}: the path may not contain spaces, quotes or backslashes")
        items.append(f'data-path="{path}"')
    elif opts.partition_id is None:
        raise FedPeftError("give --data PATH (this node's own data) or --partition-id N (a scenario partition)")
    if opts.partition_id is not None:
        items.append(f"partition-id={int(opts.partition_id)}")
    if opts.num_partitions is not None:
        items.append(f"num-partitions={int(opts.num_partitions)}")
    if opts.rank is not None:
        if opts.rank < 1:
            raise FedPeftError(f"--rank {opts.rank}: a LoRA rank is at least 1")
        items.append(f"rank={int(opts.rank)}")
    if opts.state_dir is not None:
        items.append(f'state-dir="{_plain_dir(opts.state_dir, "--state-dir")}"')
    if opts.max_epsilon is not None:
        if not (opts.max_epsilon > 0 and math.isfinite(opts.max_epsilon)):
            raise FedPeftError(f"--max-epsilon {opts.max_epsilon}: a privacy limit is a finite epsilon above 0")
        items.append(f"max-epsilon={float(opts.max_epsilon)!r}")
    items.append("deployed=true")  # whatever the run config says, this node is no simulation (clients/app.py)
    return " ".join(items)


def _plain_dir(path: Path, flag: str) -> Path:
    """``path`` made absolute and created: a directory the node config string can quote."""
    path = Path(path).expanduser().resolve()
    if any(c in str(path) for c in ' "\\'):
        raise FedPeftError(f"{flag} {path}: the path may not contain spaces, quotes or backslashes")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FedPeftError(f"{flag} {path}: cannot create the directory ({e})") from e
    return path


def node_args(opts: NodeOptions) -> list[str]:
    """The ``flower-supernode`` command for ``opts`` (through :mod:`fedpeft.deploy.supernode` when it polls
    faster than Flower's 3 s)."""
    from fedpeft.deploy.supernode import FLOWER_IDLE_SLEEP

    if not opts.poll_interval > 0:
        raise FedPeftError(f"--poll-interval {opts.poll_interval}: expected seconds > 0")
    supernode = ([flower.flower_bin("flower-supernode")] if opts.poll_interval >= FLOWER_IDLE_SLEEP else
                 [sys.executable, "-m", "fedpeft.deploy.supernode", "--poll-interval", str(opts.poll_interval)])
    args = [*supernode, "--superlink", opts.superlink, "--port", str(opts.port), "--node-config", node_config(opts)]
    if opts.insecure:
        args.append("--insecure")
    elif opts.ca is not None:
        args += ["--root-certificates", str(_existing(opts.ca, "--ca"))]
    if opts.key is not None:
        args += ["--auth-supernode-private-key", str(_existing(opts.key, "--key"))]
    if opts.warm:
        args += ["--isolation", "process"]
    if opts.max_wait is not None:
        args += ["--max-wait-time", str(opts.max_wait)]
    return args


def warm_args(port: int) -> list[str]:
    """The warm executor serving the SuperNode's Runtime API on ``127.0.0.1:port``."""
    return [sys.executable, "-m", "fedpeft.deploy.warm", "--runtime-api-address", f"127.0.0.1:{port}"]


def _tee(stream: IO[bytes], needle: bytes, seen: threading.Event) -> None:
    """Copy ``stream`` to this process's stdout line by line; set ``seen`` when a line holds ``needle``."""
    for line in iter(stream.readline, b""):
        if needle in line:
            seen.set()
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()


def supervise(commands: list[list[str]], home: Path, watch: tuple[bytes, threading.Event] | None = None) -> int:
    """Run ``commands`` as children; when the first one exits, stop the rest and return its exit code.

    ``watch = (needle, event)``: the first command's output passes through this process, and ``event`` is
    set if a line of it holds ``needle``.
    """
    home.mkdir(parents=True, exist_ok=True)
    env = flower.flower_env(home)
    pipe = subprocess.PIPE if watch is not None else None
    procs = [subprocess.Popen(commands[0], env=env, stdout=pipe, stderr=subprocess.STDOUT if pipe else None)]
    procs += [subprocess.Popen(cmd, env=env) for cmd in commands[1:]]
    tee = None
    if watch is not None:
        tee = threading.Thread(target=_tee, args=(procs[0].stdout, *watch), daemon=True)
        tee.start()
    log.info("started %s", ", ".join(f"{Path(c[0]).name if 'python' not in c[0] else c[2]} (pid {p.pid})"
                                     for c, p in zip(commands, procs)))

    stopped: list[int] = []  # the stop signal this process received and passed on

    def forward(signum: int, _frame: object) -> None:
        stopped.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        main = procs[0]
        for p in procs[1:]:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if tee is not None:
            tee.join(timeout=5)  # the last lines, before the caller looks at the event
        if stopped:  # asked to stop: SIGTERM is a clean shutdown (0), Ctrl-C the shell's 130
            return 0 if stopped[0] == signal.SIGTERM else 130
        if main.returncode == 0 and any(p.returncode for p in procs[1:]):
            return 1  # a helper died first: report failure so a supervisor restarts the node
        return int(main.returncode)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_superlink(home: Path | None = None, **kwargs: object) -> int:
    """``fedpeft superlink``: run flower-superlink in the foreground; returns its exit code."""
    return supervise([superlink_args(**kwargs)], home or default_home())  # type: ignore[arg-type]


def run_node(opts: NodeOptions, home: Path | None = None) -> int:
    """``fedpeft node``: run flower-supernode (plus the warm executor) in the foreground.

    A node restarted while the SuperLink still holds its previous session (it was killed, or its stop
    could not deactivate it) is refused exactly as an unregistered node is: Flower's HTTP 412, "Failed to
    activate SuperNode", exit code 305. The session expires at most ``SESSION_EXPIRY`` seconds after the
    node's last heartbeat, so a refused node retries with back-off for ``RETRY_WINDOW`` seconds
    (``--max-wait``, if shorter), logging why; then it gives up with the Flower process's exit code.
    """
    commands = [node_args(opts)]
    if opts.warm:
        commands.append(warm_args(opts.port))
    window = RETRY_WINDOW if opts.max_wait is None else min(RETRY_WINDOW, opts.max_wait)
    deadline, delay = time.monotonic() + window, RETRY_FIRST_DELAY
    while True:
        refused = threading.Event()
        code = supervise(commands, home or default_home(), watch=(ACTIVATION_REFUSED, refused))
        if not refused.is_set():
            return code
        if time.monotonic() + delay > deadline:
            log.error("the SuperLink still refuses to activate this node after %.0f s: is its key registered "
                      "(fedpeft register-node)?", window)
            return code
        log.warning("the SuperLink refused to activate this node: its previous session is still alive (Flower "
                    "frees it %.0f s after the node's last heartbeat at the latest) or its key is not registered; "
                    "retrying in %.3g s", SESSION_EXPIRY, delay)
        try:
            time.sleep(delay)
        except KeyboardInterrupt:  # Ctrl-C between two attempts: no child is running
            return 130
        delay = min(2 * delay, RETRY_MAX_DELAY)
