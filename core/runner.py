"""Run one action in a fresh subprocess: flat execution, the seed's cure for deep call stacks.

The child leads a session (and process group) of its own and gets a clean environment.
Arguments reach it as JSON on stdin; its result is the JSON it writes to
``$PROVISIONING_RESULT_FILE``. ``PROGRESS: <n> [msg]`` lines on stdout are progress; every other
line is a log line. On timeout or cancellation every process of the task gets SIGTERM, then
SIGKILL after a grace period; whatever is left when the task ends is killed too, so no child
outlives its task. "Every process" is the child's session plus its descendants: Nushell puts
``job spawn``-ed commands in process groups of their own, so killing the group is not enough.
On Linux the child also gets SIGKILL if the runner's process dies (``setpriv --pdeathsig``).

Secrets: a task of a provider (``server.*``) also gets that provider's credentials, from an
environment captured when the runner was made (:class:`core.providers.Providers`); every log
line, progress message, error message and result passes through its :class:`Redactor` before
the runner hands it on, so nothing downstream (records, events, logs, traces) can hold them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from shared.errors import ProvisioningError

from .providers import Providers
from .registry import Action

__all__ = [
    "LineHandler",
    "ProgressHandler",
    "RunResult",
    "Runner",
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
_SWEEP_POLL_S = 0.05
_EXIT_POLL_S = 0.1


class RunResult(msgspec.Struct):
    outcome: str  # completed | failed | cancelled
    exit_code: int | None = None
    reason: str | None = None
    error: str | None = None
    output: Any = None
    duration_s: float = 0.0


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


def _stat(pid: int | str) -> tuple[str, int, int, int] | None:
    """``(state, ppid, session, start time)`` of a process from ``/proc``, or None."""
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


class _TaskProcesses:
    """Every process of one task: the session the child leads, and the child's descendants
    (which includes those that left the session with ``setsid`` while their parent lives)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        found = _stat(pid)
        self.start_time = found[3] if found else None
        self.procfs = os.path.isdir("/proc/self")

    def members(self) -> list[int]:
        """Live (not zombie) processes of the task; [] when ``/proc`` cannot tell."""
        if not self.procfs:
            return []
        leader = _stat(self.pid)
        if leader is not None and leader[3] != self.start_time:
            return []  # the pid is someone else's now: our session is empty (ids stay in use)
        children: dict[int, list[int]] = {}
        found: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or (stat := _stat(entry)) is None:
                continue
            state, ppid, session, _ = stat
            if state in ("Z", "X"):
                continue
            pid = int(entry)
            children.setdefault(ppid, []).append(pid)
            if session == self.pid:
                found.add(pid)
        queue = [self.pid, *found]
        while queue:
            for child in children.get(queue.pop(), ()):
                if child not in found:
                    found.add(child)
                    queue.append(child)
        if leader is None or leader[0] in ("Z", "X"):
            found.discard(self.pid)
        return sorted(found)

    async def signal(self, sig: signal.Signals) -> int:
        """Send ``sig`` to every process of the task; return how many there were."""
        members = await asyncio.to_thread(self.members)
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if not self.procfs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
        return len(members)

    async def wait_empty(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while await asyncio.to_thread(self.members):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_SWEEP_POLL_S)
        return True

    async def kill_all(self) -> int:
        """SIGKILL until nothing is left (a process may fork while we sweep); return the count."""
        killed = 0
        for _ in range(20):
            count = await self.signal(signal.SIGKILL)
            if not count:
                break
            killed += count
            await asyncio.sleep(_SWEEP_POLL_S)
        return killed


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


