"""The split-learning wire, server side: serve a :class:`BodyService` on a gRPC bidirectional stream.

Each stream runs on its own worker thread and carries request frames (``split.frames``) from one
:class:`~fedpeft.split.transport.GrpcBody`; the dispatcher (``split.sessions``) calls the body and
answers with a reply or an error frame. A malformed frame gets an error frame and the stream goes on.

Hardening (``docs/split-transport.md``, threat model): with certificates the server requires mutual
TLS and keeps sessions per client identity (``split.guard``); every session is bound to its secret
token; a frame's tokens are bounded (the model's ``max_length``, ``split.max_frame_tokens``) before
anything is allocated; streams per identity, sessions and idle time are capped
(:class:`~fedpeft.split.guard.ServerLimits`), and a stream's forward state is freed when it ends.

State: with ``state_dir``, the body's ``save(path)`` runs every ``save_every`` backward steps, at
each close and at stop, into a fresh directory that replaces the previous one atomically, together
with each client's last backward reply; ``load(path)`` runs at start. A server killed and
restarted loses the server-side adapter steps since its last save and the forward states in flight
(clients replay those); see ``docs/split-transport.md``.

:func:`run_split_server` builds the real body from a fedpeft config (:func:`build_body`) and serves it.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from fedpeft.errors import SplitError
from fedpeft.split.frames import Limits
from fedpeft.split.guard import Refused, ServerLimits, StreamGate, identity_of, requests_until_idle
from fedpeft.split.service import BodyService
from fedpeft.split.sessions import Dispatcher, Peer, StateStore
from fedpeft.split.transport import DEFAULT_MAX_MESSAGE, SERVICE, grpc_options

# let clients ping (keepalive) every 10 s even while a stream is idle, without being sent away
SERVER_KEEPALIVE = [("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                    ("grpc.keepalive_permit_without_calls", 1)]

if TYPE_CHECKING:
    from fedpeft.certs import CertPaths
    from fedpeft.config import Config

log = logging.getLogger(__name__)


class SplitServer:
    """A running split server: its bound ``port``; ``stop()`` saves the state and shuts down."""

    def __init__(self, server: grpc.Server, dispatcher: Dispatcher, host: str, port: int) -> None:
        self._server, self._dispatcher, self.host, self.port = server, dispatcher, host, port
        self._stopped = threading.Event()
        threading.Thread(target=self._sweep, name="split-idle-sweeper", daemon=True).start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def sessions(self) -> int:
        """Sessions open now (attached to a stream or waiting for their client to rejoin)."""
        return len(self._dispatcher.sessions)

    def _sweep(self) -> None:
        period = min(max(self._dispatcher.caps.idle_timeout / 4, 0.05), 5.0)
        while not self._stopped.wait(period):
            self._dispatcher.expire()

    def save(self) -> None:
        """Save the body's state now (with a state dir)."""
        self._dispatcher.save()

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls, wait ``grace`` seconds for running ones, then save the state."""
        self._stopped.set()
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
    """Mutual TLS: the server's certificate, and only clients whose certificate the same CA signed."""
    cert, key, ca = ((Path(certs) / "server.crt", Path(certs) / "server.key", Path(certs) / "ca.crt")
                     if isinstance(certs, (str, Path)) else (certs.server_cert, certs.server_key, certs.ca_cert))
    try:
        return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())],
                                           root_certificates=Path(ca).read_bytes(), require_client_auth=True)
    except OSError as exc:
        raise SplitError(f"cannot read the server certificate, its key or the CA certificate: {exc}") from exc


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _refuse_open_plaintext(host: str, certs: object, insecure: bool) -> None:
    if certs is None and not insecure and not _loopback(host):
        raise SplitError(f"a plaintext split server on {host} would serve anyone who reaches it: give it "
                         f"certificates (--certs, mutual TLS), listen on a loopback address, or pass --insecure")


