"""The split-learning wire, client side: :class:`GrpcBody`, a :class:`BodyService` over one gRPC stream.

Every call is one request frame and one reply frame (``split.frames``) on a bidirectional stream
``/fedpeft.split.Body/Stream`` whose messages are raw bytes (no protobuf, no protoc). When the stream
breaks or the server restarts, the proxy reconnects with exponential backoff (bounded total time),
re-opens its sessions and sends the failed request again. The server answers a repeated request
from its reply cache, so a step is never applied twice; if a restarted server lost the forward
state a backward needs, the proxy replays the forward of that step first (it keeps the encoded
forward until the backward succeeded). The server side is ``split.server``.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from fedpeft.errors import SplitError
from fedpeft.split.frames import REJOIN, ErrorCode, Frame, Kind, Limits, decode, encode, open_text, session_token

log = logging.getLogger(__name__)

SERVICE = "fedpeft.split.Body"
METHOD = f"/{SERVICE}/Stream"
DEFAULT_MAX_MESSAGE = 64 << 20
_KEEP_FORWARDS = 4  # encoded forwards kept per client for replay


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options shared by both sides: message size caps, no gRPC-level retries."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_retries", 0)]


# a client pings an idle connection every 30 s; no answer within 20 s = a dead server (retry)
CLIENT_KEEPALIVE = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 20_000)]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff between reconnection attempts, bounded by ``total`` seconds per call."""

    initial: float = 0.2
    multiplier: float = 2.0
    max_delay: float = 5.0
    total: float = 60.0
    jitter: float = 0.1  # each delay is stretched by a random factor in [1, 1 + jitter]


@dataclass
class CallStats:
    """One call: serialized frame bytes each way (re-opens and replays included), attempts, time."""

    kind: str
    step: int
    bytes_sent: int = 0
    bytes_received: int = 0
    attempts: int = 0
    seconds: float = 0.0


