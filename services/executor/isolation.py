"""What an executor sets up at start so that its tasks cannot reach its secrets or the bus's
files (see docs/reliability.md, "Isolation").

- **The task user** (``[executor] task_user``): an executor running as root runs tasks as an
  unprivileged user, ``provisioning-task`` unless configured (created with ``useradd`` when
  missing); one running as another user runs them as itself (it cannot switch). A task of
  another user cannot read the executor's ``/proc/<pid>/environ`` nor its memory.
- **The data directory**: tasks may pass through it but not list it; its entries (the
  embedded NATS store, logs, the footprints of running tasks) are closed to other users; tasks
  keep their state in ``provider/``, theirs.
- **Access**: whatever a task needs (``nu``, the library, its state and temporary
  directories) must be reachable by the task user; the executor refuses to start otherwise,
  naming the path.
- **The environment**: once the configuration is read, everything but a few harmless
  variables leaves the executor's environment, including the copy the kernel shows in
  ``/proc/<pid>/environ`` (rewritten in place), so a task running as the executor's own user
  finds no secret there either.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from core.access import denied
from core.runner import STATE_DIR, TaskUser, move_state
from shared.errors import ConfigError

__all__ = [
    "DEFAULT_TASK_USER",
    "KEPT_ENV",
    "check_access",
    "prepare_data_dir",
    "resolve_task_user",
    "scrub_environment",
    "task_needs",
    "tools_denied",
    "warn_readable",
    "warn_unreachable_tools",
]

log = logging.getLogger(__name__)
DEFAULT_TASK_USER = "provisioning-task"
RUNTIME_DIR = "run"  # under the data directory: the executors' own (footprints of tasks)
# What stays in an executor's environment after start: nothing anyone could use against it.
KEPT_ENV = frozenset(
    {
        "PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "USER", "LOGNAME", "SHELL",
        "PWD", "HOSTNAME", "NOTIFY_SOCKET", "INVOCATION_ID", "JOURNAL_STREAM",
        "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
    }
)  # fmt: skip
KEPT_PREFIXES = ("LC_",)
_USERADD = ("useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
            "/nonexistent", "--shell", "/usr/sbin/nologin")  # fmt: skip


def resolve_task_user(setting: str) -> TaskUser | None:
    """Who tasks run as; None: this process's own user. ``""`` is automatic: the dedicated
    user when running as root, else our own."""
    root = os.geteuid() == 0
    name = setting or (DEFAULT_TASK_USER if root else "")
    if not name:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if setting or not root:
            raise ConfigError(
                f"[executor] task_user {name!r} does not exist on this host", user=name
            ) from None
        entry = _create_user(name)
    if entry.pw_uid == os.geteuid():
        return None
    if not root:
        raise ConfigError(
            f"[executor] task_user {name!r}: running tasks as another user needs an executor "
            "running as root (or leave task_user empty: tasks run as the executor's user)",
            user=name,
        )
    if entry.pw_uid == 0:
        log.warning("tasks run as root ([executor] task_user = %r): they can read everything", name)
        return None
    return TaskUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


def _create_user(name: str) -> pwd.struct_passwd:
    """Create the dedicated system user; other executors may be doing the same right now."""
    useradd = shutil.which(_USERADD[0], path="/usr/sbin:/usr/bin:/sbin:/bin")
    fix = (
        f"create it ({' '.join(_USERADD)} {name}) or name an existing unprivileged user in "
        "[executor] task_user"
    )
    if useradd is None:
        raise ConfigError(f"the task user {name!r} does not exist and useradd is missing: {fix}")
    error = ""
    for _ in range(10):
        done = subprocess.run(
            [useradd, *_USERADD[1:], name], capture_output=True, text=True, check=False
        )
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)  # ours, or another executor's
            if done.returncode == 0:
                log.warning("created the system user %r for tasks (uid %d)", name, entry.pw_uid)
            return entry
        error = done.stderr.strip()
        time.sleep(0.2)  # /etc/passwd locked by another useradd
    raise ConfigError(f"cannot create the task user {name!r} ({error}): {fix}", user=name)


def prepare_data_dir(data_dir: Path, task_user: TaskUser | None) -> tuple[Path, Path]:
    """Make ``data_dir``'s layout: ``provider/`` (the tasks' state) and ``run/`` (the
    executors'). With a task user: others may pass through the data directory but not list
    it, no entry but ``provider/`` is open to them, and ``provider/`` is the task user's.
    Returns ``(state dir, runtime dir)``."""
    state, runtime = data_dir / STATE_DIR, data_dir / RUNTIME_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    move_state(data_dir)
    for path in (state, runtime):
        path.mkdir(parents=True, exist_ok=True)
    runtime.chmod(0o700)
    if task_user is None:
        return state, runtime
    # other executors of the host may be at it too, and running tasks write in provider/:
    # an entry that vanished meanwhile is no error
    _set_mode(data_dir, lambda mode: (mode & ~0o007) | 0o001)
    for entry in data_dir.iterdir():
        if entry.name != STATE_DIR:
            _set_mode(entry, lambda mode: mode & ~0o007)
    for path in (state, *state.rglob("*")):  # records written by direct mode or another user
        with contextlib.suppress(FileNotFoundError):
            info = path.lstat()
            if (info.st_uid, info.st_gid) != (task_user.uid, task_user.gid):
                os.lchown(path, task_user.uid, task_user.gid)
    state.chmod(0o700)
    return state, runtime


def _set_mode(path: Path, change: Callable[[int], int]) -> None:
    with contextlib.suppress(FileNotFoundError):
        info = path.lstat()
        current = stat.S_IMODE(info.st_mode)
        if not stat.S_ISLNK(info.st_mode) and (mode := change(current)) != current:
            path.chmod(mode)
            log.info("%s: mode %04o -> %04o (tasks must not read it)", path, current, mode)


def check_access(task_user: TaskUser | None, needs: Iterable[tuple[Path, str]]) -> None:
    """Refuse to start when the task user cannot reach what tasks need; ``needs`` holds
    ``(path, "r" | "w" | "x")``. Mode bits only (ACLs are not read)."""
    if task_user is None:
        return
    groups = {task_user.gid, *os.getgrouplist(task_user.name, task_user.gid)}
    problems = []
    for path, want in needs:
        if (why := denied(path, want, task_user.uid, groups)) is not None:
            problems.append(f"{path}: {why}")
    if problems:
        raise ConfigError(
            f"tasks run as {task_user.name!r}, which cannot reach what tasks need: "
            + "; ".join(problems)
            + ". Make these readable (and the directories above them searchable) by that "
            "user, choose a data directory it can reach, or set [executor] task_user",
            user=task_user.name,
        )


def warn_readable(task_user: TaskUser | None, paths: Iterable[Path]) -> None:
    """Log a warning for each of ``paths`` (files that may hold secrets, such as the
    configuration file) that the task user can read."""
    if task_user is None:
        return
    groups = {task_user.gid, *os.getgrouplist(task_user.name, task_user.gid)}
    for path in paths:
        if path.is_file() and denied(path, "r", task_user.uid, groups) is None:
            log.warning(
                "%s is readable by the task user %r: if it holds secrets, chmod 600 it",
                path,
                task_user.name,
            )


def tools_denied(task_user: TaskUser | None) -> str | None:
    """Why the task user cannot run this Python interpreter, and so the tools installed
    beside it (the ``aws`` command line); None if it can."""
    if task_user is None:
        return None
    groups = {task_user.gid, *os.getgrouplist(task_user.name, task_user.gid)}
    return denied(Path(sys.executable), "x", task_user.uid, groups)


def warn_unreachable_tools(task_user: TaskUser | None) -> None:
    """Log a warning when the task user cannot run this Python interpreter: the tools
    installed beside it (the ``aws`` command line) cannot run in tasks then."""
    interpreter = Path(sys.executable)
    if task_user is not None and (why := tools_denied(task_user)) is not None:
        log.warning(
            "tasks run as %r cannot run %s (%s): Python tools installed beside it cannot run "
            "in tasks; install Python where that user can reach it",
            task_user.name,
            interpreter.resolve(),
            why,
        )


def task_needs(nu: str, lib_dirs: Iterable[str], state_dir: Path) -> list[tuple[Path, str]]:
    """What every task needs to reach: ``nu``, the libraries, its state, a temporary dir."""
    return [
        (Path(nu), "x"),
        *((Path(d), "r") for d in lib_dirs),
        (state_dir, "w"),
        (Path(tempfile.gettempdir()), "x"),
    ]


def scrub_environment() -> list[str]:
    """Drop every variable but :data:`KEPT_ENV` from this process's environment, and from the
    copy the kernel shows in ``/proc/self/environ`` (overwritten in place). Call once the
    configuration (and anything else that reads the environment) has been read. Returns the
    names dropped."""
    dropped = sorted(
        name for name in os.environ if name not in KEPT_ENV and not name.startswith(KEPT_PREFIXES)
    )
    for name in dropped:
        del os.environ[name]  # unsetenv: libc no longer points at the original strings
    if dropped and not _wipe_initial_environ(set(dropped)):
        log.warning(
            "could not wipe the start-up environment from /proc/self/environ: a process of "
            "this user can still read it there"
        )
    return dropped


def _wipe_initial_environ(names: set[str]) -> bool:
    """Zero the entries of ``names`` in the block the process started with (between
    ``env_start`` and ``env_end`` of ``/proc/self/stat``), which the kernel shows as
    ``/proc/self/environ`` whatever the process did with its variables since."""
    try:
        raw = Path("/proc/self/stat").read_bytes()
        fields = raw[raw.rfind(b")") + 2 :].split()
        start, end = int(fields[47]), int(fields[48])  # fields 50 and 51 of proc(5)
        block = ctypes.string_at(start, end - start)
    except (OSError, IndexError, ValueError):
        return False
    offset = 0
    for entry in block.split(b"\0"):
        name = entry.partition(b"=")[0].decode(errors="replace")
        if entry and name in names:
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1
    with contextlib.suppress(OSError):
        left = Path("/proc/self/environ").read_bytes().split(b"\0")
        return not any(e.partition(b"=")[0].decode(errors="replace") in names for e in left if e)
    return False