def serve(body: BodyService, host: str = "127.0.0.1", port: int = 0, certs: CertPaths | str | Path | None = None, *,
          max_message_bytes: int = DEFAULT_MAX_MESSAGE, state_dir: str | Path | None = None,
          save_every: int = 10, serialize: bool | None = None, limits: Limits | None = None,
          server_limits: ServerLimits | None = None, max_frame_tokens: int = 8192,
          insecure: bool = False) -> SplitServer:
    """Start serving ``body`` on ``host:port`` (0 = a free port) and return at once.

    ``certs`` is a ``CertPaths`` or a directory with ``ca.crt``, ``server.crt``, ``server.key``: the
    server then requires mutual TLS (client certificates signed by that CA). Without ``certs`` it
    speaks plaintext, which it refuses on a non-loopback ``host`` unless ``insecure``.
    ``server_limits`` caps sessions, streams (the worker threads) and idle time; a frame may carry
    at most ``max_frame_tokens`` tokens (0 = no cap) and sequences of at most the body's
    ``max_seq_len`` (if it has one). Body calls hold one lock unless ``serialize=False`` or the body
    sets ``thread_safe = True``. Incoming floats must be finite. With ``state_dir`` and a body with
    ``save``/``load``, the state persists (``split.sessions``).
    """
    _refuse_open_plaintext(host, certs, insecure)
    server_limits = server_limits or ServerLimits()
    if serialize is None:
        serialize = not getattr(body, "thread_safe", False)
    store = None
    if state_dir is not None:
        if not (callable(getattr(body, "save", None)) and callable(getattr(body, "load", None))):
            raise SplitError(f"{type(body).__name__} has no save/load; it cannot keep state in {state_dir}")
        store = StateStore(Path(state_dir))
    limits = limits or Limits(max_frame_bytes=max_message_bytes, max_decoded_bytes=4 * max_message_bytes,
                              require_finite=True, max_seq_len=int(getattr(body, "max_seq_len", 0) or 0),
                              max_tokens=max_frame_tokens)
    dispatcher = Dispatcher(body, limits, serialize, store, save_every, server_limits)
    gate = StreamGate(server_limits.max_streams_per_identity)
    mutual_tls = certs is not None

    def stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            identity = identity_of(context, mutual_tls)
            gate.enter(identity)
        except Refused as exc:
            if gate.refused & (gate.refused - 1) == 0:  # the 1st, 2nd, 4th ...: a flood does not flood the log
                log.warning("split stream from %s refused (%d so far): %s", context.peer(), gate.refused, exc.details)
            context.abort(exc.code, exc.details)
            return
        peer = Peer(identity, mutual_tls)
        log.debug("split stream opened by %s (%s)", identity, context.peer())
        try:
            for data in requests_until_idle(requests, server_limits.idle_timeout):
                yield dispatcher.handle(data, peer)
        except Refused as exc:
            log.info("ended the split stream of %s: %s", identity, exc.details)
            context.abort(exc.code, exc.details)
        finally:
            gate.leave(identity)
            dispatcher.stream_ended(peer)

    handler = grpc.method_handlers_generic_handler(SERVICE, {"Stream": grpc.stream_stream_rpc_method_handler(stream)})
    workers = server_limits.max_streams
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="split"),
                         handlers=(handler,),
                         options=[*grpc_options(max_message_bytes), *SERVER_KEEPALIVE, ("grpc.so_reuseport", 0)],
                         maximum_concurrent_rpcs=workers)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = (server.add_secure_port(target, _server_credentials(certs)) if certs is not None
                 else server.add_insecure_port(target))
    except RuntimeError as exc:
        raise SplitError(f"cannot listen on {target}: {exc}") from exc
    if not bound:
        raise SplitError(f"cannot listen on {target} (port in use?)")
    server.start()
    log.info("split server on %s:%d (%s, state %s, %s)", host, bound,
             "mutual TLS" if certs is not None else "plaintext", state_dir or "not saved", server_limits)
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
    body = BodyServer.from_split(model, cfg.train, split.server_adapters, device=rt.device)
    body.max_seq_len = cfg.model.max_length + model.front.num_virtual_tokens  # a soft prompt adds its tokens
    return body


def server_limits(cfg: Config) -> ServerLimits:
    """The :class:`ServerLimits` of ``cfg.split``."""
    s = cfg.split
    return ServerLimits(max_sessions=s.max_sessions, max_sessions_per_identity=s.max_sessions_per_identity,
                        max_clients_per_identity=s.max_clients_per_identity, max_streams=s.max_streams,
                        max_streams_per_identity=s.max_streams_per_identity, idle_timeout=s.idle_timeout)


def run_split_server(cfg: Config, host: str = "127.0.0.1", port: int = 0, certs: CertPaths | str | Path | None = None,
                     state_dir: str | Path | None = None, *, save_every: int = 10,
                     max_message_bytes: int = DEFAULT_MAX_MESSAGE, insecure: bool = False,
                     on_ready: Callable[[SplitServer], None] | None = None) -> None:
    """Build the body of ``cfg`` and serve it until Ctrl-C / SIGTERM (what ``fedpeft split-server`` runs).

    With ``state_dir`` the server-side adapters survive restarts (saved every ``save_every`` steps,
    at each close and at stop). The limits come from ``cfg.split`` (:func:`server_limits`,
    ``max_frame_tokens``) and the model's ``max_length``. ``on_ready`` gets the running server.
    """
    _refuse_open_plaintext(host, certs, insecure)  # before the model is built
    server = serve(build_body(cfg), host, port, certs, state_dir=state_dir, save_every=save_every,
                   max_message_bytes=max_message_bytes, server_limits=server_limits(cfg),
                   max_frame_tokens=cfg.split.max_frame_tokens, insecure=insecure)
    if on_ready is not None:
        on_ready(server)
    serve_forever(server)
