"""The split server's sessions: one request frame in, one answer frame out, for every stream.

A session is keyed by ``(identity, client_id)`` (``split.guard``: the certificate's common name
under mutual TLS, nobody in plaintext) and bound to the secret token its client chose at open: a
forward, backward, close or rejoin with another token is answered ``DENIED``, one for a client id
this identity has not opened ``NOT_OPEN``. Under mutual TLS the body sees ``identity/client_id``,
so two identities never share adapters either. ``ServerLimits`` caps the sessions (all and per
identity) and the distinct client ids one identity may open (each may own a set of server adapters).

Memory: a session's forward state (activations and autograd graph, held by the body) lives only
while the stream that opened it is up. When that stream ends the body session is closed (its
graphs freed); the client rejoins on a new stream and replays the forward it still needs. A session
without a request for ``idle_timeout`` seconds is closed and forgotten.

Exactly-once steps: per session the last reply is kept (keyed by request kind, step and a digest
of the request bytes) and a repeated request is answered from it instead of calling the body again.
A backward whose forward this process no longer holds gets ``STATE_LOST``; the client replays it.

State: with a :class:`StateStore`, the body's ``save(path)`` runs every ``save_every`` backward
steps and at each close into a fresh directory swapped in atomically, with each session's last
backward reply, identity and token digest; ``load(path)`` runs at start.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import json
import logging
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from fedpeft.errors import SplitError
from fedpeft.split.frames import REJOIN, ErrorCode, Frame, Kind, Limits, decode, encode, parse_open_text
from fedpeft.split.guard import ServerLimits
from fedpeft.split.service import BodyService

log = logging.getLogger(__name__)

_PENDING = 8  # forward steps remembered per session while awaiting their backward


class Persistent(Protocol):
    """What a body offers to keep its server-side state across restarts (optional)."""

    def save(self, path: Path) -> None:
        """Write the state into ``path`` (a new file or directory)."""

    def load(self, path: Path) -> None:
        """Read the state written by :meth:`save`."""


@dataclass
class Peer:
    """One stream as the dispatcher sees it: who is on it (``""`` in plaintext)."""

    identity: str
    authenticated: bool


@dataclass
class _Session:
    token: bytes                           # digest of the client's session token
    owner: str = ""                        # the identity that opened it (in plaintext: its connection)
    lock: threading.Lock = field(default_factory=threading.Lock)
    open: bool = False                     # the body holds a session for it
    gone: bool = False                     # closed or expired: a request that still holds it sees NOT_OPEN
    fingerprint: str = ""
    stream: Peer | None = None             # the stream it was last opened or rejoined on
    seen: float = field(default_factory=time.monotonic)
    pending: OrderedDict[int, None] = field(default_factory=OrderedDict)
    last: tuple[int, int, bytes, bytes] | None = None  # (request kind, step, request digest, reply)


Key = tuple[str, str]  # (identity, client id)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Return the heap pages freed by dropped activations to the OS (glibc only; elsewhere a no-op).

    glibc keeps freed memory in the arena of the thread that allocated it, and every stream runs on
    its own worker thread: without a trim, activations freed on one thread's arena are not reused by
    the next stream's, and the server's resident memory only grows.
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _error(code: ErrorCode, text: str, frame: Frame | None = None) -> bytes:
    return encode(Kind.ERROR, frame.client_id if frame else "", frame.step if frame else 0,
                  text=text.encode()[:4000].decode(errors="ignore"), code=code)


class StateStore:
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

    def save(self, body: Persistent, replies: dict[Key, tuple[bytes, bytes, bytes]]) -> None:
        """Save the body and, per session, (token digest, request digest, last backward reply)."""
        tmp = self.root / "saving"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "replies").mkdir(parents=True)
        body.save(tmp / "body")
        for i, ((identity, _), (token, digest, reply)) in enumerate(replies.items()):
            (tmp / "replies" / f"{i}.frame").write_bytes(digest + reply)
            (tmp / "replies" / f"{i}.json").write_text(json.dumps({"identity": identity, "token": token.hex()}))
        (tmp / "complete").touch()
        cur, prev = self.root / "current", self.root / "previous"
        shutil.rmtree(prev, ignore_errors=True)
        if cur.exists():
            cur.rename(prev)
        tmp.rename(cur)
        shutil.rmtree(prev, ignore_errors=True)

    def load(self, body: Persistent, limits: Limits) -> dict[Key, _Session]:
        src = self.current
        if src is None:
            return {}
        body.load(src / "body")
        sessions: dict[Key, _Session] = {}
        for path in sorted((src / "replies").glob("*.frame")):
            raw = path.read_bytes()
            frame = decode(raw[16:], limits)
            meta = json.loads(path.with_suffix(".json").read_text())
            if frame.kind != Kind.REPLY or frame.code != Kind.BACKWARD:
                raise SplitError(f"{path} is not a saved backward reply")
            sessions[(str(meta["identity"]), frame.client_id)] = _Session(
                token=bytes.fromhex(meta["token"]), owner=str(meta["identity"]),
                last=(Kind.BACKWARD, frame.step, raw[:16], raw[16:]))
        log.info("loaded split server state from %s (%d client replies)", src, len(sessions))
        return sessions


class Dispatcher:
    """Turns one request frame into one answer frame; shared by all streams of a server."""

    def __init__(self, body: BodyService, limits: Limits, serialize: bool, store: StateStore | None,
                 save_every: int, caps: ServerLimits) -> None:
        self.body, self.limits, self.serialize, self.store, self.save_every = body, limits, serialize, store, save_every
        self.caps = caps
        self.body_lock = threading.RLock()
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._refusals: dict[tuple[str, str], int] = {}
        self._client_ids: dict[str, set[str]] = {}  # identity -> the client ids it opened (adapter sets it made)
        self.steps = 0
        # serve() hands a store only to a body with save/load
        self.sessions: dict[Key, _Session] = store.load(cast(Persistent, body), limits) if store else {}

    def _warn(self, kind: str, peer: Peer, message: str, *args: object) -> None:
        """Log a refusal of ``peer``: the 1st, 2nd, 4th, 8th ... of each kind, so a flood cannot flood the log."""
        who = peer.identity if peer.authenticated else "plaintext peers"  # bounded: one entry per certificate
        with self._log_lock:
            n = self._refusals[(kind, who)] = self._refusals.get((kind, who), 0) + 1
        if n & (n - 1) == 0:
            log.warning(message + " [from %s; refusal %d of this kind from %s]", *args, peer.identity, n, who)

    def _body(self) -> contextlib.AbstractContextManager[Any]:
        return self.body_lock if self.serialize else contextlib.nullcontext()

    @staticmethod
    def body_id(key: Key) -> str:
        """The client id the body sees: ``identity/client_id`` under mutual TLS, else the client id."""
        return f"{key[0]}/{key[1]}" if key[0] else key[1]

    def handle(self, data: bytes, peer: Peer) -> bytes:
        """Answer one request frame that arrived on ``peer``'s stream."""
        try:
            frame = decode(data, self.limits)
        except SplitError as exc:
            self._warn("malformed", peer, "rejected a malformed split frame (%d bytes): %s", len(data), exc)
            return _error(ErrorCode.MALFORMED, f"malformed frame: {exc}")
        if frame.kind not in (Kind.OPEN, Kind.FORWARD, Kind.BACKWARD, Kind.CLOSE) or not frame.client_id:
            return _error(ErrorCode.MALFORMED, f"a request must be open/forward/backward/close with a client id, "
                                               f"got {frame.kind.name} from {frame.client_id!r}", frame)
        token, fingerprint = frame.text, ""
        if frame.kind == Kind.OPEN:
            try:
                token, fingerprint = parse_open_text(frame.text)
            except SplitError as exc:
                return _error(ErrorCode.REJECTED, str(exc), frame)
        key = (peer.identity if peer.authenticated else "", frame.client_id)
        session, answer = self._lookup(key, frame, _digest(token.encode()), peer)
        if session is None:
            return answer
        with session.lock:
            try:
                if session.gone:
                    return _error(ErrorCode.NOT_OPEN, f"the session of client {frame.client_id!r} ended; open it "
                                                      f"again", frame)
                if session.token != _digest(token.encode()):
                    if not (frame.kind == Kind.OPEN and frame.code != REJOIN and peer.authenticated):
                        self._warn("denied", peer, "split %s of %s step %d refused: wrong session token",
                                   frame.kind.name, frame.client_id, frame.step)
                        return _error(ErrorCode.DENIED, f"client id {frame.client_id!r} belongs to another session "
                                                        f"on this split server (wrong session token)", frame)
                    self._drop(key, session)  # the same identity starts over (e.g. its process restarted)
                    session.token, session.last = _digest(token.encode()), None
                session.seen = time.monotonic()
                return self._handle(key, frame, session, data, fingerprint, peer)
            except SplitError as exc:
                self._warn("refused", peer, "split %s of %s step %d refused: %s", frame.kind.name, frame.client_id,
                           frame.step, exc)
                return _error(ErrorCode.REJECTED, str(exc), frame)
            except Exception as exc:  # the body failed: answer, keep serving
                self._warn("failed", peer, "split %s of %s step %d failed: %s: %s", frame.kind.name, frame.client_id,
                           frame.step, type(exc).__name__, exc)
                log.debug("split %s of %s step %d failed", frame.kind.name, frame.client_id, frame.step, exc_info=True)
                return _error(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", frame)
            finally:
                session.seen = time.monotonic()

    def _lookup(self, key: Key, frame: Frame, token: bytes, peer: Peer) -> tuple[_Session | None, bytes]:
        """The session of ``key``; a new one for an open (``max_sessions`` permitting), else an error frame."""
        with self._lock:
            session = self.sessions.get(key)
            if session is not None:
                return session, b""
            if frame.kind == Kind.CLOSE:
                return None, self._reply(frame)  # nothing to close
            if frame.kind != Kind.OPEN:
                return None, _error(ErrorCode.NOT_OPEN, f"client {frame.client_id!r} has no open session on this "
                                                        f"server (did it restart?); open it again", frame)
            if len(self.sessions) >= self.caps.max_sessions:
                self._warn("sessions", peer, "split open of %s refused: %d sessions open", frame.client_id,
                           len(self.sessions))
                return None, _error(ErrorCode.LIMIT, f"this split server holds {len(self.sessions)} sessions, its "
                                                     f"limit (split.max_sessions); try again later", frame)
            mine = sum(s.owner == peer.identity for s in self.sessions.values())
            if mine >= self.caps.max_sessions_per_identity:
                self._warn("sessions", peer, "split open of %s refused: its identity holds %d sessions",
                           frame.client_id, mine)
                return None, _error(ErrorCode.LIMIT, f"{peer.identity!r} holds {mine} sessions on this split server, "
                                                     f"its limit (split.max_sessions_per_identity); close one or wait "
                                                     f"{self.caps.idle_timeout:g} s for an idle one to expire", frame)
            # a plaintext connection is a throwaway identity: tracking its ids would only grow this table
            known = self._client_ids.setdefault(peer.identity, set()) if peer.authenticated else set()
            if frame.client_id not in known and len(known) >= self.caps.max_clients_per_identity:
                self._warn("clients", peer, "split open of %s refused: its identity opened %d client ids",
                           frame.client_id, len(known))
                return None, _error(ErrorCode.LIMIT, f"{peer.identity!r} has opened {len(known)} distinct client "
                                                     f"ids on this split server, its limit "
                                                     f"(split.max_clients_per_identity)", frame)
            known.add(frame.client_id)
            session = self.sessions[key] = _Session(token=token, owner=peer.identity)
            return session, b""

    def _reply(self, frame: Frame, tensors: dict | None = None) -> bytes:
        return encode(Kind.REPLY, frame.client_id, frame.step, tensors, wire_dtype=frame.wire_dtype, code=frame.kind)

    def _open(self, key: Key, frame: Frame, session: _Session, fingerprint: str, peer: Peer) -> bytes:
        if frame.code == REJOIN and session.open and session.fingerprint == fingerprint:
            session.stream = peer  # a reconnect to this same process: the session and its state live on
            return self._reply(frame)
        try:
            with self._body():
                self.body.open(self.body_id(key), fingerprint)
        except Exception:
            if not session.open and session.last is None:  # nothing to keep: it does not take a session slot
                self._forget(key, session)
            raise
        if frame.code != REJOIN:  # a new session: forget what an earlier one left
            session.pending.clear()
            session.last = None
        session.open, session.fingerprint, session.stream = True, fingerprint, peer
        return self._reply(frame)

    def _handle(self, key: Key, frame: Frame, session: _Session, data: bytes, fingerprint: str, peer: Peer) -> bytes:
        cid, step, kind = frame.client_id, frame.step, frame.kind
        if kind == Kind.OPEN:
            return self._open(key, frame, session, fingerprint, peer)
        if kind == Kind.CLOSE:
            self._drop(key, session)
            self._forget(key, session)
            if self.store:
                self.save()
            return self._reply(frame)
        if not session.open:
            return _error(ErrorCode.NOT_OPEN, f"client {cid!r} has no open session on this server "
                                              f"(did it restart?); open it again", frame)
        digest = _digest(data)
        if session.last is not None and session.last[:3] == (kind, step, digest):
            log.info("answered a repeated %s of %s step %d from the reply cache", kind.name, cid, step)
            return session.last[3]
        if kind == Kind.FORWARD:
            with self._body():
                out = self.body.forward(self.body_id(key), step, frame.tensors)
            reply = self._reply(frame, out)
            session.pending[step] = None
            while len(session.pending) > _PENDING:
                session.pending.popitem(last=False)
            session.last = (kind, step, digest, reply)
            return reply
        if step not in session.pending:
            return _error(ErrorCode.STATE_LOST, f"no forward state for client {cid!r} step {step} "
                                                f"(server restarted or stream ended); replay the forward", frame)
        with self._body():
            out = self.body.backward(self.body_id(key), step, frame.tensors)
            reply = self._reply(frame, out)
            session.pending.pop(step, None)
            session.last = (kind, step, digest, reply)
            with self._lock:
                self.steps += 1
                due = self.store is not None and self.save_every > 0 and self.steps % self.save_every == 0
            if due:
                self.save()
        return reply

    def _drop(self, key: Key, session: _Session) -> None:
        """Close the body session (its forward graphs are freed); the caller holds ``session.lock``."""
        if session.open:
            session.open = False
            with self._body():
                self.body.close(self.body_id(key))
        session.pending.clear()
        if session.last is not None and session.last[0] == Kind.FORWARD:  # its state is gone: no cached answer
            session.last = None

    def _forget(self, key: Key, session: _Session) -> None:
        session.gone = True
        with self._lock:
            if self.sessions.get(key) is session:
                del self.sessions[key]

    def stream_ended(self, peer: Peer) -> None:
        """Free the forward state of the sessions last (re)opened on ``peer``'s stream; they stay rejoinable."""
        with self._lock:
            mine = [(k, s) for k, s in self.sessions.items() if s.stream is peer]
        freed = []
        for key, session in mine:
            with session.lock:
                if session.stream is peer and not session.gone:
                    session.stream = None
                    self._drop(key, session)
                    freed.append(self.body_id(key))
        if freed:
            log.info("the split stream of %s ended: freed the forward state of %s (rejoinable)",
                     peer.identity or "a plaintext peer", ", ".join(freed))
        if mine:
            release_freed_memory()

    def expire(self) -> int:
        """Close and forget the sessions idle for ``caps.idle_timeout`` seconds (not one in a call); how many."""
        now = time.monotonic()
        with self._lock:
            idle = [(k, s) for k, s in self.sessions.items() if now - s.seen >= self.caps.idle_timeout]
        expired = 0
        for key, session in idle:
            if not session.lock.acquire(blocking=False):
                continue  # a call is running: not idle
            try:
                if now - session.seen >= self.caps.idle_timeout and not session.gone:
                    self._drop(key, session)
                    self._forget(key, session)
                    expired += 1
                    log.info("closed the idle split session of %s", self.body_id(key))
            finally:
                session.lock.release()
        if expired:
            release_freed_memory()
        return expired

    def save(self) -> None:
        """Save the body and the last backward replies (no-op without a state dir)."""
        if self.store is None:
            return
        with self.body_lock, self._lock:
            replies = {key: (s.token, s.last[2], s.last[3]) for key, s in self.sessions.items()
                       if s.last and s.last[0] == Kind.BACKWARD}
            try:
                self.store.save(cast(Persistent, self.body), replies)
            except Exception:  # keep serving: the step itself succeeded, only its persistence failed
                log.exception("could not save the split server state into %s", self.store.root)
                return
        log.debug("saved split server state after %d steps", self.steps)
