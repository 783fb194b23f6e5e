"""Evaluate user-submitted Nickel source safely: in a child process, bounded in time, memory
and output, with imports limited to the shipped schemas (``import "workflow.ncl"``).

Run as ``python -m shared.nickel_source`` it reads source on stdin, checks its imports and
prints the JSON of its value on stdout. Everything that costs time in proportion to the
source (the import check, the evaluation) happens in the child, never on the caller's loop.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import sys
import weakref
from pathlib import Path

from .errors import DefinitionError, PayloadTooLarge

__all__ = ["SCHEMAS_DIR", "evaluate_nickel"]

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "core" / "schemas"
_IMPORT_RE = re.compile(r"\bimport\b")
_IMPORT_AT_RE = re.compile(r'import\s+"([^"\\]*)"')
_SCHEMA_NAME_RE = re.compile(r"[a-z][a-z0-9_-]*\.ncl")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_'-]*")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MEMORY_LIMIT = 1 << 30
EXIT_NICKEL_ERROR = 2
EXIT_BAD_IMPORT = 3
ERROR_LIMIT_BYTES = 64 * 1024  # of the child's error text kept (4,000 characters are shown)
_CHUNK = 64 * 1024
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


async def evaluate_nickel(
    source: bytes, *, timeout_s: float = 10.0, max_output_bytes: int | None = None
) -> bytes:
    """JSON text of the evaluated source; DefinitionError with Nickel's own message otherwise,
    PayloadTooLarge when the JSON would be longer than ``max_output_bytes``."""
    try:
        source.decode("utf-8")
    except UnicodeDecodeError:
        raise DefinitionError("Nickel source is not UTF-8", reason="malformed") from None
    loop = asyncio.get_running_loop()
    if loop not in _SLOTS:
        _SLOTS[loop] = asyncio.Semaphore(MAX_CONCURRENT)
    async with _SLOTS[loop]:
        return await _evaluate(source, timeout_s, max_output_bytes)


async def _read_output(proc: asyncio.subprocess.Process, limit: int | None) -> bytes | None:
    """The child's whole output, or None (and the child killed) once it passes ``limit``."""
    assert proc.stdout is not None
    chunks: list[bytes] = []
    size = 0
    while chunk := await proc.stdout.read(_CHUNK):
        size += len(chunk)
        if limit is not None and size > limit:
            proc.kill()
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_error(stream: asyncio.StreamReader) -> bytes:
    """The start of the child's error text; the rest is read and dropped."""
    kept = bytearray()
    while chunk := await stream.read(_CHUNK):
        kept += chunk[: max(0, ERROR_LIMIT_BYTES - len(kept))]
    return bytes(kept)


async def _feed(proc: asyncio.subprocess.Process, source: bytes) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(source)
        await proc.stdin.drain()
        proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child stopped reading (it failed early): its exit status says why


async def _evaluate(source: bytes, timeout_s: float, max_output_bytes: int | None) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.nickel_source",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=_limits,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(timeout_s):
            _, out, err, _ = await asyncio.gather(
                _feed(proc, source),
                _read_output(proc, max_output_bytes),
                _read_error(proc.stderr),
                proc.wait(),
            )
    except TimeoutError:
        raise DefinitionError(
            f"Nickel evaluation took longer than {timeout_s:g}s",
            reason="nickel_timeout",
            limit=timeout_s,
        ) from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if out is None:
        raise PayloadTooLarge(
            f"the Nickel source evaluates to more than {max_output_bytes} bytes of JSON",
            limit=max_output_bytes,
        )
    message = _ANSI_RE.sub("", err.decode("utf-8", "replace")).strip() or "evaluation failed"
    if proc.returncode == EXIT_BAD_IMPORT:
        raise DefinitionError(message, reason="bad_import")
    if proc.returncode != 0:
        raise DefinitionError(f"Nickel: {message[:4000]}", reason="nickel_error")
    return out


def _main() -> int:  # pragma: no cover - runs in the child
    import nickel

    source = sys.stdin.read()
    try:
        _check_imports(source)
    except DefinitionError as exc:
        sys.stderr.write(exc.message)
        return EXIT_BAD_IMPORT
    try:
        sys.stdout.write(nickel.run(source, import_paths=[str(SCHEMAS_DIR)]))
    except nickel.NickelException as exc:
        sys.stderr.write(str(exc))
        return EXIT_NICKEL_ERROR
    except RecursionError:
        sys.stderr.write("nested too deeply")
        return EXIT_NICKEL_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(_main())
