"""Concurrency keys across every active workflow: holders, waiters in order, rate windows.

Pure bookkeeping for the engine. A task *holds* its keys from its dispatch until its attempt
ends in any way (completed, failed, cancelled, timed out, retrying, max deliveries): holders
are exactly the tasks whose current attempt is out with an executor, so after a failover they
are rebuilt from the task checkpoints and no key can gain a second holder. A task that finds
a key full waits on it in priority, then arrival, order across all workflows. A key with a
rate admits a start only while fewer than ``count`` tasks started within the last ``window``
(counted when the scheduler learns of the start: never earlier than the start itself) plus
those dispatched and not yet started.
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Iterable

import msgspec

from shared.keys import Claim, Rate
from shared.messages import KeyState

__all__ = ["Blocked", "KeyBook", "KeyState", "Rank"]

TaskRef = tuple[str, str]  # (workflow id, task id)
# ties between tasks of one priority ready since the same moment: the workflow's submission time
# and id (from its record), then the order the engine met its tasks in (a workflow's tasks are met
# in their declared order when it is adopted again)
Rank = tuple[float, str, int]


class Blocked(msgspec.Struct, frozen=True):
    """Why a task cannot take its keys now: the key, and either its holders or its rate."""

    claim: Claim
    holders: tuple[TaskRef, ...] = ()
    rate_free_at: float | None = None  # a rate: when the oldest start leaves the window

    def describe(self) -> str:
        if self.rate_free_at is not None:
            return f"{self.claim.key}, rate {self.claim.rate}"
        held = ", ".join(f"{wf}.{task}" for wf, task in self.holders[:3])
        more = f" and {len(self.holders) - 3} more" if len(self.holders) > 3 else ""
        return f"{self.claim.key}, held by {held}{more}"


class KeyBook:
    def __init__(self) -> None:
        self.holders: dict[str, dict[TaskRef, Claim]] = defaultdict(dict)
        # per key: (-priority, since, rank, workflow, task) of the tasks waiting on it
        self.waiters: dict[str, list[tuple[int, float, Rank, str, str]]] = defaultdict(list)
        self.waiting_on: dict[TaskRef, str] = {}
        self.starts: dict[str, deque[float]] = defaultdict(deque)
        self.unstarted: dict[str, set[TaskRef]] = defaultdict(set)  # dispatched, not started
        self.rates: dict[str, Rate] = {}
        self.limits: dict[str, int | None] = {}
        self.changed: set[str] = set()  # keys whose state changed since the last take

    # -- admission ------------------------------------------------------------------------------

    def blocked(self, task: TaskRef, claims: Iterable[Claim], now: float) -> Blocked | None:
        """The first of ``claims`` with no room for ``task`` now, or None."""
        for claim in claims:
            holders = self.holders.get(claim.key, {})
            if claim.limit is not None and len(holders) >= claim.limit and task not in holders:
                return Blocked(claim, tuple(sorted(holders)))
            if claim.rate is not None:
                free_at = self._rate_free_at(claim, now)
                if free_at is not None:
                    self.rates[claim.key] = claim.rate
                    return Blocked(claim, rate_free_at=free_at)
        return None

    def _rate_free_at(self, claim: Claim, now: float) -> float | None:
        """When a start is next allowed under the claim's rate, or None if it is now."""
        assert claim.rate is not None
        starts = self.starts[claim.key]
        while starts and starts[0] <= now - claim.rate.window_s:
            starts.popleft()
            self.changed.add(claim.key)
        if len(starts) + len(self.unstarted[claim.key]) < claim.rate.count:
            return None
        if starts:
            return starts[0] + claim.rate.window_s
        return now + claim.rate.window_s  # all taken by dispatches not started yet

    def hold(self, task: TaskRef, claims: Iterable[Claim], *, started: bool) -> None:
        """``task`` holds ``claims`` (dispatched now, or found holding them in a checkpoint)."""
        for claim in claims:
            self.holders[claim.key][task] = claim
            self.limits[claim.key] = claim.limit
            if claim.rate is not None:
                self.rates[claim.key] = claim.rate
                if not started:
                    self.unstarted[claim.key].add(task)
            self.changed.add(claim.key)

    def started(self, task: TaskRef, claims: Iterable[Claim], now: float) -> None:
        for claim in claims:
            if claim.rate is not None and task in self.unstarted[claim.key]:
                self.unstarted[claim.key].discard(task)
                self.starts[claim.key].append(now)
                self.changed.add(claim.key)

    def release(self, task: TaskRef, claims: Iterable[Claim]) -> list[str]:
        """``task``'s attempt ended: its keys are free of it; returns the keys that gained room."""
        freed = []
        for claim in claims:
            holders = self.holders.get(claim.key)
            if holders is not None and holders.pop(task, None) is not None:
                freed.append(claim.key)
                self.changed.add(claim.key)
            self.unstarted.get(claim.key, set()).discard(task)
        return freed

    # -- waiting --------------------------------------------------------------------------------

    def wait(
        self,
        task: TaskRef,
        key: str,
        priority: int,
        since: float,
        rank: Rank,
        *,
        first: bool = False,
    ) -> None:
        """``task`` waits on ``key``, in order of priority, then ``since``, then ``rank`` (ties
        broken by what the checkpoints hold, so a restarted scheduler lines them up the same);
        ``first`` puts it ahead of every other waiter (a task that cancelled the holder to take
        the slot)."""
        self.unwait(task)
        order = float("-inf") if first else since
        heapq.heappush(self.waiters[key], (-priority, order, rank, *task))
        self.waiting_on[task] = key
        self.changed.add(key)

    def unwait(self, task: TaskRef) -> None:
        key = self.waiting_on.pop(task, None)
        if key is None:
            return
        queue = self.waiters[key]
        queue[:] = [w for w in queue if (w[3], w[4]) != task]
        heapq.heapify(queue)
        self.changed.add(key)

    def next_waiters(self, key: str, count: int) -> list[TaskRef]:
        """Take up to ``count`` waiters of ``key``, first in order first."""
        queue = self.waiters.get(key, [])
        out: list[TaskRef] = []
        while queue and len(out) < count:
            *_, wf, task = heapq.heappop(queue)
            self.waiting_on.pop((wf, task), None)
            out.append((wf, task))
        if out:
            self.changed.add(key)
        return out

    def rate_room(self, now: float) -> list[tuple[str, int]]:
        """Keys with a rate and waiters: how many more may start under the rate now."""
        out = []
        for key, queue in self.waiters.items():
            rate = self.rates.get(key)
            if not queue or rate is None:
                continue
            starts = self.starts[key]
            while starts and starts[0] <= now - rate.window_s:
                starts.popleft()
                self.changed.add(key)
            room = rate.count - len(starts) - len(self.unstarted[key])
            if room > 0:
                out.append((key, room))
        return out

    def room(self, key: str) -> int:
        """How many more holders the key takes now (a large number when it has no limit)."""
        limit = self.limits.get(key)
        return 1_000_000 if limit is None else max(0, limit - len(self.holders.get(key, {})))

    # -- what is shown and checkpointed ----------------------------------------------------------

    def state(self, key: str) -> KeyState:
        rate = self.rates.get(key)
        return KeyState(
            key=key,
            limit=self.limits.get(key),
            rate=str(rate) if rate else None,
            holders=[f"{wf}.{task}" for wf, task in sorted(self.holders.get(key, {}))],
            waiters=[f"{w[3]}.{w[4]}" for w in sorted(self.waiters.get(key, []))],
            starts=list(self.starts.get(key, ())),
        )

    def in_use(self, key: str) -> bool:
        return bool(self.holders.get(key) or self.waiters.get(key) or self.starts.get(key))

    def restore(self, state: KeyState) -> None:
        """The rate window of a key, from its checkpoint (holders and waiters come from tasks)."""
        if state.starts:
            self.starts[state.key] = deque(sorted(state.starts))

    def take_changed(self) -> list[str]:
        changed, self.changed = sorted(self.changed), set()
        return changed

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]
