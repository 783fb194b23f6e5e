"""Parsing and validating untrusted workflow definitions off the event loop.

A gateway must answer ``/health`` and every other request while it reads a definition, and a
definition can cost far more than its size suggests: a 3.9 MB YAML flow list of zeros took 30 s
to parse. :class:`DefinitionParser` hands the work (:func:`shared.workflow.parse_definition`
then :func:`shared.workflow.validate_definition`) to a small pool of worker processes and waits
for the answer without blocking the loop:

- in time: a worker still busy after ``timeout_s`` is killed (a thread could not be: a runaway
  parse would burn a core on), and the request gets ``422`` with reason ``parse_timeout``;
- in memory: each worker has an address-space limit (``MEMORY_LIMIT``); a worker that dies (out
  of memory, or killed) costs its request a ``422`` with reason ``too_complex``;
- in number: at most ``workers`` parse at once; further requests wait their turn (bounded by
  ``[gateway] request_timeout_seconds``). Workers start on demand and are kept while idle; a
  killed one is replaced by the next request.

A worker answers with the definition as JSON, the message codec's own encoding, which the
gateway decodes (typed, in C: a 20,000-task definition in tens of milliseconds).

Run as ``python -m shared.parsing`` this module is a worker: it reads length-prefixed msgpack
requests on stdin and writes replies on stdout until stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import signal
import struct
import sys
import traceback
from collections.abc import Iterable
from typing import IO, Any

import msgspec

from .errors import DefinitionError
from .messages import WorkflowDefinition

__all__ = ["MEMORY_LIMIT", "DefinitionParser"]

MEMORY_LIMIT = 1 << 30  # address space of one worker
SPAWN_TIMEOUT_S = 30.0  # for a new worker to import what it needs and say it is ready
_READY = b"ready"
_HEADER = struct.Struct(">I")  # the length of the frame that follows
_PR_SET_PDEATHSIG = 1


class ParseRequest(msgspec.Struct, array_like=True):
    """One definition to parse: its format, its bytes and what validation needs."""

    fmt: str
    body: bytes
    actions: list[str]
    max_tasks: int


class ParseReply(msgspec.Struct, array_like=True):
    """The definition's JSON, or the :class:`DefinitionError` it raised (message and data), or
    the traceback of an unexpected failure."""

    definition: bytes = b""
    error_message: str = ""
    error_data: dict[str, Any] = msgspec.field(default_factory=dict)
    internal: str = ""


_decode_reply = msgspec.msgpack.Decoder(ParseReply).decode
_decode_definition = msgspec.json.Decoder(WorkflowDefinition).decode


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def spawn(cls) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shared.parsing",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=_worker_limits,
        )
        worker = cls(proc)
        try:
            ready = await asyncio.wait_for(worker._read_frame(), SPAWN_TIMEOUT_S)
        except BaseException:
            worker.kill()
            raise
        if ready != _READY:
            worker.kill()
            raise RuntimeError(f"a definition parser said {ready[:100]!r} instead of ready")
        return worker

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def call(self, request: bytes) -> bytes:
        assert self.proc.stdin is not None
        self.proc.stdin.write(_HEADER.pack(len(request)) + request)
        await self.proc.stdin.drain()
        return await self._read_frame()

    async def _read_frame(self) -> bytes:
        assert self.proc.stdout is not None
        (size,) = _HEADER.unpack(await self.proc.stdout.readexactly(_HEADER.size))
        return await self.proc.stdout.readexactly(size)

    def kill(self) -> None:
        """Kill the worker now; asyncio reaps it."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class DefinitionParser:
    """Parse and validate definitions in at most ``workers`` worker processes, each parse
    bounded by ``timeout_s``."""

    def __init__(self, *, workers: int, timeout_s: float) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self._idle: list[_Worker] = []
        self._slots: asyncio.Semaphore | None = None
        self._reaping: set[asyncio.Task[int]] = set()

    def worker_pids(self) -> list[int]:
        """The idle workers' process ids (for tests and diagnostics)."""
        return [w.proc.pid for w in self._idle if w.alive]

    async def parse(
        self, body: bytes, fmt: str, *, actions: Iterable[str], max_tasks: int
    ) -> WorkflowDefinition:
        """The validated definition of ``body`` (``json``, ``toml`` or ``yaml``), or the
        :class:`DefinitionError` that parsing or validating it raised."""
        request = msgspec.msgpack.encode(ParseRequest(fmt, body, list(actions), max_tasks))
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        async with self._slots:
            worker = await self._take()
            try:
                async with asyncio.timeout(self.timeout_s):
                    raw = await worker.call(request)
            except TimeoutError:
                self._discard(worker)
                raise DefinitionError(
                    f"parsing the {fmt.upper()} definition took longer than {self.timeout_s:g}s "
                    "([gateway] parse_timeout_seconds)",
                    reason="parse_timeout",
                    limit=self.timeout_s,
                ) from None
            except (asyncio.IncompleteReadError, ConnectionError):
                self._discard(worker)
                raise DefinitionError(
                    f"the {fmt.upper()} definition is too complex: its parser ran out of memory "
                    f"({MEMORY_LIMIT >> 20} MiB) or was killed",
                    reason="too_complex",
                    limit=MEMORY_LIMIT,
                ) from None
            except BaseException:  # cancelled mid-parse: what the worker does next is unknown
                self._discard(worker)
                raise
            self._idle.append(worker)
        reply = _decode_reply(raw)
        if reply.internal:
            raise RuntimeError(f"the definition parser failed:\n{reply.internal}")
        if reply.error_message:
            raise DefinitionError(reply.error_message, **reply.error_data)
        return _decode_definition(reply.definition)

    async def _take(self) -> _Worker:
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                return worker
        return await _Worker.spawn()

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        reaper = asyncio.ensure_future(worker.proc.wait())
        self._reaping.add(reaper)
        reaper.add_done_callback(self._reaping.discard)

    async def close(self) -> None:
        """Stop every worker (they also stop by themselves when the parent goes away)."""
        idle, self._idle = self._idle, []
        for worker in idle:
            if worker.proc.stdin is not None:
                worker.proc.stdin.close()  # end of input: the worker exits
        for worker in idle:
            try:
                await asyncio.wait_for(worker.proc.wait(), 2)
            except TimeoutError:
                self._discard(worker)
        if self._reaping:
            await asyncio.wait(self._reaping, timeout=2)


