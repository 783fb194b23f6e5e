"""Run one action in a fresh subprocess: flat execution, the seed's cure for deep call stacks.

The child leads a session (and process group) of its own and gets a clean environment.
Arguments reach it as JSON on stdin; its result is the JSON it writes to
``$PROVISIONING_RESULT_FILE``. ``PROGRESS: <n> [msg]`` lines on stdout are progress; every other
line is a log line. On timeout or cancellation every process of the task gets SIGTERM, then
SIGKILL after a grace period; whatever is left when the task ends is killed too, so no child
outlives its task. "Every process" is the child's session plus its descendants, and, when this
process is a child subreaper (the executor), the orphans it adopted from them
(:mod:`core.processes`). On Linux the child also gets SIGKILL if the runner's process dies
(``provisioning-launch``, else ``setpriv --pdeathsig``), and what it started is found and
killed by the next executor before the task runs again (:mod:`core.leftovers`).

With a :class:`TaskUser` the child runs as that user (switched by the same launcher, with no
supplementary groups): it cannot read the runner's ``/proc/<pid>/environ`` nor files only the
runner's user may read. Its working directory is ``<tmp>/prov-task-*/work``, owned by it inside
a directory it cannot rename; the result file is opened without following links and must be a
regular file of the task's user. Tasks keep their own state (the local provider's records) in
``<data dir>/provider``, which they get as ``PROVISIONING_DATA_DIR``.

Secrets: a task of a provider (``server.*``) also gets that provider's credentials, from an
environment captured when the runner was made (:class:`core.providers.Providers`); every log
line, progress message, error message and result passes through its :class:`Redactor` before
the runner hands it on, so nothing downstream (records, events, logs, traces) can hold them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import stat as st
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from shared.errors import ProvisioningError

from .access import denied
from .leftovers import Footprints, leftovers
from .processes import Family, TaskProcesses, kill_pids
from .providers import Providers
from .registry import Action

__all__ = [
    "LineHandler",
    "ProgressHandler",
    "RunResult",
    "Runner",
    "TaskUser",
    "move_state",
    "parse_progress",
    "resolve_binary",
]

log = logging.getLogger(__name__)

LineHandler = Callable[[str, str], Awaitable[None]]  # (stream, line)
ProgressHandler = Callable[[int, str], Awaitable[None]]
_PROGRESS_RE = re.compile(r"^PROGRESS:\s*(\d{1,3})(?:\s+(.*))?$")
_NU_ERROR_RE = re.compile(r"^\s*[x\u00d7]\s+(.+)$")  # the headline of a Nushell error report
_NU_WRAPPED_RE = re.compile(r"^\s*[|\u2502]\s(.*)$")  # its continuation (no line number)
MAX_LINE = 4096
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_EXIT_POLL_S = 0.1
STATE_DIR = "provider"  # under the data directory: the tasks' own, as PROVISIONING_DATA_DIR


class RunResult(msgspec.Struct):
    outcome: str  # completed | failed | cancelled
    exit_code: int | None = None
    reason: str | None = None
    error: str | None = None
    output: Any = None
    duration_s: float = 0.0


class TaskUser(msgspec.Struct, frozen=True):
    """The unprivileged user task processes run as."""

    name: str
    uid: int
    gid: int


def parse_progress(line: str) -> tuple[int, str] | None:
    m = _PROGRESS_RE.match(line.strip())
    if not m:
        return None
    return max(0, min(100, int(m.group(1)))), (m.group(2) or "").strip()


def resolve_binary(binary: str) -> str:
    """An absolute path for ``binary``: as given, on PATH, or beside the running interpreter."""
    if os.sep in binary:
        if os.access(binary, os.X_OK):
            return os.path.abspath(binary)  # the child runs in a directory of its own
        raise ProvisioningError(f"{binary} is not executable", binary=binary)
    found = shutil.which(binary)
    if found:
        return found
    beside = Path(sys.executable).parent / binary
    if os.access(beside, os.X_OK):
        return str(beside)
    raise ProvisioningError(
        f"{binary!r} not found on PATH nor in {beside.parent} (run `make install`)", binary=binary
    )


async def _exit_of(proc: asyncio.subprocess.Process) -> int:
    """The child's exit status as soon as it exits. ``proc.wait()`` alone (Python 3.11) also
    waits for its pipes to close, which a left-behind grandchild can hold open for ever."""
    wait = asyncio.ensure_future(proc.wait())
    try:
        while proc.returncode is None:
            await asyncio.wait({wait}, timeout=_EXIT_POLL_S)
        return proc.returncode
    finally:
        wait.cancel()


LAUNCH = "provisioning-launch"  # core/launch.c, built by `make install` beside the interpreter


def _launcher(task_user: TaskUser | None) -> tuple[list[str], dict[str, Any]]:
    """The prefix that starts a task's program, and what ``create_subprocess_exec`` must do
    itself. ``provisioning-launch`` (:file:`core/launch.c`) switches to the task's user and
    sets the parent-death signal (the child dies with its runner) after the fork, so Python
    keeps spawning with vfork; its own ``user=``/``group=`` would make every spawn a full fork
    of the runner. Where it was not built, ``setpriv`` (util-linux) does the same, adding
    about three times the CPU per spawn (docs/performance.md); where neither is, the spawn
    switches users itself and the child starts without the parent-death signal."""
    if sys.platform.startswith("linux"):
        launch = Path(sys.executable).parent / LAUNCH
        if os.access(launch, os.X_OK):
            ids = [str(task_user.uid), str(task_user.gid)] if task_user else ["-", "-"]
            return [str(launch), *ids], {}
        if setpriv := shutil.which("setpriv", path=SAFE_PATH):
            switch = (
                [f"--reuid={task_user.uid}", f"--regid={task_user.gid}", "--clear-groups"]
                if task_user
                else []
            )
            return [setpriv, *switch, "--pdeathsig", "KILL", "--"], {}
    if task_user:
        return [], {"user": task_user.uid, "group": task_user.gid, "extra_groups": []}
    return [], {}


def move_state(data_dir: Path) -> None:
    """Tasks kept their state in the data directory itself before they got ``provider/``:
    move the local provider's records there, once."""
    old, new = data_dir / "local", data_dir / STATE_DIR / "local"
    if old.is_dir() and not new.exists():
        new.parent.mkdir(parents=True, exist_ok=True)
        try:
            old.rename(new)
        except OSError:
            if new.is_dir():
                return  # another executor of the host moved them
            raise
        log.info("moved the local provider's records from %s to %s", old, new)


