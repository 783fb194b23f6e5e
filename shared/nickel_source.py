"""Evaluate user-submitted Nickel source safely: in a child process, bounded in time and memory,
with imports limited to the shipped schemas (``import "workflow.ncl"``).

Run as ``python -m shared.nickel_source`` it reads source on stdin and prints JSON on stdout.
"""

from __future__ import annotations

import asyncio
import re
import resource
import sys
from pathlib import Path

from .errors import DefinitionError

__all__ = ["SCHEMAS_DIR", "evaluate_nickel"]

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "core" / "schemas"
_IMPORT_RE = re.compile(r"\bimport\b")
_ALLOWED_IMPORT_RE = re.compile(r'\bimport\s+"([a-z][a-z0-9_-]*\.ncl)"')
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MEMORY_LIMIT = 1 << 30


def _check_imports(source: str) -> None:
    allowed = _ALLOWED_IMPORT_RE.findall(source)
    if len(_IMPORT_RE.findall(source)) != len(allowed) or any(
        not (SCHEMAS_DIR / name).is_file() for name in allowed
    ):
        shipped = ", ".join(sorted(p.name for p in SCHEMAS_DIR.glob("*.ncl")))
        raise DefinitionError(
            f"Nickel imports are limited to the shipped schemas ({shipped})", reason="bad_import"
        )


def _limits() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


async def evaluate_nickel(source: bytes, *, timeout_s: float = 10.0) -> bytes:
    """JSON text of the evaluated source; DefinitionError with Nickel's own message otherwise."""
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError:
        raise DefinitionError("Nickel source is not UTF-8", reason="malformed") from None
    _check_imports(text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.nickel_source",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=_limits,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(source), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DefinitionError(
            f"Nickel evaluation took longer than {timeout_s:g}s", reason="nickel_timeout"
        ) from None
    if proc.returncode != 0:
        message = _ANSI_RE.sub("", err.decode("utf-8", "replace")).strip() or "evaluation failed"
        raise DefinitionError(f"Nickel: {message[:4000]}", reason="nickel_error")
    return out


def _main() -> int:  # pragma: no cover - runs in the child
    import nickel

    source = sys.stdin.read()
    try:
        sys.stdout.write(nickel.run(source, import_paths=[str(SCHEMAS_DIR)]))
    except nickel.NickelException as exc:
        sys.stderr.write(str(exc))
        return 2
    except RecursionError:
        sys.stderr.write("nested too deeply")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
