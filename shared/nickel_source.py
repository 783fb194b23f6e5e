"""Evaluate user-submitted Nickel source safely: in a child process, bounded in time and memory,
with imports limited to the shipped schemas (``import "workflow.ncl"``).

Run as ``python -m shared.nickel_source`` it reads source on stdin and prints JSON on stdout.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import sys
import weakref
from pathlib import Path

from .errors import DefinitionError

__all__ = ["SCHEMAS_DIR", "evaluate_nickel"]

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "core" / "schemas"
_IMPORT_RE = re.compile(r"\bimport\b")
_IMPORT_AT_RE = re.compile(r'import\s+"([^"\\]*)"')
_SCHEMA_NAME_RE = re.compile(r"[a-z][a-z0-9_-]*\.ncl")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_'-]*")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MEMORY_LIMIT = 1 << 30
# Evaluations at once per process: each may take MEMORY_LIMIT and a core for its whole
# timeout, so a burst of hostile sources waits its turn instead of exhausting the machine.
MAX_CONCURRENT = max(1, (os.cpu_count() or 2) // 2)
_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _imports(source: str) -> list[str | None]:
    """What each ``import`` of the source names (None: not a plain string literal).

    Without a ``%`` anywhere there is no interpolation and no multiline or symbolic string, and
    a small scanner of Nickel's lexical structure tells code from comments and ``"..."``
    literals, so that the word "import" in a description or an argument is not taken for an
    import. Where a string may hold code (``"%{...}"``) or quotes (``m%"..."%``), telling them
    apart needs Nickel's whole grammar: there every word "import" counts.
    """
    if "%" in source:
        return [
            m.group(1) if (m := _IMPORT_AT_RE.match(source, found.start())) else None
            for found in _IMPORT_RE.finditer(source)
        ]
    imports: list[str | None] = []
    expecting = False  # the last token was the keyword ``import``
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == "#":  # a comment, to the end of the line
            end = source.find("\n", i)
            i = n if end < 0 else end + 1
        elif c.isspace():
            i += 1
        elif c == '"':  # a string literal, to the next quote that is not escaped
            j = i + 1
            while j < n and source[j] != '"':
                j += 2 if source[j] == "\\" else 1
            if expecting:
                imports.append(source[i + 1 : j])
                expecting = False
            i = j + 1
        else:
            if expecting:
                imports.append(None)
            m = _IDENT_RE.match(source, i)
            expecting = m is not None and m.group() == "import"
            i = m.end() if m else i + 1
    if expecting:
        imports.append(None)
    return imports


def _check_imports(source: str) -> None:
    for name in _imports(source):
        if (
            name is None
            or not _SCHEMA_NAME_RE.fullmatch(name)
            or not (SCHEMAS_DIR / name).is_file()
        ):
            shipped = ", ".join(sorted(p.name for p in SCHEMAS_DIR.glob("*.ncl")))
            raise DefinitionError(
                f"Nickel imports are limited to the shipped schemas ({shipped})",
                reason="bad_import",
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
    loop = asyncio.get_running_loop()
    if loop not in _SLOTS:
        _SLOTS[loop] = asyncio.Semaphore(MAX_CONCURRENT)
    async with _SLOTS[loop]:
        return await _evaluate(source, timeout_s)


async def _evaluate(source: bytes, timeout_s: float) -> bytes:
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
