"""Every process of a task: finding, signalling and reaping them, from ``/proc``.

A task's child leads a session of its own, but its processes need not stay in it: Nushell
puts ``job spawn``-ed commands in process groups of their own, a program may ``setsid``, and a
process whose parent died is re-parented. Two ways to find them all:

- **As a child subreaper** (``PR_SET_CHILD_SUBREAPER``, which the executor becomes at start):
  a process orphaned anywhere under this one is re-parented to it, not to PID 1. Every process
  of a task is then a descendant of the task's child, or of an orphan this process adopted
  from it (an *adoptee*, told apart by its session or its ``PROVISIONING_TASK_ID``). Walking
  the ``/proc/<pid>/task/<tid>/children`` lists from this process is exact and costs a few
  reads; with no adoptee and the child gone there is nothing to look for.
- **Otherwise** (direct mode, or no ``/proc/.../children``): a scan of every ``/proc`` entry
  for the session's members and the child's descendants. A process that left the session and
  lost its parent escapes this one.

Reaping. Adoptees are this process's children, so their exit statuses are ours to collect,
but asyncio's child watcher (``ThreadedChildWatcher`` in Python 3.11, ``PidfdChildWatcher``
later) waits for each child it started by its pid: a ``waitpid(-1)`` here would steal those
statuses. :meth:`Family.reap` waits only for zombie children that are not task children it
knows of, by pid; a zombie leading its own session is left alone while a spawn is in flight
(a task child leads its session and is registered only once the spawn returns). One
:class:`Family` per process: it is the one that spawns this process's children.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable

__all__ = [
    "GONE",
    "Family",
    "TaskProcesses",
    "become_subreaper",
    "children",
    "is_subreaper",
    "kill_pids",
    "stat",
    "watch_children_by_pidfd",
]

log = logging.getLogger(__name__)
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
SWEEP_POLL_S = 0.05
GONE = ("Z", "X")


def _prctl(option: int, arg: object) -> int | None:
    """``prctl(option, arg)``'s result, or None where there is no such call (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, arg, 0, 0, 0))
    except (OSError, AttributeError):
        return None


def _children_lists() -> bool:
    """Whether this kernel has ``/proc/<pid>/task/<tid>/children`` (CONFIG_PROC_CHILDREN)."""
    return os.path.exists(f"/proc/self/task/{threading.get_native_id()}/children")


def become_subreaper() -> bool:
    """Make this process the reaper of every orphan among its descendants; False (and one
    log line) where the system cannot."""
    if _children_lists() and _prctl(PR_SET_CHILD_SUBREAPER, 1) == 0:
        return True
    log.warning(
        "cannot become a child subreaper (Linux with /proc/<pid>/task/<tid>/children needed): "
        "task processes are found by scanning /proc, and one that leaves its session and "
        "loses its parent can escape"
    )
    return False


def watch_children_by_pidfd() -> bool:
    """Have asyncio learn of its children's exits from pidfds (Linux 5.3+) rather than from a
    thread per child blocked in ``waitpid`` (Python 3.11's default; 3.12 does this itself).
    Measured with ``bench.runner_overhead --executor``: 2.74-2.77 ms of the executor's CPU per
    ``nu`` task before, 2.37-2.38 ms after. Both wait for their own children by pid only, so
    :meth:`Family.reap` keeps collecting the adopted orphans. Call before the event loop runs;
    False where the system has no pidfds (the default stays)."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
    return True


def is_subreaper() -> bool:
    flag = ctypes.c_int(0)
    return _prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag)) == 0 and flag.value == 1


def stat(pid: int | str) -> tuple[str, int, int, int] | None:
    """``(state, ppid, session, start time in clock ticks)`` of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()  # the command name may hold spaces and parens
    try:
        return fields[0].decode(), int(fields[1]), int(fields[3]), int(fields[19])
    except (IndexError, ValueError):
        return None


def children(pid: int) -> list[int]:
    """The children of ``pid``, whichever of its threads forked them ([] once it is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
    return found


def environ_has(pid: int, entry: bytes) -> bool:
    """Whether ``entry`` (``NAME=value``) is in the environment a process started with."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry in f.read().split(b"\0")
    except OSError:
        return False


