"""The split-learning wire, server side: serve a :class:`BodyService` on a gRPC bidirectional stream.

Each stream runs on its own worker thread and carries request frames (``split.frames``) from one
:class:`~fedpeft.split.transport.GrpcBody`; the dispatcher calls the body and answers with a reply
or an error frame. A malformed frame gets an error frame and the stream goes on.

Exactly-once steps: the dispatcher remembers, per client, its last reply (keyed by request kind,
step and a digest of the request bytes) and answers a repeated request from it instead of calling
the body again, so a client that resends after a broken stream never applies a step twice. A
backward whose forward this process never saw gets ``STATE_LOST``; the client replays the forward.

State: with ``state_dir``, the body's ``save(path)`` runs every ``save_every`` backward steps, at
each close and at stop, into a fresh directory that replaces the previous one atomically, together
with each client's last backward reply; ``load(path)`` runs at start. A server killed and
restarted loses the server-side adapter steps since its last save and the forward states in flight
(clients replay those); see ``docs/split-transport.md``.

:func:`run_split_server` builds the real body from a fedpeft config (:func:`build_body`) and serves it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import signal
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import grpc

from fedpeft.errors import SplitError
from fedpeft.split.frames import ErrorCode, Frame, Kind, Limits, decode, encode
from fedpeft.split.service import BodyService
from fedpeft.split.transport import DEFAULT_MAX_MESSAGE, REJOIN, SERVICE, grpc_options

# let clients ping (keepalive) every 10 s even while a stream is idle, without being sent away
SERVER_KEEPALIVE = [("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                    ("grpc.keepalive_permit_without_calls", 1)]

if TYPE_CHECKING:
    from fedpeft.certs import CertPaths
    from fedpeft.config import Config

log = logging.getLogger(__name__)

_PENDING = 8  # forward steps remembered per client while awaiting their backward


class Persistent(Protocol):
    """What a body offers to keep its server-side state across restarts (optional)."""

    def save(self, path: Path) -> None:
        """Write the state into ``path`` (a new file or directory)."""

    def load(self, path: Path) -> None:
        """Read the state written by :meth:`save`."""


@dataclass
class _Client:
    lock: threading.Lock = field(default_factory=threading.Lock)
    open: bool = False
    fingerprint: str = ""
    pending: OrderedDict[int, None] = field(default_factory=OrderedDict)
    last: tuple[int, int, bytes, bytes] | None = None  # (request kind, step, request digest, reply)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _error(code: ErrorCode, text: str, frame: Frame | None = None) -> bytes:
    return encode(Kind.ERROR, frame.client_id if frame else "", frame.step if frame else 0,
                  text=text.encode()[:4000].decode(errors="ignore"), code=code)


class _StateStore:
    """``state_dir/current`` holds the last saved state; a save is written aside, then swapped in."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @property
    def current(self) -> Path | None:
        for name in ("current", "previous"):  # "previous" survives a kill in the middle of a swap
            if (self.root / name / "complete").exists():
                return self.root / name
        return None

    def save(self, body: Persistent, replies: dict[str, tuple[int, bytes, bytes]]) -> None:
        tmp = self.root / "saving"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "replies").mkdir(parents=True)
        body.save(tmp / "body")
        for i, (digest, reply) in enumerate(r[1:] for r in replies.values()):
            (tmp / "replies" / f"{i}.frame").write_bytes(digest + reply)
        (tmp / "complete").touch()
        cur, prev = self.root / "current", self.root / "previous"
        shutil.rmtree(prev, ignore_errors=True)
        if cur.exists():
            cur.rename(prev)
        tmp.rename(cur)
        shutil.rmtree(prev, ignore_errors=True)

    def load(self, body: Persistent, limits: Limits) -> dict[str, _Client]:
        src = self.current
        if src is None:
            return {}
        body.load(src / "body")
        clients: dict[str, _Client] = {}
        for path in sorted((src / "replies").glob("*.frame")):
            raw = path.read_bytes()
            frame = decode(raw[16:], limits)
            if frame.kind != Kind.REPLY or frame.code != Kind.BACKWARD:
                raise SplitError(f"{path} is not a saved backward reply")
            clients[frame.client_id] = _Client(last=(Kind.BACKWARD, frame.step, raw[:16], raw[16:]))
        log.info("loaded split server state from %s (%d client replies)", src, len(clients))
        return clients


