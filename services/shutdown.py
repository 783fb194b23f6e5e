"""Stop requests that arrive before a service's event loop runs.

A service spends its first second importing modules, reading configuration and connecting;
Python's default SIGTERM action would kill it there with status -15. ``install()`` runs first
thing in the process and remembers SIGTERM and SIGINT; the service asks ``requested()`` once
its own handlers are in place, and stops cleanly (exit 0) if a signal came in between.
"""

from __future__ import annotations

import signal
from types import FrameType

__all__ = ["SIGNALS", "install", "requested"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []


def _remember(signum: int, _frame: FrameType | None) -> None:
    _received.append(signum)


def install() -> None:
    """Remember stop signals from now on, until the service installs its own handlers."""
    for sig in SIGNALS:
        signal.signal(sig, _remember)


def requested() -> bool:
    """Whether a stop signal arrived before the service's own handlers took over."""
    return bool(_received)
