"""Who may use the split server, and how much: client identities, stream admission, idle streams.

With certificates the server speaks mutual TLS: a client must present a certificate signed by the
deployment's CA (``fedpeft client-cert``), and the certificate's common name is its **identity**.
Sessions are kept per identity (``split.server``), so one client cannot name, step or close
another's. In plaintext (loopback only) there is no identity: each connection counts as its own
(so only the global caps bind), and a session is protected by its secret token alone.

:class:`StreamGate` caps the concurrent streams of one identity before any work is done, and
:func:`requests_until_idle` ends a stream that sends nothing for ``idle_timeout`` seconds, so idle
connections cannot hold the server's worker threads (``docs/split-transport.md``, threat model).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import grpc


@dataclass(frozen=True)
class ServerLimits:
    """What the split server grants (``[split]`` keys of the same names)."""

    max_sessions: int = 64                # open sessions, all identities together
    max_sessions_per_identity: int = 16   # open sessions of one identity
    max_clients_per_identity: int = 1024  # distinct client ids one identity may open (per-client adapter sets)
    max_streams: int = 64                 # concurrent streams (= worker threads)
    max_streams_per_identity: int = 4     # concurrent streams of one identity
    idle_timeout: float = 120.0           # seconds without a request: the stream ends, the session closes


class Refused(Exception):
    """A stream the server will not serve: ``code`` and ``details`` become its gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def identity_of(context: grpc.ServicerContext, mutual_tls: bool) -> str:
    """The client's identity: its certificate's common name (mutual TLS), else ``peer:<address:port>``.

    A plaintext peer proves nothing, and on loopback every local process shares one host: capping
    per host would let one process starve the others, so each connection is its own identity.
    """
    if mutual_tls:
        names = context.auth_context().get("x509_common_name") or []
        name = names[0].decode("utf-8", errors="replace") if names else ""
        if not name or "/" in name:  # the body sees identity/client_id: one "/" must split it unambiguously
            raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                          f"the client certificate's common name {name!r} is empty or contains '/'")
        return name
    return "peer:" + context.peer()  # ipv4:127.0.0.1:5555, ipv6:[::1]:5555, unix:...


class StreamGate:
    """Counts the open streams of each identity; :meth:`enter` refuses one over the cap."""

    def __init__(self, per_identity: int) -> None:
        self.per_identity = per_identity
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()
        self.refused = 0

    def enter(self, identity: str) -> None:
        """Admit one more stream of ``identity`` or raise :class:`Refused` (RESOURCE_EXHAUSTED)."""
        with self._lock:
            n = self._open.get(identity, 0)
            if n >= self.per_identity:
                self.refused += 1
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{identity!r} already has {n} streams open on this split server; it allows "
                              f"{self.per_identity} per client (split.max_streams_per_identity)")
            self._open[identity] = n + 1

    def leave(self, identity: str) -> None:
        """One stream of ``identity`` ended."""
        with self._lock:
            n = self._open.pop(identity, 1) - 1
            if n > 0:
                self._open[identity] = n


_END = object()


def requests_until_idle(requests: Iterator[bytes], idle_timeout: float) -> Iterator[bytes]:
    """The stream's requests; raises :class:`Refused` (DEADLINE_EXCEEDED) after ``idle_timeout`` s without one.

    gRPC's request iterator cannot time out, so a helper thread reads it into a queue; the thread ends
    with the stream (the iterator stops or raises once the call is over).
    """
    inbox: queue.SimpleQueue[object] = queue.SimpleQueue()

    def read() -> None:
        try:
            for data in requests:
                inbox.put(data)
        except Exception:  # the call was cancelled or broke: the stream is over
            pass
        inbox.put(_END)

    threading.Thread(target=read, name="split-stream-in", daemon=True).start()
    while True:
        try:
            item = inbox.get(timeout=idle_timeout)
        except queue.Empty:
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"no request for {idle_timeout:g} s; this split server ends idle streams "
                          f"(split.idle_timeout)") from None
        if item is _END:
            return
        yield cast(bytes, item)
