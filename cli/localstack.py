"""The local orchestrator the CLI starts and stops: ``provisioning-orchestrator up`` detached,
its pidfile and logs under the data directory, and one way to wait until it is healthy."""

from __future__ import annotations

import os
import signal
import time

from shared import localstack
from shared.api_client import ApiClient, OrchestratorUnavailable
from shared.config import Config

__all__ = ["running_pid", "start_background", "stop_background", "wait_healthy"]

POLL_S = 0.5


def running_pid(config: Config) -> int | None:
    """The pid of the local stack this data directory's pidfile names, if it is alive."""
    return localstack.running_pid(config.data_dir)


def start_background(config: Config) -> int:
    """Start ``provisioning-orchestrator up`` detached; pidfile and logs under the data dir."""
    args = ["--nats-port", "0", *localstack.port_args(config.orchestrator.endpoint)]
    return localstack.start_detached(config.data_dir, *args)


def stop_background(config: Config, timeout_s: float = 60) -> bool:
    """SIGTERM the local stack and wait for it to be gone; False if it would not stop."""
    pid = running_pid(config)
    if not pid:
        return True
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and running_pid(config):
        time.sleep(0.2)
    if running_pid(config):
        return False
    localstack.pidfile(config.data_dir).unlink(missing_ok=True)
    return True


def wait_healthy(client: ApiClient, timeout_s: float) -> bool:
    """Whether the orchestrator answers healthy within ``timeout_s`` (asked every half second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.health().get("status") == "healthy":
                return True
        except OrchestratorUnavailable:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
