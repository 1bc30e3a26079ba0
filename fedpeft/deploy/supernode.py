"""``flower-supernode`` with a shorter poll interval (``fedpeft node --poll-interval``).

Flower 1.41's SuperNode asks the SuperLink for a message, and when there is none sleeps a fixed 3 s before it
asks again; after handing a message to its ClientApp it checks for the reply every 0.5 s. Neither is an
option, so a round on warm nodes waits on average 1.5 s for nothing. This entry point runs Flower's own
``flower-supernode`` (same arguments, same process, same exit codes and signals) with the ``time`` module of
its main loop (``flwr.supernode.start_client_internal``) replaced by one whose ``sleep`` lasts at most
``--poll-interval`` seconds. Every other use of ``time`` there passes through. Each idle node then asks the
SuperLink 1 / interval times a second instead of once every 3 s.

Usage: python -m fedpeft.deploy.supernode --poll-interval 0.2 [flower-supernode arguments]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)
FLOWER_IDLE_SLEEP = 3.0  # flwr 1.41: the SuperNode's sleep after an empty pull


class ShortSleeps:
    """Stands for the ``time`` module: ``sleep(s)`` sleeps ``min(s, interval)``; the rest is ``time``'s."""

    def __init__(self, interval: float) -> None:
        self.interval = interval

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.interval))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_polling(interval: float) -> bool:
    """Make this process's SuperNode loop sleep at most ``interval`` s; False (nothing changed) if this Flower
    does not have the loop this was written for."""
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time:
        log.warning("this Flower's SuperNode loop is not the one fedpeft knows: keeping its own poll interval")
        return False
    loop.time = ShortSleeps(interval)  # type: ignore[assignment]
    return True


def main(argv: list[str] | None = None) -> None:
    """Parse ``--poll-interval``, then run ``flower-supernode`` with the remaining arguments."""
    p = argparse.ArgumentParser(add_help=False)  # --help is flower-supernode's
    p.add_argument("--poll-interval", type=float, default=FLOWER_IDLE_SLEEP)
    args, rest = p.parse_known_args(argv)
    if args.poll_interval <= 0:
        p.error("--poll-interval must be > 0")
    if args.poll_interval < FLOWER_IDLE_SLEEP:
        shorten_polling(args.poll_interval)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