def _pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL --`` when available (Linux): the child dies with its parent."""
    if not sys.platform.startswith("linux"):
        return []
    found = shutil.which("setpriv", path=SAFE_PATH)
    return [found, "--pdeathsig", "KILL", "--"] if found else []


def _find_program(name: str, path: str) -> str | None:
    """``name`` as an absolute path, looked up on the child's PATH; None if not executable."""
    found = shutil.which(name, path=path)
    return os.path.abspath(found) if found else None


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
    """Spawns actions. One instance per executor (or per CLI in direct mode)."""

    def __init__(
        self,
        *,
        nu_binary: str = "nu",
        data_dir: Path,
        extra_env: Mapping[str, str] | None = None,
        kill_grace_s: float = 5.0,
        result_limit_bytes: int = 256 * 1024,
        providers: Providers | None = None,
    ) -> None:
        self.nu_binary = nu_binary
        self.data_dir = data_dir
        self.extra_env = dict(extra_env or {})
        self.kill_grace_s = kill_grace_s
        self.result_limit_bytes = result_limit_bytes
        self.providers = providers or Providers.none()
        self.redactor = self.providers.redactor
        self._prefix = _pdeathsig_prefix()

    def environment(
        self,
        action: Action,
        task_env: Mapping[str, str],
        workdir: Path,
        args: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        """The child's whole environment: nothing of the parent's leaks in, but the variables
        of the providers the task runs (``args`` name them)."""
        nu_dir = str(Path(resolve_binary(self.nu_binary)).parent)
        # the project's own tools (the aws command line) are installed beside the interpreter
        tools = dict.fromkeys([nu_dir, str(Path(sys.executable).parent), *SAFE_PATH.split(":")])
        env = {
            "PATH": ":".join(tools),
            "LANG": "C.UTF-8",
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "PROVISIONING_DATA_DIR": str(self.data_dir),
        }
        env["NU_LIB_DIRS"] = os.pathsep.join(action.lib_dirs)
        env.update(self.extra_env)
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
                resolve_binary(self.nu_binary),
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
        with tempfile.TemporaryDirectory(prefix="prov-task-") as tmp:
            workdir = Path(tmp)
            result_file = workdir / "result.json"
            env = self.environment(action, task_env, workdir, args)
            env["PROVISIONING_RESULT_FILE"] = str(result_file)
            program = _find_program(argv[0], env["PATH"])
            if program is None:
                return RunResult(
                    "failed",
                    reason="error",
                    error=f"cannot start {argv[0]!r}: not found or not executable "
                    f"(PATH={env['PATH']})",
                )
            argv[0] = program
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
                )
            except OSError as exc:
                return RunResult("failed", reason="error", error=f"cannot start {argv[0]}: {exc}")
            result = await self._supervise(proc, stdin, timeout_s, on_line, on_progress, cancel)
            result.duration_s = time.monotonic() - started
            if result.outcome == "completed" and action.kind == "nushell":
                self._read_result(result, result_file)
            if result.error:
                result.error = self.redactor.text(result.error)
            return result

    async def _supervise(
        self,
        proc: asyncio.subprocess.Process,
        stdin: bytes,
        timeout_s: float,
        on_line: LineHandler,
        on_progress: ProgressHandler,
        cancel: asyncio.Event | None,
    ) -> RunResult:
        assert proc.stdin and proc.stdout and proc.stderr
        stderr_tail: list[str] = []
        processes = _TaskProcesses(proc.pid)

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

    async def _terminate(self, proc: asyncio.subprocess.Process, processes: _TaskProcesses) -> None:
        """SIGTERM to every process of the task; SIGKILL to what is left after the grace."""
        await processes.signal(signal.SIGTERM)
        if not processes.procfs:  # no /proc: only the group can be watched and killed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), self.kill_grace_s)
        elif not await processes.wait_empty(self.kill_grace_s):
            log.info("task of pid %d outlived SIGTERM by %gs; killing", proc.pid, self.kill_grace_s)
        await processes.kill_all()

    def _read_result(self, result: RunResult, path: Path) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return  # the action returned nothing
        if size > self.result_limit_bytes:
            result.outcome, result.reason = "failed", "error"
            result.error = f"result is {size} bytes, over the {self.result_limit_bytes}-byte limit"
            return
        try:
            result.output = self.redactor.value(json.loads(path.read_bytes() or b"null"))
        except ValueError as exc:
            result.outcome, result.reason = "failed", "error"
            result.error = f"result is not JSON: {exc}"
