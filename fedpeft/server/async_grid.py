"""FedBuff's messages in flight on a real Flower Grid: a deployment's SuperLink (or the in-process engine without
the virtual clock).

:class:`LiveFlights` offers the two calls the buffered server needs, as :class:`~fedpeft.simulation.clocked.
ClockedGrid` does in simulated time: :meth:`~LiveFlights.dispatch` pushes training messages with
``grid.push_messages`` and returns at once; :meth:`~LiveFlights.next_reply` hands over the replies one at a time
in the order they came back, pulling them with ``grid.pull_messages`` every ``federation.poll_interval`` seconds
while none is waiting. Nothing is waited for as a cohort: the server keeps ``federation.concurrency`` messages in
flight and refills a node as soon as its reply is in.

A message unanswered after ``federation.round_timeout`` seconds (0: no limit) is given up: it comes back as a
failed reply ("no reply within ..."), so its node is free again; a reply that still arrives later is never
pulled. Every message is one line of ``RUN/clients.jsonl``: ``round`` (the update it was sent in), ``node``,
``start`` and ``finish`` (wall seconds since the server started), ``status`` (ok, failed, late).

Replies in flight are not checkpointed: a resumed deployment is a new Flower run whose nodes start afresh, so the
resumed server forgets them (the in-process engine without the clock does the same; the clock resumes exactly).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Error, Message
from flwr.serverapp import Grid

from fedpeft import protocol

log = logging.getLogger(__name__)

@dataclass
class Flight:
    """A pushed message and when it left (``time.monotonic()``)."""

    message: Message
    sent: float


class LiveFlights:
    """Training messages in flight on ``grid``; replies queue in the order they are pulled."""

    def __init__(self, grid: Grid, timeout: float | None, log_path: Path, poll_seconds: float) -> None:
        self.grid, self.timeout, self.log_path, self.poll_seconds = grid, timeout, log_path, poll_seconds
        self.started = time.monotonic()
        self.flights: dict[str, Flight] = {}  # message id -> flight, in the order pushed
        self.arrived: deque[Message] = deque()

    def dispatch(self, messages: list[Message]) -> None:
        """Push ``messages`` now; a message the SuperLink refuses comes back at once as a failed reply."""
        ids = list(self.grid.push_messages(messages))
        now = time.monotonic()
        for msg, mid in zip(messages, ids + [None] * (len(messages) - len(ids))):
            if mid:
                self.flights[mid] = Flight(msg, now)
            else:
                self._done(Flight(msg, now), Message(Error(code=0, reason="the SuperLink did not accept the "
                                                           "message"), reply_to=msg), "failed")

    def next_reply(self) -> Message | None:
        """The next reply to come back (waits for one); None when nothing is in flight."""
        while not self.arrived and self.flights:
            for reply in self.grid.pull_messages(list(self.flights)):
                flight = self.flights.pop(reply.metadata.reply_to_message_id, None)
                if flight is None:
                    log.warning("ignored a reply to a message that is not in flight (%s)",
                                reply.metadata.reply_to_message_id)
                    continue
                node = flight.message.metadata.dst_node_id
                if reply.metadata.src_node_id != node:  # an error the SuperLink wrote names itself as the sender
                    reply = Message(reply.error if reply.has_error() else Error(
                        code=0, reason=f"a reply from node {reply.metadata.src_node_id}"), reply_to=flight.message)
                self._done(flight, reply, "failed" if reply.has_error() else "ok")
            if not self.arrived:
                self._expire()
            if not self.arrived and self.flights:
                time.sleep(self.poll_seconds)
        return self.arrived.popleft() if self.arrived else None

    def arrives_now(self) -> bool:
        """Whether another reply is already waiting (taken together with the one just handed over)."""
        return bool(self.arrived)

    def _expire(self) -> None:
        """Give up the messages older than the timeout: each becomes a failed reply of its node."""
        if not self.timeout:
            return
        now = time.monotonic()
        for mid, flight in list(self.flights.items()):
            if now - flight.sent > self.timeout:
                del self.flights[mid]
                reason = f"no reply within federation.round_timeout = {self.timeout:g} s"
                self._done(flight, Message(Error(code=0, reason=reason), reply_to=flight.message), "late")

    def _done(self, flight: Flight, reply: Message, status: str) -> None:
        self.arrived.append(reply)
        msg = flight.message.metadata
        row = {"round": protocol.round_of(msg.group_id), "node": msg.dst_node_id,
               "kind": "train", "start": round(flight.sent - self.started, 3),
               "finish": round(time.monotonic() - self.started, 3), "status": status}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
