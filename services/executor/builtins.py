"""Built-in actions, run inside the executor without a subprocess (tests, demos, benchmarks)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

from core.runner import RunResult

__all__ = ["run_builtin"]


async def run_builtin(
    action: str, args: dict[str, Any], *, timeout_s: float, cancel: asyncio.Event
) -> RunResult:
    if action == "builtin.noop":
        return RunResult("completed", exit_code=0, output={})
    if action == "builtin.fail":
        message = args.get("message", "failed on purpose")
        return RunResult("failed", exit_code=1, reason="error", error=str(message)[:2000])
    if action == "builtin.sleep":
        seconds = args.get("seconds", 1)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            return RunResult(
                "failed", reason="refused", error='builtin.sleep needs {"seconds": number}'
            )
        if not math.isfinite(seconds) or not 0 <= seconds <= 86400:
            return RunResult("failed", reason="refused", error="seconds must be within 0..86400")
        if seconds > timeout_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cancel.wait(), timeout_s)
            if cancel.is_set():
                return RunResult("cancelled", reason="cancelled", error="cancelled")
            return RunResult("failed", reason="timeout", error=f"timed out after {timeout_s:g}s")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cancel.wait(), seconds)
        if cancel.is_set():
            return RunResult("cancelled", reason="cancelled", error="cancelled")
        return RunResult("completed", exit_code=0, output={"slept": seconds})
    return RunResult("failed", reason="refused", error=f"unknown builtin {action!r}")