class Family:
    """The children this process spawned for tasks, and the orphans it adopted as a
    subreaper. Touched only from the event loop's thread."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.adopts = is_subreaper() and _children_lists()
        self.spawning = 0  # spawns in flight: their children are not registered yet
        self.tasks: dict[int, TaskProcesses] = {}

    def adoptees(self) -> list[int]:
        """This process's children that are not task children (live or not)."""
        return [pid for pid in children(self.pid) if pid not in self.tasks]

    def reap(self) -> int:
        """Collect the exit status of every adopted zombie; return how many."""
        reaped = 0
        for pid in self.adoptees():
            found = stat(pid)
            if found is None or found[0] != "Z":
                continue
            if found[2] == pid and self.spawning:
                continue  # perhaps a task child whose spawn has not returned yet
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped += 1
        return reaped

    def strays(self) -> list[int]:
        """Live adoptees no running task claims (they left its session and dropped its
        identity): a finished task's. Killed when no task runs, and at shutdown. None while a
        spawn is in flight: its child is not registered yet."""
        if self.spawning:
            return []
        claimed = {p for task in self.tasks.values() for p in task.adopted()}
        return [
            pid
            for pid in self.adoptees()
            if pid not in claimed and (s := stat(pid)) is not None and s[0] not in GONE
        ]


class TaskProcesses:
    """Every process of one task: the child's session and descendants, and, under a
    subreaper, the orphans adopted from it (see the module's docstring)."""

    def __init__(self, pid: int, identity: str, family: Family | None = None) -> None:
        self.pid = pid
        self.identity = f"PROVISIONING_TASK_ID={identity}".encode()
        self.family = family if family is not None and family.adopts else None
        found = stat(pid)
        self.start_time = found[3] if found else None
        self.procfs = os.path.isdir("/proc/self")

    def _leader_alive(self) -> bool:
        found = stat(self.pid)
        return found is not None and found[3] == self.start_time and found[0] not in GONE

    def adopted(self) -> list[int]:
        """Adoptees of this task: in its session, or carrying its ``PROVISIONING_TASK_ID``."""
        if self.family is None:
            return []
        mine = []
        for pid in self.family.adoptees():
            found = stat(pid)
            if found is None or found[0] in GONE:
                continue
            if found[2] == self.pid or environ_has(pid, self.identity):
                mine.append(pid)
        return mine

    def members(self) -> list[int]:
        """Live (not zombie) processes of the task; [] when ``/proc`` cannot tell."""
        if not self.procfs:
            return []
        if self.family is None:
            return self._scan()
        roots = self.adopted()
        if self._leader_alive():
            roots.append(self.pid)
        found: set[int] = set()
        while roots:
            pid = roots.pop()
            if pid in found or (s := stat(pid)) is None or s[0] in GONE:
                continue
            found.add(pid)
            roots.extend(children(pid))
        return sorted(found)

    def _scan(self) -> list[int]:
        """Every ``/proc`` entry: the session's members and the child's descendants."""
        leader = stat(self.pid)
        if leader is not None and leader[3] != self.start_time:
            return []  # the pid is someone else's now: our session is empty (ids stay in use)
        kids: dict[int, list[int]] = {}
        found: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or (found_stat := stat(entry)) is None:
                continue
            state, ppid, session, _ = found_stat
            if state in GONE:
                continue
            pid = int(entry)
            kids.setdefault(ppid, []).append(pid)
            if session == self.pid:
                found.add(pid)
        queue = [self.pid, *found]
        while queue:
            for child in kids.get(queue.pop(), ()):
                if child not in found:
                    found.add(child)
                    queue.append(child)
        if leader is None or leader[0] in GONE:
            found.discard(self.pid)
        return sorted(found)

    async def _members(self) -> list[int]:
        if self.family is not None:  # a few reads: no thread needed
            return self.members()
        return await asyncio.to_thread(self.members)

    async def signal(self, sig: signal.Signals) -> int:
        """Send ``sig`` to every process of the task; return how many there were."""
        members = await self._members()
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if not self.procfs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
        return len(members)

    async def wait_empty(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while await self._members():
            if self.family is not None:
                self.family.reap()
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(SWEEP_POLL_S)
        return True

    async def kill_all(self) -> int:
        """SIGKILL until nothing is left (a process may fork while we sweep); return the count."""
        if not self.procfs:  # nothing can be counted: the group is all there is
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            return 0
        family = self.family
        then = family.reap if family is not None else None
        return await kill_pids(self.members, threaded=family is None, then=then)


async def kill_pids(
    pids_of: Callable[[], list[int]],
    *,
    threaded: bool = True,
    then: Callable[[], object] | None = None,
    rounds: int = 20,
) -> int:
    """SIGKILL what ``pids_of()`` returns until it returns nothing (a process may fork while
    we sweep); ``then()`` after each round (reaping). ``threaded``: ``pids_of`` scans ``/proc``
    and runs in a thread. Returns how many signals were sent."""
    killed = 0
    for _ in range(rounds):
        pids = await asyncio.to_thread(pids_of) if threaded else pids_of()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed += len(pids)
        await asyncio.sleep(SWEEP_POLL_S)
        if then is not None:
            then()
    return killed
