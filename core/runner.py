"""Run one action in a fresh subprocess: flat execution, the seed's cure for deep call stacks.

The child runs in its own process group with a clean environment. Arguments reach it as JSON on
stdin; its result is the JSON it writes to ``$PROVISIONING_RESULT_FILE``. ``PROGRESS: <n> [msg]``
lines on stdout are progress; every other line is a log line. On timeout or cancellation the
whole group gets SIGTERM, then SIGKILL after a grace period; no child outlives its task.
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

from .registry import Action

__all__ = ["LineHandler", "RunResult", "Runner", "parse_progress", "resolve_binary"]

log = logging.getLogger(__name__)

LineHandler = Callable[[str, str], Awaitable[None]]  # (stream, line)
ProgressHandler = Callable[[int, str], Awaitable[None]]
_PROGRESS_RE = re.compile(r"^PROGRESS:\s*(\d{1,3})(?:\s+(.*))?$")
_NU_ERROR_RE = re.compile(r"^\s*[x\u00d7]\s+(.+)$")  # the headline of a Nushell error report
MAX_LINE = 4096
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


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
            return binary
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


def _error_message(stderr_tail: list[str]) -> str:
    """The gist of a failure: Nushell's error headline, else the last lines of stderr."""
    for line in stderr_tail:
        if m := _NU_ERROR_RE.match(line):
            return m.group(1).strip()[:1000]
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
    ) -> None:
        self.nu_binary = nu_binary
        self.data_dir = data_dir
        self.extra_env = dict(extra_env or {})
        self.kill_grace_s = kill_grace_s
        self.result_limit_bytes = result_limit_bytes

    def environment(
        self, action: Action, task_env: Mapping[str, str], workdir: Path
    ) -> dict[str, str]:
        """The child's whole environment: nothing of the parent's leaks in."""
        nu_dir = str(Path(resolve_binary(self.nu_binary)).parent)
        env = {
            "PATH": f"{nu_dir}:{SAFE_PATH}",
            "LANG": "C.UTF-8",
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "PROVISIONING_DATA_DIR": str(self.data_dir),
        }
        if action.lib_dir:
            env["NU_LIB_DIRS"] = action.lib_dir
        env.update(self.extra_env)
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
    ) -> RunResult:
        if action.kind == "nushell":
            argv = [
                resolve_binary(self.nu_binary),
                "-n",
                "--no-std-lib",
                "--stdin",
                "-c",
                action.script(),
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
            env = self.environment(action, task_env, workdir)
            env["PROVISIONING_RESULT_FILE"] = str(result_file)
            try:
                proc = await asyncio.create_subprocess_exec(
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

        async def feed() -> None:
            assert proc.stdin
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(stdin)
                await proc.stdin.drain()
            proc.stdin.close()

        async def pump(stream: asyncio.StreamReader, name: str) -> None:
            while True:
                try:
                    raw = await stream.readline()
                except ValueError:  # a line longer than the reader's limit
                    raw = await stream.read(MAX_LINE)
                if not raw:
                    return
                line = raw.decode("utf-8", "replace").rstrip("\r\n")[:MAX_LINE]
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
        waiter = asyncio.create_task(proc.wait())
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
            await self._terminate(proc)
        if cancelled is not None:
            cancelled.cancel()
        await waiter
        self._kill_group(proc.pid, signal.SIGKILL)  # stragglers that outlived the main process
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

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        self._kill_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.kill_grace_s)
        except TimeoutError:
            self._kill_group(proc.pid, signal.SIGKILL)

    @staticmethod
    def _kill_group(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

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
            result.output = json.loads(path.read_bytes() or b"null")
        except ValueError as exc:
            result.outcome, result.reason = "failed", "error"
            result.error = f"result is not JSON: {exc}"