def _find_program(name: str, path: str, user: TaskUser | None) -> tuple[str | None, str]:
    """``name`` as an absolute path, looked up on the child's PATH as the child would: the
    first that ``user`` (the task user; None: this process's) may execute, skipping those it
    may not, as ``execvp`` does. ``(None, why)`` when there is none."""
    if os.sep in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d, name) for d in path.split(os.pathsep) if d]
    refused = ""
    for candidate in candidates:
        if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
            continue
        if user is not None:
            # the file, links followed; a link's own directory too (the only one not among
            # the directories above what it leads to)
            found, groups = Path(candidate), {user.gid}
            why = denied(found, "x", user.uid, groups)
            if why is None and found.is_symlink():
                why = denied(found.parent, "x", user.uid, groups)
            if why is not None:
                refused = refused or f"; {candidate}: the task user {user.name!r} may not: {why}"
                continue
        return os.path.abspath(candidate), ""
    return None, refused


def _error_message(stderr_tail: list[str]) -> str:
    """The gist of a failure: Nushell's error headline (which it wraps at the terminal's width:
    the ``|`` lines right under it are the rest), else the last lines of stderr."""
    for i, line in enumerate(stderr_tail):
        if m := _NU_ERROR_RE.match(line):
            parts = [m.group(1).strip()]
            for more in stderr_tail[i + 1 :]:
                if not (rest := _NU_WRAPPED_RE.match(more)):
                    break
                parts.append(rest.group(1).strip())
            return " ".join(parts)[:1000]
    return "; ".join(line.strip() for line in stderr_tail[-3:] if line.strip())[:1000]


