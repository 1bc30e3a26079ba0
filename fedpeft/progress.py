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

Under the Ray engine the clients are actors in other processes, several training at once. There the ServerApp
(:class:`fedpeft.server.announcing.AnnouncingGrid`) and each ClientApp (:func:`step_writer`) append one JSON line
per event to ``RUN/progress.jsonl`` (the run config's ``progress-file``); the driver tails it
(:func:`following_events`) into a :class:`ParallelProgress`, whose line counts the round's steps over all its
clients::

    round 2/3 · 1/4 clients done · 2 training · steps 23/60 · ETA round 0:41 · run 1:52
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


class _Display:
    """What both kinds of progress share: where lines go and how often, the run's length, the ETA's wording."""

    live_interval = 0.25  # seconds between rewrites of a live line

    def __init__(self, rounds: int, emit: Callable[[str], None], live: bool, every: float,
                 clock: Callable[[], float]) -> None:
        self.rounds, self.emit, self.live, self.every, self.clock = rounds, emit, live, every, clock
        self.last_emit = clock()

    def eta(self) -> tuple[float, float] | None:
        """Seconds left in this round's training and in the run (None: not known yet)."""
        raise NotImplementedError

    def line(self) -> str:
        """The current position as one line."""
        raise NotImplementedError

    def _with_eta(self, parts: list[str]) -> str:
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA round {clock_text(eta[0])} · run {clock_text(eta[1])}")
        return " · ".join(parts)

    def _step_due(self, now: float, done: int, total: int) -> bool:
        """A line is due after a client's last step, else once the interval has passed (never at step 0)."""
        return 0 < done and (done == total or now - self.last_emit >= (self.live_interval if self.live else self.every))

    def _emit(self, now: float) -> None:
        self.last_emit = now
        self.emit(self.line())


class StepProgress(_Display):
    """Tracks the in-process engine's position and emits one-line progress reports through ``emit``."""

    def __init__(self, rounds: int, emit: Callable[[str], None], live: bool, every: float = 15.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(rounds, emit, live, every, clock)
        self.pos = _Position()
        self.client_seconds = 0.0  # from the current client's start to its latest step
        self.step_seconds = 0.0  # the same, summed over the finished clients
        self.steps_done = 0
        self.round_started: dict[int, float] = {}
        self.last_round_seconds: float | None = None

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
            self.pos.started = self.last_emit = now  # and plain lines come `every` seconds into the steps
        if self._step_due(now, done, total):
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
        return self._with_eta(parts)


def console_progress(console: Console, status: Status, rounds: int) -> StepProgress:
    """Step progress for ``fedpeft simulate``: in the spinner's line on a terminal, else plain lines."""
    from rich.text import Text

    if console.is_terminal:
        return StepProgress(rounds, lambda line: status.update(Text(line)), live=True)
    return StepProgress(rounds, lambda line: console.print(line, markup=False, highlight=False), live=False)


PROGRESS_FILE = "progress.jsonl"  # in the run directory, while a Ray run shows step progress
PROGRESS_KEY = "progress-file"  # the run config key naming it (absent: no events written)


def append_event(path: str | Path, event: Mapping[str, Any]) -> None:
    """Append ``event`` as one JSON line in a single ``O_APPEND`` write, so lines from concurrent processes
    (Ray actors, the ServerApp) never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(dict(event)) + "\n").encode())
    finally:
        os.close(fd)


def step_writer(run_config: Mapping[str, Any], rnd: int, node: int,
                every: float = 0.5) -> Callable[[int, int], None] | None:
    """``train_local``'s step hook in a process of its own: appends ``{round, node, step, steps, t}`` to the run
    config's progress file for the first and last step and at most every ``every`` seconds in between
    (None when the run asks for no progress)."""
    path = run_config.get(PROGRESS_KEY)
    if not path:
        return None
    last = [-math.inf]

    def on_step(done: int, total: int) -> None:
        now = time.monotonic()
        if done in (0, total) or now - last[0] >= every:
            last[0] = now
            append_event(str(path), {"round": rnd, "node": node, "step": done, "steps": total, "t": time.time()})

    return on_step


@dataclass
class _Round:
    """What the events told about one round: its clients' latest steps and when training started."""

    number: int
    kind: str
    count: int
    started: float
    steps: int = 0  # local steps per client (the largest total a client announced)
    done: dict[int, int] = field(default_factory=dict)  # node -> latest finished step
    first_step: float | None = None
    last_step: float | None = None


class ParallelProgress(_Display):
    """Progress of rounds whose clients train at once (Ray actors), from :func:`step_writer` and
    ``AnnouncingGrid`` events; emits one line like :class:`StepProgress`.

    The rate is the steps finished per second of training wall time, over the clients of the rounds so far
    (from a round's first step event to its latest); the ETA is the round's steps left at that rate plus the last
    full round's wall time for each round after it.
    """

    def __init__(self, rounds: int, emit: Callable[[str], None], live: bool, every: float = 15.0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(rounds, emit, live, every, clock)
        self.current: _Round | None = None
        self.past_steps, self.past_seconds = 0, 0.0  # finished training rounds
        self.last_round_seconds: float | None = None

    @classmethod
    def like(cls, shown: StepProgress) -> ParallelProgress:
        """The same display (emit, live, rounds) as ``shown``, for parallel clients."""
        return cls(shown.rounds, shown.emit, shown.live, shown.every)

    def feed(self, event: Mapping[str, Any]) -> None:
        """Take one event: a round's messages announced (``count``) or a client's step."""
        r = self.current
        if "count" in event:
            if r is None or (event["round"], event["kind"]) != (r.number, r.kind):  # (SecAgg+: several stages)
                self._begin(event)
        elif r is not None and r.kind == "train" and event.get("round") == r.number:
            self._step(r, event)

    def _begin(self, event: Mapping[str, Any]) -> None:
        old, t = self.current, float(event["t"])
        if old is not None and old.kind == "train" and old.first_step is not None and old.last_step is not None:
            self.past_steps += sum(old.done.values())
            self.past_seconds += old.last_step - old.first_step
        if old is not None and event["round"] != old.number:
            self.last_round_seconds = t - old.started
        if old is not None and event["round"] == old.number:  # e.g. evaluation after training: same round
            t = old.started
        self.current = _Round(int(event["round"]), str(event["kind"]), int(event["count"]), t)
        if self.live:
            self._emit(self.clock())

    def _step(self, r: _Round, event: Mapping[str, Any]) -> None:
        t, done, total = float(event["t"]), int(event["step"]), int(event["steps"])
        r.steps = max(r.steps, total)
        r.done[int(event["node"])] = done
        r.first_step = t if r.first_step is None else min(r.first_step, t)
        r.last_step = t if r.last_step is None else max(r.last_step, t)
        now = self.clock()
        if self._step_due(now, done, total):
            self._emit(now)

    def rate(self) -> float | None:
        """Wall seconds per local step of a client with the clients training at once (None before any)."""
        r = self.current
        steps, seconds = self.past_steps, self.past_seconds
        if r is not None and r.first_step is not None and r.last_step is not None:
            steps, seconds = steps + sum(r.done.values()), seconds + r.last_step - r.first_step
        return seconds / steps if steps and seconds > 0 else None

    def eta(self) -> tuple[float, float] | None:
        """Seconds left in this round's training and in the run (None before a rate is known)."""
        rate, r = self.rate(), self.current
        if rate is None or r is None or r.kind != "train" or not r.steps:
            return None
        round_left = (r.count * r.steps - sum(r.done.values())) * rate
        per_round = self.last_round_seconds or r.count * r.steps * rate
        return round_left, round_left + max(0, self.rounds - r.number) * per_round

    def line(self) -> str:
        """The current position as one line."""
        r = self.current
        if r is None:
            return "starting the clients ..."
        parts = [f"round {r.number}/{self.rounds}"]
        if r.kind != "train":
            return " · ".join([*parts, f"evaluating on {r.count} client(s)"])
        finished = sum(1 for d in r.done.values() if r.steps and d >= r.steps)
        parts += [f"{finished}/{r.count} clients done", f"{len(r.done) - finished} training"]
        if r.steps:
            parts.append(f"steps {sum(r.done.values())}/{r.count * r.steps}")
        return self._with_eta(parts)


@contextmanager
def polling(check: Callable[[], None], interval: float) -> Iterator[None]:
    """Call ``check`` every ``interval`` seconds in a thread while the block runs, and once more after it (so
    what was written at the end is not missed). An exception in ``check`` stops the calls and is raised when the
    block ends."""
    stop, failed = threading.Event(), []

    def loop() -> None:
        while True:
            done = stop.is_set()
            try:
                check()
            except Exception as e:  # noqa: BLE001 - handed to the caller's thread below
                failed.append(e)
                return
            if done:
                return
            stop.wait(interval)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if failed:
        raise failed[0]


@contextmanager
def following_events(path: Path, progress: ParallelProgress, poll: float = 0.2) -> Iterator[None]:
    """Feed ``progress`` each event appended to ``path`` while the block runs (the file is removed afterwards:
    the events mean nothing once the run is over)."""
    offset, partial = 0, b""

    def tail() -> None:
        nonlocal offset, partial
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            *lines, partial = (partial + chunk).split(b"\n")
            for line in lines:
                progress.feed(json.loads(line))

    path.unlink(missing_ok=True)  # a resumed run's old events
    try:
        with polling(tail, poll):
            yield
    finally:
        path.unlink(missing_ok=True)
