"""What a task leaves behind on its host when its executor dies, and how the next executor
ends it before the task runs again.

An executor killed with SIGKILL takes its subreaper role with it: the task's child dies too
(parent-death signal), but the programs it started are re-parented to PID 1 and run on. The
attempt is redelivered, perhaps to another executor of the same host, which must not start a
second copy beside them. So:

- while a task runs, its executor keeps a *footprint* of it under ``<runtime dir>/tasks``
  (``<data dir>/run/tasks``): one small JSON file per task with the child's session and start
  time, the task's user, the executor's own pid and start time, and the boot;
- before an executor starts an attempt that was delivered before, or whose task left a
  footprint here, it kills every process of that task on this host that is not its own: the
  members of the recorded session, and every process whose environment carries the task's
  ``PROVISIONING_TASK_ID`` (the identity survives ``setsid``; the session survives a scrubbed
  environment);
- when an executor starts, it ends the sessions of every footprint whose executor is dead, so
  a crash's leftovers end even when the redelivery went to another host. (By session only: the
  task may meanwhile run again under a live executor of this host, with the same identity.)

Leftovers on another host cannot be reached from this one: there, the service manager's
control group (systemd's ``KillMode``) or the container ends them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path

import msgspec

from .processes import GONE, environ_has, stat

__all__ = ["Footprint", "Footprints", "boot_id", "leftovers"]

log = logging.getLogger(__name__)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class Footprint(msgspec.Struct, frozen=True):
    """One running task, as seen from its host."""

    key: str  # <workflow>.<task>, the PROVISIONING_TASK_ID of its processes
    session: int  # the child's pid, which leads the task's session
    started: int  # the child's start time, clock ticks after boot
    uid: int  # the user its processes run as
    executor_pid: int
    executor_started: int
    boot: str


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(1000):
        found = stat(pid)
        if found is None or found[1] in (0, 1):
            return False
        if found[1] == ancestor:
            return True
        pid = found[1]
    return False


def leftovers(key: str | None, footprint: Footprint | None, me: int) -> list[int]:
    """Live processes on this host that belong to the task ``key`` (by identity) or to the
    session of ``footprint``, and do not descend from ``me``. A scan of every ``/proc``
    entry: run it only when a task may have been left behind."""
    identity = f"PROVISIONING_TASK_ID={key}".encode() if key else None
    if footprint is not None and footprint.boot != boot_id():
        footprint = None  # another boot: its pids mean nothing now
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found  # no /proc: nothing can be told
    for entry in entries:
        if not entry.isdigit() or (pid := int(entry)) == me:
            continue
        state = stat(pid)
        if state is None or state[0] in GONE:
            continue
        ours = (
            footprint is not None
            and state[2] == footprint.session
            and state[3] >= footprint.started
            and _uid(pid) == footprint.uid
        ) or (identity is not None and environ_has(pid, identity))
        if ours and not _descends_from(pid, me):
            found.append(pid)
    return found


class Footprints:
    """The footprints of the tasks running on this host, one file each in ``directory``
    (shared by the executors of the host: they share the data directory)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.boot = boot_id()
        self.pid = os.getpid()
        found = stat(self.pid)
        self.started = found[3] if found else 0
        self._made = False

    def _path(self, key: str) -> Path:
        name = key if _SAFE_NAME.match(key) else hashlib.sha256(key.encode()).hexdigest()
        return self.directory / f"{name}.json"

    def put(self, key: str, session: int, started: int, uid: int) -> Footprint | None:
        """Record a task that now runs; None if it could not be recorded."""
        footprint = Footprint(key, session, started, uid, self.pid, self.started, self.boot)
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{self.pid}")
        try:
            if not self._made:
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._made = True
            tmp.write_bytes(msgspec.json.encode(footprint))
            tmp.replace(path)
        except OSError as exc:  # the task still runs; only a crash's clean-up is weaker
            log.warning("cannot record the footprint of %s: %s", key, exc)
            return None
        return footprint

    def get(self, key: str) -> Footprint | None:
        return self._read(self._path(key))

    def _read(self, path: Path) -> Footprint | None:
        try:
            return msgspec.json.decode(path.read_bytes(), type=Footprint)
        except (OSError, msgspec.DecodeError):
            return None

    def drop(self, footprint: Footprint) -> None:
        """Remove ``footprint`` unless another run of its task replaced it since."""
        path = self._path(footprint.key)
        if self._read(path) == footprint:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def orphaned(self) -> list[Footprint]:
        """Footprints whose executor is gone (those of another boot are removed)."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for path in self.directory.glob("*.json"):
                footprint = self._read(path)
                if footprint is None or footprint.boot != self.boot:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    continue
                owner = stat(footprint.executor_pid)
                if owner is None or owner[0] in GONE or owner[3] != footprint.executor_started:
                    found.append(footprint)
        return found
