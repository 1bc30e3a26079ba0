"""Announcing each batch of messages the ServerApp sends, for a step-progress display in another process.

Under the Ray engine the ServerApp runs inside Flower's simulation process; the driver that shows progress
learns from these events how many clients a round asks (``fedpeft.progress``: the clients add their steps).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft import protocol
from fedpeft.progress import PROGRESS_KEY, append_event
from fedpeft.server.delegating import DelegatingGrid


class AnnouncingGrid(DelegatingGrid):
    """Delegates to ``inner``; before a batch is sent, appends ``{round, kind, count, t}`` to ``path``."""

    def __init__(self, inner: Grid, path: str) -> None:
        super().__init__(inner)
        self.path = path

    def _announce(self, messages: list[Message]) -> None:
        if messages:
            meta = messages[0].metadata
            append_event(self.path, {"round": protocol.round_of(meta.group_id), "kind": meta.message_type,
                                     "count": len(messages), "t": time.time()})

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batch = list(messages)
        self._announce(batch)
        return self.inner.push_messages(batch)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        batch = list(messages)
        self._announce(batch)
        return self.inner.send_and_receive(batch, timeout=timeout)


def announcing(grid: Grid, run_config: Mapping[str, Any]) -> Grid:
    """``grid`` announcing its batches where the run config names a progress file, else ``grid`` itself."""
    path = run_config.get(PROGRESS_KEY)
    return AnnouncingGrid(grid, str(path)) if path else grid