@dataclass
class TransportStats:
    """Totals over the life of a :class:`GrpcBody`; ``by_kind`` maps kind -> [sent, received]."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    retries: int = 0
    reconnects: int = 0
    replays: int = 0
    last: CallStats | None = None
    by_kind: dict[str, list[int]] = field(default_factory=dict)


class _Broken(Exception):
    """The stream is unusable (server gone, reset, timeout): reconnect and retry."""


class _Stream:
    """One bidirectional stream; a reader thread turns replies and failures into a queue."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.answered = False
        self.requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.replies: queue.SimpleQueue[bytes | _Broken] = queue.SimpleQueue()
        method = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
        self.call = method(iter(self.requests.get, None), wait_for_ready=False)
        threading.Thread(target=self._read, name="split-stream-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.replies.put(message)
            self.replies.put(_Broken("the server ended the stream"))
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "?"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            self.replies.put(_Broken(f"{code}: {details}"))

    def exchange(self, data: bytes, timeout: float) -> bytes:
        self.requests.put(data)
        try:
            item = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise _Broken(f"no reply within {timeout:.0f} s") from None
        if isinstance(item, _Broken):
            raise item
        return item

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()


class GrpcBody:
    """A :class:`~fedpeft.split.service.BodyService` on a remote split server (one stream, thread-safe).

    ``ca_cert`` turns on TLS (the CA that signed the server certificate, e.g. ``ca.crt`` from
    ``fedpeft.certs.make_certs``); a split server with certificates requires mutual TLS, so pass
    this client's ``client_cert`` / ``client_key`` too (``fedpeft.certs.make_client_cert``). Each
    session carries a secret token the proxy draws at its first open (kept for its lifetime, so a
    re-open or rejoin proves it is the same holder). ``wire_dtype="bf16"`` halves the bytes of float
    tensors both ways. ``stats`` counts the real serialized frame bytes (gRPC adds 5 bytes per message plus
    HTTP/2 framing). Calls are serialized: one stream carries one request at a time.
    """

    def __init__(self, address: str, *, ca_cert: str | Path | None = None, server_name: str | None = None,
                 client_cert: str | Path | None = None, client_key: str | Path | None = None,
                 wire_dtype: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE,
                 retry: RetryPolicy = RetryPolicy(), call_timeout: float = 120.0,
                 limits: Limits | None = None) -> None:
        self.address, self.wire_dtype, self.retry, self.call_timeout = address, wire_dtype, retry, call_timeout
        self.max_message_bytes = max_message_bytes
        self.limits = limits or Limits(max_frame_bytes=max_message_bytes, max_decoded_bytes=4 * max_message_bytes)
        self._options = grpc_options(max_message_bytes) + CLIENT_KEEPALIVE
        self._creds = None
        if (client_cert is None) != (client_key is None):
            raise SplitError("give both the client certificate and its key, or neither")
        if client_cert is not None and ca_cert is None:
            raise SplitError("a client certificate needs TLS: give the split server's CA certificate too")
        if ca_cert is not None:
            try:
                root = Path(ca_cert).read_bytes()
            except OSError as exc:
                raise SplitError(f"cannot read the CA certificate {ca_cert}: {exc}") from exc
            try:
                chain = Path(client_cert).read_bytes() if client_cert is not None else None
                key = Path(client_key).read_bytes() if client_key is not None else None
            except OSError as exc:
                raise SplitError(f"cannot read the client certificate or key: {exc}") from exc
            self._creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key,
                                                       certificate_chain=chain)
            if server_name:
                self._options.append(("grpc.ssl_target_name_override", server_name))  # type: ignore[arg-type]
        encode(Kind.OPEN, "", 0, wire_dtype=wire_dtype)  # reject an unknown wire dtype now
        self._stream: _Stream | None = None
        self._connected_once = False
        self._sessions: dict[str, str] = {}
        self._tokens: dict[str, str] = {}  # client id -> session token, drawn once per client id
        self._forwards: dict[str, OrderedDict[int, bytes]] = {}
        self._lock = threading.RLock()
        self.stats = TransportStats()

    # ------------------------------------------------------------------ BodyService

    def open(self, client_id: str, fingerprint: str) -> None:
        """Start a session on the server; a fingerprint mismatch raises ``SplitError``."""
        with self._lock:
            token = self._tokens.setdefault(client_id, session_token())
            data = self._encode(Kind.OPEN, client_id, 0, text=open_text(token, fingerprint))
            self._call(Kind.OPEN, client_id, 0, data)
            self._sessions[client_id] = fingerprint
            self._forwards[client_id] = OrderedDict()

    def forward(self, client_id: str, step: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Send activations, return the body's output; the encoded request is kept for a replay."""
        with self._lock:
            self._require(client_id)
            data = self._encode(Kind.FORWARD, client_id, step, tensors, text=self._tokens[client_id])
            reply = self._call(Kind.FORWARD, client_id, step, data)
            kept = self._forwards[client_id]
            kept[step] = data
            while len(kept) > _KEEP_FORWARDS:
                kept.popitem(last=False)
            return reply.tensors

    def backward(self, client_id: str, step: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Send the output gradient, return the input gradient (the server stepped its adapters)."""
        with self._lock:
            self._require(client_id)
            data = self._encode(Kind.BACKWARD, client_id, step, tensors, text=self._tokens[client_id])
            reply = self._call(Kind.BACKWARD, client_id, step, data)
            self._forwards[client_id].pop(step, None)
            return reply.tensors

    def close(self, client_id: str) -> None:
        """End the session on the server and forget it here."""
        with self._lock:
            if client_id in self._sessions:
                self._call(Kind.CLOSE, client_id, 0, self._encode(Kind.CLOSE, client_id, 0,
                                                                  text=self._tokens[client_id]))
            self._sessions.pop(client_id, None)
            self._forwards.pop(client_id, None)

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        """Close the stream and the channel (sessions stay open on the server until closed)."""
        with self._lock:
            self._drop_stream()

    def __enter__(self) -> GrpcBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ internals

    def _require(self, client_id: str) -> None:
        if client_id not in self._sessions:
            raise SplitError(f"client {client_id!r} has no open session; call open() first")

    def _encode(self, kind: Kind, client_id: str, step: int, tensors: dict[str, torch.Tensor] | None = None,
                text: str = "", code: int = 0) -> bytes:
        data = encode(kind, client_id, step, tensors, wire_dtype=self.wire_dtype, text=text, code=code)
        if len(data) > self.max_message_bytes:
            raise SplitError(f"{kind.name.lower()} frame of {len(data)} bytes exceeds max_message_bytes "
                             f"= {self.max_message_bytes}; use a smaller batch or raise the limit on both sides")
        return data

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _exchange(self, stream: _Stream, data: bytes, call: CallStats) -> Frame:
        raw = stream.exchange(data, self.call_timeout)
        call.bytes_sent += len(data)
        call.bytes_received += len(raw)
        if not stream.answered:  # the first answer on a stream: count reconnects that worked
            stream.answered = True
            self.stats.reconnects += int(self._connected_once)
            self._connected_once = True
        try:
            return decode(raw, self.limits)
        except SplitError as exc:
            raise SplitError(f"malformed reply from the split server at {self.address}: {exc}") from exc

    def _connect(self, call: CallStats) -> _Stream:
        """Open a stream if none is up; after a reconnect, rejoin every open session."""
        if self._stream is not None:
            return self._stream
        target = self.address
        channel = (grpc.secure_channel(target, self._creds, options=self._options) if self._creds
                   else grpc.insecure_channel(target, options=self._options))
        stream = _Stream(channel)
        self._stream = stream
        for cid, fingerprint in self._sessions.items():
            text = open_text(self._tokens[cid], fingerprint)
            reply = self._exchange(stream, self._encode(Kind.OPEN, cid, 0, text=text, code=REJOIN), call)
            if reply.kind == Kind.ERROR:
                raise SplitError(f"the split server at {self.address} refused to re-open client {cid!r}: "
                                 f"{reply.text}")
            log.info("re-opened split session %s on %s", cid, self.address)
        return stream

    def _call(self, kind: Kind, client_id: str, step: int, data: bytes) -> Frame:
        """One request with reconnects, backoff and the forward replay; updates ``stats``."""
        call = CallStats(kind.name.lower(), step)
        t0 = time.monotonic()
        delay, replayed_on = self.retry.initial, None
        try:
            while True:
                call.attempts += 1
                try:
                    stream = self._connect(call)
                    reply = self._exchange(stream, data, call)
                    if reply.kind == Kind.ERROR and reply.code == ErrorCode.NOT_OPEN:
                        raise _Broken(f"server has no session for {client_id!r}: {reply.text}")
                    if (reply.kind == Kind.ERROR and reply.code == ErrorCode.STATE_LOST
                            and kind == Kind.BACKWARD):
                        self._replay_forward(stream, client_id, step, replayed_on is stream, call, reply.text)
                        replayed_on = stream
                        continue
                    if reply.kind == Kind.ERROR:
                        name = ErrorCode(reply.code).name if reply.code in ErrorCode._value2member_map_ else reply.code
                        raise SplitError(f"split server {self.address}: {kind.name.lower()} of client {client_id!r} "
                                         f"step {step} failed ({name}): {reply.text}")
                    if (reply.kind != Kind.REPLY or reply.client_id != client_id or reply.step != step
                            or reply.code != kind):
                        raise SplitError(f"out-of-sequence reply from {self.address}: expected {kind.name} "
                                         f"{client_id!r} step {step}, got {reply.kind.name} {reply.client_id!r} "
                                         f"step {reply.step}")
                    return reply
                except _Broken as exc:
                    self._drop_stream()
                    elapsed = time.monotonic() - t0
                    if elapsed + delay > self.retry.total:
                        raise SplitError(f"lost the split server at {self.address} ({exc}); gave up after "
                                         f"{call.attempts} attempts in {elapsed:.1f} s") from None
                    self.stats.retries += 1
                    log.warning("split stream to %s broke (%s); retry %d in %.2f s", self.address, exc,
                                call.attempts, delay)
                    time.sleep(delay * (1.0 + self.retry.jitter * random.random()))
                    delay = min(delay * self.retry.multiplier, self.retry.max_delay)
        finally:
            call.seconds = time.monotonic() - t0
            self._account(call)

    def _replay_forward(self, stream: _Stream, client_id: str, step: int, again: bool, call: CallStats,
                        why: str) -> None:
        """Send the kept forward of ``step`` again; ``again``: it was already replayed on this stream."""
        kept = self._forwards.get(client_id)
        data = kept.get(step) if kept is not None else None
        if data is None or again:
            raise SplitError(f"split server {self.address} lost the forward state of client {client_id!r} step "
                             f"{step} and it cannot be replayed ({why})")
        log.warning("split server lost the forward of %s step %d; replaying it", client_id, step)
        self.stats.replays += 1
        reply = self._exchange(stream, data, call)
        if reply.kind == Kind.ERROR:
            if reply.code == ErrorCode.NOT_OPEN:
                raise _Broken(reply.text)
            raise SplitError(f"replaying the forward of {client_id!r} step {step} failed: {reply.text}")

    def _account(self, call: CallStats) -> None:
        s = self.stats
        s.calls += 1
        s.bytes_sent += call.bytes_sent
        s.bytes_received += call.bytes_received
        s.last = call
        totals = s.by_kind.setdefault(call.kind, [0, 0])
        totals[0] += call.bytes_sent
        totals[1] += call.bytes_received