class _Dispatcher:
    """Turns one request frame into one answer frame; shared by all streams of a server."""

    def __init__(self, body: BodyService, limits: Limits, serialize: bool, store: _StateStore | None,
                 save_every: int) -> None:
        self.body, self.limits, self.serialize, self.store, self.save_every = body, limits, serialize, store, save_every
        self.body_lock = threading.RLock()
        self._lock = threading.Lock()
        self.steps = 0
        # serve() hands a store only to a body with save/load
        self.clients: dict[str, _Client] = store.load(cast(Persistent, body), limits) if store else {}

    def _body(self) -> contextlib.AbstractContextManager[Any]:
        return self.body_lock if self.serialize else contextlib.nullcontext()

    def handle(self, data: bytes) -> bytes:
        try:
            frame = decode(data, self.limits)
        except SplitError as exc:
            log.warning("rejected a malformed split frame (%d bytes): %s", len(data), exc)
            return _error(ErrorCode.MALFORMED, f"malformed frame: {exc}")
        if frame.kind not in (Kind.OPEN, Kind.FORWARD, Kind.BACKWARD, Kind.CLOSE) or not frame.client_id:
            return _error(ErrorCode.MALFORMED, f"a request must be open/forward/backward/close with a client id, "
                                               f"got {frame.kind.name} from {frame.client_id!r}", frame)
        with self._lock:
            client = self.clients.setdefault(frame.client_id, _Client())
        with client.lock:
            try:
                return self._handle(frame, client, data)
            except SplitError as exc:
                log.warning("split %s of %s step %d refused: %s", frame.kind.name, frame.client_id, frame.step, exc)
                return _error(ErrorCode.REJECTED, str(exc), frame)
            except Exception as exc:  # the body failed: answer, keep serving
                log.exception("split %s of %s step %d failed", frame.kind.name, frame.client_id, frame.step)
                return _error(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", frame)

    def _reply(self, frame: Frame, tensors: dict | None = None) -> bytes:
        return encode(Kind.REPLY, frame.client_id, frame.step, tensors, wire_dtype=frame.wire_dtype, code=frame.kind)

    def _handle(self, frame: Frame, client: _Client, data: bytes) -> bytes:
        cid, step, kind = frame.client_id, frame.step, frame.kind
        if kind == Kind.OPEN:
            if frame.code == REJOIN and client.open and client.fingerprint == frame.text:
                return self._reply(frame)  # a reconnect to this same process: the session and its state live on
            with self._body():
                self.body.open(cid, frame.text)
            if frame.code != REJOIN:  # a new session: forget what an earlier one left
                client.pending.clear()
                client.last = None
            client.open, client.fingerprint = True, frame.text
            return self._reply(frame)
        if kind == Kind.CLOSE:
            if client.open:
                with self._body():
                    self.body.close(cid)
            with self._lock:
                self.clients.pop(cid, None)
            if self.store:
                self.save()
            return self._reply(frame)
        if not client.open:
            return _error(ErrorCode.NOT_OPEN, f"client {cid!r} has no open session on this server "
                                              f"(did it restart?); open it again", frame)
        digest = _digest(data)
        if client.last is not None and client.last[:3] == (kind, step, digest):
            log.info("answered a repeated %s of %s step %d from the reply cache", kind.name, cid, step)
            return client.last[3]
        if kind == Kind.FORWARD:
            with self._body():
                out = self.body.forward(cid, step, frame.tensors)
            reply = self._reply(frame, out)
            client.pending[step] = None
            while len(client.pending) > _PENDING:
                client.pending.popitem(last=False)
            client.last = (kind, step, digest, reply)
            return reply
        if step not in client.pending:
            return _error(ErrorCode.STATE_LOST, f"no forward state for client {cid!r} step {step} "
                                                f"(server restarted?); replay the forward", frame)
        with self._body():
            out = self.body.backward(cid, step, frame.tensors)
            reply = self._reply(frame, out)
            client.pending.pop(step, None)
            client.last = (kind, step, digest, reply)
            with self._lock:
                self.steps += 1
                due = self.store is not None and self.save_every > 0 and self.steps % self.save_every == 0
            if due:
                self.save()
        return reply

    def save(self) -> None:
        """Save the body and the last backward replies (no-op without a state dir)."""
        if self.store is None:
            return
        with self.body_lock, self._lock:
            replies = {cid: c.last for cid, c in self.clients.items() if c.last and c.last[0] == Kind.BACKWARD}
            try:
                self.store.save(cast(Persistent, self.body), {cid: (r[1], r[2], r[3]) for cid, r in replies.items()})
            except Exception:  # keep serving: the step itself succeeded, only its persistence failed
                log.exception("could not save the split server state into %s", self.store.root)
                return
        log.debug("saved split server state after %d steps", self.steps)


class SplitServer:
    """A running split server: its bound ``port``; ``stop()`` saves the state and shuts down."""

    def __init__(self, server: grpc.Server, dispatcher: _Dispatcher, host: str, port: int) -> None:
        self._server, self._dispatcher, self.host, self.port = server, dispatcher, host, port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def save(self) -> None:
        """Save the body's state now (with a state dir)."""
        self._dispatcher.save()

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls, wait ``grace`` seconds for running ones, then save the state."""
        self._server.stop(grace).wait()
        self._dispatcher.save()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops; ``False`` on timeout."""
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> SplitServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _server_credentials(certs: CertPaths | str | Path) -> grpc.ServerCredentials:
    cert, key = ((Path(certs) / "server.crt", Path(certs) / "server.key") if isinstance(certs, (str, Path))
                 else (certs.server_cert, certs.server_key))
    try:
        return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
    except OSError as exc:
        raise SplitError(f"cannot read the server certificate or key: {exc}") from exc


def serve(body: BodyService, host: str = "127.0.0.1", port: int = 0, certs: CertPaths | str | Path | None = None, *,
          max_message_bytes: int = DEFAULT_MAX_MESSAGE, max_workers: int = 16, state_dir: str | Path | None = None,
          save_every: int = 10, serialize: bool | None = None, limits: Limits | None = None) -> SplitServer:
    """Start serving ``body`` on ``host:port`` (0 = a free port) and return at once.

    ``certs`` is a ``CertPaths`` or a directory with ``server.crt``/``server.key`` (TLS), or ``None``
    (plaintext, for loopback). ``max_workers`` bounds the concurrent streams. Body calls hold one
    lock unless ``serialize=False`` or the body sets ``thread_safe = True``. Incoming floats must be
    finite. With ``state_dir`` and a body with ``save``/``load``, the state persists (module doc).
    """
    if serialize is None:
        serialize = not getattr(body, "thread_safe", False)
    store = None
    if state_dir is not None:
        if not (callable(getattr(body, "save", None)) and callable(getattr(body, "load", None))):
            raise SplitError(f"{type(body).__name__} has no save/load; it cannot keep state in {state_dir}")
        store = _StateStore(Path(state_dir))
    limits = limits or Limits(max_frame_bytes=max_message_bytes, max_decoded_bytes=4 * max_message_bytes,
                              require_finite=True)
    dispatcher = _Dispatcher(body, limits, serialize, store, save_every)

    def stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        log.debug("split stream opened by %s", context.peer())
        for data in requests:
            yield dispatcher.handle(data)

    handler = grpc.method_handlers_generic_handler(SERVICE, {"Stream": grpc.stream_stream_rpc_method_handler(stream)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="split"),
                         handlers=(handler,),
                         options=[*grpc_options(max_message_bytes), *SERVER_KEEPALIVE, ("grpc.so_reuseport", 0)],
                         maximum_concurrent_rpcs=max_workers)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = (server.add_secure_port(target, _server_credentials(certs)) if certs is not None
                 else server.add_insecure_port(target))
    except RuntimeError as exc:
        raise SplitError(f"cannot listen on {target}: {exc}") from exc
    if not bound:
        raise SplitError(f"cannot listen on {target} (port in use?)")
    server.start()
    log.info("split server on %s:%d (%s, state %s)", host, bound, "TLS" if certs is not None else "plaintext",
             state_dir or "not saved")
    return SplitServer(server, dispatcher, host, bound)


def serve_forever(server: SplitServer) -> None:
    """Block until Ctrl-C or SIGTERM (main thread), then stop the server and save its state."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def build_body(cfg: Config) -> BodyService:
    """The in-process body (``split.body.BodyServer``) of ``cfg``'s model, cut as ``cfg.split`` says.

    The server builds the same peft model as the clients (same seed), so its body adapters start
    from the clients' initial values and the fingerprints match. It loads the data only for the
    label count of a classification head (part of the fingerprint).
    """
    from fedpeft.errors import ConfigError
    from fedpeft.runtime import Runtime
    from fedpeft.split.body import BodyServer
    from fedpeft.split.cut import cut_model

    split = getattr(cfg, "split", None)
    if split is None:
        raise ConfigError("the configuration has no [split] section (front_layers, back_layers, server_adapters)")
    rt = Runtime(cfg)
    model = cut_model(rt.model, cfg.model.task, split.front_layers, split.back_layers)
    return BodyServer.from_split(model, cfg.train, split.server_adapters, device=rt.device)


def run_split_server(cfg: Config, host: str = "127.0.0.1", port: int = 0, certs: CertPaths | str | Path | None = None,
                     state_dir: str | Path | None = None, *, save_every: int = 10,
                     max_message_bytes: int = DEFAULT_MAX_MESSAGE,
                     on_ready: Callable[[SplitServer], None] | None = None) -> None:
    """Build the body of ``cfg`` and serve it until Ctrl-C / SIGTERM (what ``fedpeft split-server`` runs).

    With ``state_dir`` the server-side adapters survive restarts (saved every ``save_every`` steps,
    at each close and at stop). ``on_ready`` gets the running server (e.g. to print its address).
    """
    server = serve(build_body(cfg), host, port, certs, state_dir=state_dir, save_every=save_every,
                   max_message_bytes=max_message_bytes)
    if on_ready is not None:
        on_ready(server)
    serve_forever(server)
