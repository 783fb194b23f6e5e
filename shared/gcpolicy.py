"""The garbage collector's settings for the long-running services.

CPython's default thresholds (700, 10, 10) run a young collection every 700 container
allocations and a full one whenever the old generation has grown by a quarter. A service that
holds 10,000 task records in memory then stops for 50-115 ms at a time (measured on the
scheduler and executors during a 10,000-task fan-out; see docs/performance.md), and a task
submitted during such a pause waits for it. Two changes:

- everything alive once the service has started (modules, configuration, the registry) is
  moved out of the collector's reach with :func:`gc.freeze`: it is never garbage, and a full
  collection no longer walks it;
- collections run less often (young generation every ``YOUNG`` net allocations): the same
  garbage is found, in fewer and larger passes.

Memory is still bounded: reference counting frees everything that is not in a cycle at once,
and cycles (tracebacks, futures) are collected as before, only later.
"""

from __future__ import annotations

import gc
import logging

__all__ = ["OLDER", "YOUNG", "settle_heap"]

log = logging.getLogger(__name__)

YOUNG = 20_000  # net container allocations between young collections (CPython: 700)
OLDER = 20  # young collections per middle one, and middle per full one (CPython: 10)


def settle_heap() -> None:
    """Call once, after start-up and before the service's loop: collect, freeze what is alive
    now, and make collections less frequent."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, OLDER, OLDER)
    log.debug("gc: %d objects frozen; thresholds %s", gc.get_freeze_count(), gc.get_threshold())
