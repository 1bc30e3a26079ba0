"""Reply polling in a deployment (``federation.poll_interval``).

Flower 1.41's deployment Grid (the ServerApp's connection to the SuperLink) pushes a round's messages and then
pulls the replies every 3 s, a fixed interval: a round whose clients answer in 0.3 s still waits up to 3 s
for the server to notice. :class:`PollingGrid` does the same push and pull through Flower's own Grid, with
the interval from the configuration; each pull is one request to the SuperLink on the server's own machine.
The in-process engines call clients directly and are left as they are.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft.server.delegating import DelegatingGrid

FLOWER_POLL_INTERVAL = 3.0  # flwr 1.41: HttpGrid.send_and_receive sleeps this long between pulls


class PollingGrid(DelegatingGrid):
    """Delegates to a deployment's Grid; :meth:`send_and_receive` pulls replies every ``interval`` seconds."""

    def __init__(self, inner: Grid, interval: float) -> None:
        super().__init__(inner)
        self.interval = interval

    def __getattr__(self, name: str) -> Any:  # anything else the inner grid offers
        if name == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull until every reply is in or ``timeout`` seconds have passed (Flower's
        semantics: None waits for ever)."""
        waiting = set(self.inner.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (end is None or time.monotonic() < end):
            got = list(self.inner.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if waiting:
                time.sleep(self.interval if end is None else max(0.0, min(self.interval, end - time.monotonic())))
        return replies


def with_poll_interval(grid: Grid, interval: float) -> Grid:
    """``grid`` polling every ``interval`` seconds where it is Flower's deployment Grid and the interval is
    shorter than Flower's own; any other grid (in-process, Flower's simulation) unchanged."""
    try:
        from flwr.superlink.grid.http_grid import HttpGrid
    except ImportError:  # a Flower without this class: keep its own polling
        return grid
    return PollingGrid(grid, interval) if isinstance(grid, HttpGrid) and interval < FLOWER_POLL_INTERVAL else grid