# -- the worker --------------------------------------------------------------------------------


def _worker_limits() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    with contextlib.suppress(OSError, AttributeError):  # die with the gateway, even mid-parse
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _write_frame(out: IO[bytes], data: bytes) -> None:
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def _answer(request: ParseRequest) -> ParseReply:
    from .workflow import parse_definition, validate_definition

    try:
        definition = parse_definition(request.body, request.fmt)
        validate_definition(definition, frozenset(request.actions), max_tasks=request.max_tasks)
        return ParseReply(definition=msgspec.json.encode(definition))
    except DefinitionError as exc:
        return ParseReply(error_message=exc.message, error_data=exc.data)
    except MemoryError:
        return ParseReply(
            error_message=f"the {request.fmt.upper()} definition is too complex: its parser "
            f"ran out of memory ({MEMORY_LIMIT >> 20} MiB)",
            error_data={"task": None, "reason": "too_complex", "limit": MEMORY_LIMIT},
        )
    except Exception:
        return ParseReply(internal=traceback.format_exc(limit=20))


def _main() -> int:  # pragma: no cover - runs in the child
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the gateway is the gateway's
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print cannot garble a frame
    source = sys.stdin.buffer
    from . import workflow  # noqa: F401 - imported before saying ready, not during a parse

    _write_frame(out, _READY)
    while (header := _read_exactly(source, _HEADER.size)) is not None:
        (size,) = _HEADER.unpack(header)
        data = _read_exactly(source, size)
        if data is None:
            break
        request = msgspec.msgpack.decode(data, type=ParseRequest)
        reply = _answer(request)
        del request, data
        _write_frame(out, msgspec.msgpack.encode(reply))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
