"""Step progress inside a round: which client of the round trains, its local step, and an ETA.

A round of the embedded default takes about a minute on a small CPU, most of it in the clients' local steps,
so ``fedpeft simulate`` shows where it is between the per-round lines::

    round 2/3 · client 3/4 · step 9/15 · ETA round 0:41 · run 1:52

The in-process engine announces each message it delivers (:meth:`StepProgress.begin`) and passes
:meth:`StepProgress.step` to ``train_local`` as its ``on_step`` hook. ``live`` output (a terminal) is one
line rewritten at most :attr:`StepProgress.live_interval` times a second; otherwise a plain line is emitted
when a client finishes its steps and at most every ``every`` seconds in between, so logs stay short.
Nothing here touches a random generator or the model, so runs stay bit-for-bit reproducible.

The ETA is the measured seconds per local step times the local steps left in the round (every client of
the round is assumed to take as many steps as the current one); for the rounds after it, the wall time of
the last full round, so evaluation and aggregation count once one round has finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status


def clock_text(seconds: float) -> str:
    """``h:mm:ss`` or ``m:ss``."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class _Position:
    """The message being worked on: round, kind ("train" / "evaluate"), index of count, steps."""

    round: int = 0
    kind: str = "train"
    index: int = 0
    count: int = 0
    step: int = 0
    steps: int = 0
    started: float = 0.0


class StepProgress:
    """Tracks the in-process engine's position and emits one-line progress reports through ``emit``."""

    live_interval = 0.25  # seconds between rewrites of a live line

    def __init__(self, rounds: int, emit: Callable[[str], None], live: bool, every: float = 15.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rounds, self.emit, self.live, self.every, self.clock = rounds, emit, live, every, clock
        self.pos = _Position()
        self.client_seconds = 0.0  # from the current client's start to its latest step
        self.step_seconds = 0.0  # the same, summed over the finished clients
        self.steps_done = 0
        self.round_started: dict[int, float] = {}
        self.last_round_seconds: float | None = None
        self.last_emit = clock()

    def begin(self, rnd: int, kind: str, index: int, count: int) -> None:
        """Message ``index`` (0-based) of ``count`` of ``kind`` in round ``rnd`` is about to be delivered."""
        now = self.clock()
        if self.pos.step:  # the previous client's measured steps
            self.step_seconds += self.client_seconds
            self.steps_done += self.pos.step
        if rnd not in self.round_started:
            if rnd - 1 in self.round_started:
                self.last_round_seconds = now - self.round_started[rnd - 1]
            self.round_started[rnd] = now
        self.pos, self.client_seconds = _Position(rnd, kind, index, count, 0, 0, now), 0.0
        if self.live:
            self._emit(now)

    def step(self, done: int, total: int) -> None:
        """``train_local``'s hook: ``done`` of ``total`` local steps finished."""
        now = self.clock()
        self.pos.step, self.pos.steps = done, total
        if done:
            self.client_seconds = now - self.pos.started
        else:  # steps are timed from here: the first client's set-up (tokenizing, ...) would skew the rate
            self.pos.started = now
        if 0 < done == total or now - self.last_emit >= (self.live_interval if self.live else self.every):
            self._emit(now)

    def rate(self) -> float | None:
        """Measured seconds per local step so far (None before the first step)."""
        steps = self.steps_done + self.pos.step
        return (self.step_seconds + self.client_seconds) / steps if steps else None

    def eta(self) -> tuple[float, float] | None:
        """Seconds left in this round's training and in the run, or None before any step was measured."""
        rate, p = self.rate(), self.pos
        if rate is None or p.kind != "train" or not p.steps:
            return None
        round_left = ((p.steps - p.step) + (p.count - p.index - 1) * p.steps) * rate
        per_round = self.last_round_seconds or p.count * p.steps * rate
        return round_left, round_left + max(0, self.rounds - p.round) * per_round

    def line(self) -> str:
        """The current position as one line."""
        p = self.pos
        parts = [f"round {p.round}/{self.rounds}"]
        if p.count:
            parts.append(f"{'client' if p.kind == 'train' else 'evaluating client'} {p.index + 1}/{p.count}")
        if p.kind == "train" and p.steps:
            parts.append(f"step {p.step}/{p.steps}")
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA round {clock_text(eta[0])} · run {clock_text(eta[1])}")
        return " · ".join(parts)

    def _emit(self, now: float) -> None:
        self.last_emit = now
        self.emit(self.line())


def console_progress(console: Console, status: Status, rounds: int) -> StepProgress:
    """Step progress for ``fedpeft simulate``: in the spinner's line on a terminal, else plain lines."""
    from rich.text import Text

    if console.is_terminal:
        return StepProgress(rounds, lambda line: status.update(Text(line)), live=True)
    return StepProgress(rounds, lambda line: console.print(line, markup=False, highlight=False), live=False)