class Runner:
    """Spawns actions. One instance per executor (or per CLI in direct mode).

    ``task_user``: run task processes as this user (None: as this process's user).
    ``runtime_dir``: where to keep the footprints of running tasks for a successor
    (:mod:`core.leftovers`); None keeps none (direct mode)."""

    def __init__(
        self,
        *,
        nu_binary: str = "nu",
        data_dir: Path,
        extra_env: Mapping[str, str] | None = None,
        kill_grace_s: float = 5.0,
        result_limit_bytes: int = 256 * 1024,
        providers: Providers | None = None,
        task_user: TaskUser | None = None,
        runtime_dir: Path | None = None,
    ) -> None:
        self.nu_binary = nu_binary
        self.data_dir = data_dir
        self.state_dir = data_dir / STATE_DIR
        self.extra_env = dict(extra_env or {})
        self.kill_grace_s = kill_grace_s
        self.result_limit_bytes = result_limit_bytes
        self.providers = providers or Providers.none()
        self.redactor = self.providers.redactor
        self.task_user = task_user
        self.task_uid = task_user.uid if task_user else os.geteuid()
        self._prefix, self._spawn_user = _launcher(task_user)
        # for the executor's start-up line: which of the three ways tasks start
        self.launcher = Path(self._prefix[0]).name if self._prefix else "the spawn itself"
        self._nu_path: str | None = None
        self._state_moved = False
        self.family = Family()
        self.footprints = Footprints(runtime_dir / "tasks") if runtime_dir else None

    @property
    def nu_path(self) -> str:
        if self._nu_path is None:
            self._nu_path = resolve_binary(self.nu_binary)
        return self._nu_path

    def environment(
        self,
        action: Action,
        task_env: Mapping[str, str],
        workdir: Path,
        args: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        """The child's whole environment: nothing of the parent's leaks in, but the variables
        of the providers the task runs (``args`` name them)."""
        nu_dir = str(Path(self.nu_path).parent)
        # the project's own tools (the aws command line) are installed beside the interpreter
        tools = dict.fromkeys([nu_dir, str(Path(sys.executable).parent), *SAFE_PATH.split(":")])
        env = {
            "PATH": ":".join(tools),
            "LANG": "C.UTF-8",
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "PROVISIONING_DATA_DIR": str(self.state_dir),
        }
        env.update(self.extra_env)
        # [nushell] env_vars may name NU_LIB_DIRS (the seed's configuration does): those come
        # after the action's own libraries, never instead of them
        extra_libs = [d for d in self.extra_env.get("NU_LIB_DIRS", "").split(os.pathsep) if d]
        env["NU_LIB_DIRS"] = os.pathsep.join(dict.fromkeys([*action.lib_dirs, *extra_libs]))
        env.update(self.providers.env_for(action.name, args or {}))
        env.update(task_env)
        return env

    async def run(
        self,
        action: Action,
        args: dict[str, Any],
        *,
        task_env: Mapping[str, str],
        timeout_s: float,
        on_line: LineHandler,
        on_progress: ProgressHandler,
        cancel: asyncio.Event | None = None,
        plan: bool = False,
    ) -> RunResult:
        """Run the action (its read-only plan function with ``plan``) in a fresh process."""
        if action.kind == "nushell":
            argv = [
                self.nu_path,
                "-n",
                "--no-std-lib",
                "--stdin",
                "-c",
                action.script(plan=plan),
            ]
            stdin = json.dumps(args).encode()
        elif action.kind == "command":
            raw = args.get("argv")
            if not isinstance(raw, list) or not raw or not all(isinstance(a, str) for a in raw):
                return RunResult(
                    "failed", reason="refused", error='command.run needs {"argv": [str, ...]}'
                )
            argv, stdin = list(raw), b""
        else:
            raise ValueError(f"not a subprocess action: {action.name}")
        started = time.monotonic()
        if not self._state_moved:
            move_state(self.data_dir)
            self._state_moved = True
        with tempfile.TemporaryDirectory(prefix="prov-task-") as tmp:
            workdir = self._workdir(Path(tmp))
            result_file = workdir / "result.json"
            env = self.environment(action, task_env, workdir, args)
            env["PROVISIONING_RESULT_FILE"] = str(result_file)
            # nu itself: the executor checked at start that the task user may run it
            user = None if argv[0] == self.nu_path else self.task_user
            program, refused = _find_program(argv[0], env["PATH"], user)
            if program is None:
                return RunResult(
                    "failed",
                    reason="error",
                    error=f"cannot start {argv[0]!r}: not found or not executable "
                    f"(PATH={env['PATH']}){refused}",
                )
            argv[0] = program
            self.family.spawning += 1
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._prefix,
                    *argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=env,
                    cwd=workdir,
                    start_new_session=True,
                    **self._spawn_user,
                )
            except OSError as exc:
                return RunResult("failed", reason="error", error=f"cannot start {argv[0]}: {exc}")
            finally:
                self.family.spawning -= 1
            key = task_env.get("PROVISIONING_TASK_ID", "")
            processes = TaskProcesses(proc.pid, key, self.family)
            self.family.tasks[proc.pid] = processes
            footprint = None
            if self.footprints is not None and key and processes.start_time is not None:
                footprint = self.footprints.put(key, proc.pid, processes.start_time, self.task_uid)
            try:
                result = await self._supervise(
                    proc, processes, stdin, timeout_s, on_line, on_progress, cancel
                )
            finally:
                self.family.tasks.pop(proc.pid, None)
                if footprint is not None and self.footprints is not None:
                    self.footprints.drop(footprint)
            if not self.family.tasks:  # nothing runs that could claim a stray: end them
                await self.kill_strays()
            result.duration_s = time.monotonic() - started
            if result.outcome == "completed" and action.kind == "nushell":
                self._read_result(result, result_file)
            if result.error:
                result.error = self.redactor.text(result.error)
            return result

    def _workdir(self, tmp: Path) -> Path:
        """``<tmp>/work``: the task's home and working directory. ``tmp`` stays this process's
        (others may only pass through it), so the task cannot swap ``work`` for a link."""
        work = tmp / "work"
        work.mkdir(mode=0o700)
        if self.task_user is not None:
            tmp.chmod(0o711)
            os.chown(work, self.task_user.uid, self.task_user.gid)
        return work

    # -- what tasks leave behind ---------------------------------------------------------------

    def reap_adopted(self) -> None:
        """Collect the exit status of orphans adopted as a subreaper (call on SIGCHLD)."""
        if self.family.adopts:
            self.family.reap()

    async def kill_strays(self) -> int:
        """Kill adopted orphans no running task claims (:meth:`core.processes.Family.strays`)."""
        if not self.family.adopts:
            return 0
        killed = await kill_pids(self.family.strays, threaded=False, then=self.family.reap)
        if killed:
            log.info("killed %d processes left behind by finished tasks", killed)
        return killed

    async def kill_leftovers(self, key: str, *, redelivered: bool) -> int:
        """Before the task ``key`` runs here: kill what an earlier run left on this host (its
        footprint's session, and anything carrying its identity) that is not ours. Scans
        ``/proc`` only when the task left a footprint here or was delivered before."""
        footprint = self.footprints.get(key) if self.footprints is not None else None
        if footprint is None and not redelivered:
            return 0
        me = os.getpid()
        killed = await kill_pids(lambda: leftovers(key, footprint, me))
        if footprint is not None and footprint.session not in self.family.tasks:
            assert self.footprints is not None
            self.footprints.drop(footprint)
        if killed:
            log.warning("killed %d processes of %s left behind by an earlier run", killed, key)
        return killed

    async def clear_orphaned(self) -> int:
        """Kill the sessions of tasks whose executor on this host died; forget them."""
        if self.footprints is None:
            return 0
        me, killed = os.getpid(), 0
        for footprint in await asyncio.to_thread(self.footprints.orphaned):
            count = await kill_pids(functools.partial(leftovers, None, footprint, me))
            self.footprints.drop(footprint)
            if count:
                log.warning(
                    "killed %d processes of %s left behind by dead executor pid %d",
                    count,
                    footprint.key,
                    footprint.executor_pid,
                )
            killed += count
        return killed

    async def _supervise(
        self,
        proc: asyncio.subprocess.Process,
        processes: TaskProcesses,
        stdin: bytes,
        timeout_s: float,
        on_line: LineHandler,
        on_progress: ProgressHandler,
        cancel: asyncio.Event | None,
    ) -> RunResult:
        assert proc.stdin and proc.stdout and proc.stderr
        stderr_tail: list[str] = []

        async def feed() -> None:
            assert proc.stdin
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(stdin)
                await proc.stdin.drain()
            proc.stdin.close()

        async def pump(stream: asyncio.StreamReader, name: str) -> None:
            while True:
                fragment = False
                try:
                    raw = await stream.readline()
                except ValueError:  # a line longer than the reader's limit
                    raw, fragment = await stream.read(MAX_LINE), True
                if not raw:
                    return
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                # masked before it is cut, so no half of a secret survives the cut
                line = self.redactor.text(text, fragment=fragment)[:MAX_LINE]
                if name == "stdout" and (progress := parse_progress(line)) is not None:
                    await on_progress(*progress)
                if name == "stderr":
                    stderr_tail.append(line)
                    del stderr_tail[:-20]
                await on_line(name, line)

        readers = [
            asyncio.create_task(feed()),
            asyncio.create_task(pump(proc.stdout, "stdout")),
            asyncio.create_task(pump(proc.stderr, "stderr")),
        ]
        waiter = asyncio.create_task(_exit_of(proc))
        cancelled = asyncio.create_task(cancel.wait()) if cancel else None
        pending = {waiter} | ({cancelled} if cancelled else set())
        done, _ = await asyncio.wait(
            pending, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        verdict: RunResult | None = None
        if waiter not in done:
            if cancelled is not None and cancelled in done:
                verdict = RunResult("cancelled", reason="cancelled", error="cancelled")
            else:
                verdict = RunResult(
                    "failed", reason="timeout", error=f"timed out after {timeout_s:g}s"
                )
            await self._terminate(proc, processes)
        if cancelled is not None:
            cancelled.cancel()
        await waiter
        if stragglers := await processes.kill_all():  # what outlived the main process
            log.info("killed %d leftover processes of pid %d", stragglers, proc.pid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)  # the pipes close once every holder is gone
        try:
            await asyncio.wait_for(asyncio.gather(*readers), 5)
        except TimeoutError:
            for r in readers:
                r.cancel()
        code = proc.returncode
        if verdict is not None:
            verdict.exit_code = code
            return verdict
        if code == 0:
            return RunResult("completed", exit_code=0)
        return RunResult(
            "failed",
            exit_code=code,
            reason="exit_code",
            error=f"exited with code {code}"
            + (f": {m}" if (m := _error_message(stderr_tail)) else ""),
        )

    async def _terminate(self, proc: asyncio.subprocess.Process, processes: TaskProcesses) -> None:
        """SIGTERM to every process of the task; SIGKILL to what is left after the grace."""
        await processes.signal(signal.SIGTERM)
        if not processes.procfs:  # no /proc: only the group can be watched and killed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), self.kill_grace_s)
        elif not await processes.wait_empty(self.kill_grace_s):
            log.info("task of pid %d outlived SIGTERM by %gs; killing", proc.pid, self.kill_grace_s)
        await processes.kill_all()

    def _read_result(self, result: RunResult, path: Path) -> None:
        """The task's result: a regular file of the task's user, read without following a
        link (the task owns its directory: it could point the name anywhere)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # the action returned nothing
        except OSError as exc:
            result.outcome, result.reason = "failed", "error"
            result.error = f"cannot read the result: {exc.strerror}"
            return
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(fd)
            if not st.S_ISREG(info.st_mode) or info.st_uid != self.task_uid:
                result.outcome, result.reason = "failed", "error"
                result.error = "the result is not a regular file of the task's user"
                return
            if info.st_size > self.result_limit_bytes:
                result.outcome, result.reason = "failed", "error"
                result.error = (
                    f"result is {info.st_size} bytes, over the {self.result_limit_bytes}-byte limit"
                )
                return
            raw = file.read(self.result_limit_bytes + 1)
        try:
            result.output = self.redactor.value(json.loads(raw or b"null"))
        except ValueError as exc:
            result.outcome, result.reason = "failed", "error"
            result.error = f"result is not JSON: {exc}"
