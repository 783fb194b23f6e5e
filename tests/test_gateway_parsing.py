"""Definitions are parsed off the gateway's event loop, bounded in size per format and in time:
a hostile body gets a clear 413 or 422 while ``/health`` keeps answering at once.

Two gateways on one NATS, no scheduler (submissions only need JetStream's ack): one with the
default size bounds and a roomy time bound (30 s: two cores shared with other test runs must not
turn the 19,000-task YAML, about 2.5 s of CPU, into a timeout), one whose time bound is half a
second."""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.gateway.app import INLINE_JSON_MAX_BYTES

from .support import Http, NatsServer, Service, Stack, free_port, wait_until

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
HEALTH_BOUND_S = 1.0  # the slowest /health answer allowed while a hostile body is parsed
STRICT_TIMEOUT_S = 0.5
ROOMY_TIMEOUT_S = 30.0


@dataclass
class Gateways:
    default: Service  # the default bounds but for a roomy parse_timeout_seconds
    default_http: Http
    strict: Service  # [gateway] parse_timeout_seconds = STRICT_TIMEOUT_S
    strict_http: Http


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    tmp = tmp_path_factory.mktemp("parsing")
    nats = NatsServer(tmp / "nats").start()
    roomy = {"PROVISIONING_GATEWAY_PARSE_TIMEOUT_SECONDS": str(ROOMY_TIMEOUT_S)}
    stack = Stack(tmp, nats, env=roomy)  # for its environment: only gateways are started
    strict_port = free_port()
    strict_env = {
        **stack.env,
        "PROVISIONING_GATEWAY_PORT": str(strict_port),
        "PROVISIONING_GATEWAY_PARSE_TIMEOUT_SECONDS": str(STRICT_TIMEOUT_S),
    }
    strict = Service("gateway-strict", ["gateway"], strict_env, stack.log_dir)
    services = [stack.gateway.start(), strict.start()]
    try:
        found = Gateways(stack.gateway, stack.http, strict, Http(f"http://127.0.0.1:{strict_port}"))
        found.default_http.wait_healthy(60)
        found.strict_http.wait_healthy(60)
        yield found
        for service in services:
            assert service.alive, service.log()[-3000:]
            assert "Traceback" not in service.log(), service.log()[-5000:]
    finally:
        for service in services:
            service.stop()
        nats.stop()


def post(port: int, body: bytes, content_type: str, timeout: float = 120) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/workflows", body, {"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def port_of(http_client: Http) -> int:
    return int(http_client.base.rsplit(":", 1)[1])


def while_health_is_polled(http_client: Http, action: Callable[[], Any]) -> tuple[Any, list[float]]:
    """Run ``action`` while another thread asks ``/health`` again and again; its result and
    the latency of every ``/health`` answer (fresh connection each)."""
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            started = time.monotonic()
            status, _ = http_client.get("/health", timeout=60)
            latencies.append(time.monotonic() - started)
            assert status == 200
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.1)  # a few answers before the action
    try:
        result = action()
    finally:
        done.set()
        poller.join()
    return result, latencies


def describe(latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    return f"/health n={len(ms)} median {statistics.median(ms):.1f} ms max {ms[-1]:.1f} ms"


def zeros_yaml(count: int) -> bytes:
    """One task whose arguments hold a flow list of ``count`` zeros (the issue's hostile body)."""
    head = b"name: zeros\ntasks:\n- id: a\n  action: builtin.noop\n  args:\n    z: ["
    return head + b"0, " * count + b"0]\n"


def tasks_yaml(count: int, size: int) -> bytes:
    """A chain of ``count`` tasks, padded to about ``size`` bytes."""

    def source(pad: str) -> bytes:
        lines = ["name: many", "tasks:"]
        for i in range(count):
            deps = f"\n  depends_on: [t{i - 1}]" if i else ""
            args = f"{{index: {i}, note: n{pad}}}"
            lines.append(f"- id: t{i}\n  action: builtin.noop\n  args: {args}{deps}")
        return ("\n".join(lines) + "\n").encode()

    return source("x" * max(0, (size - len(source(""))) // count))


def parser_workers(gateway: Service) -> list[int]:
    """The gateway's definition parser processes."""
    assert gateway.proc is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == gateway.proc.pid and b"shared.parsing" in cmdline:
            found.append(int(entry.name))
    return found


def test_small_json_is_parsed_in_the_gateway_and_the_rest_by_its_parsers(
    gateways: Gateways,
) -> None:
    """The cheap common case costs no round trip; a parser process starts on first use and is
    kept for the next definitions (never more of them than [gateway] parse_workers).
    (The first test of the module: no other has made the gateway start a parser yet.)"""
    http_client, gateway = gateways.default_http, gateways.default
    port = port_of(http_client)
    small = {"name": "small", "tasks": [{"id": "a", "action": "builtin.noop"}]}
    padded = {
        "name": "padded",
        "tasks": [
            {"id": f"t{i}", "action": "builtin.noop", "args": {"pad": "p" * 100}}
            for i in range(200)
        ],
    }
    cases = [
        ("small JSON", json.dumps(small).encode(), "application/json"),
        ("small YAML", b"name: s\ntasks:\n- {id: a, action: builtin.noop}\n", "application/yaml"),
        (
            "small TOML",
            b'name = "s"\n[[tasks]]\nid = "a"\naction = "builtin.noop"\n',
            "application/toml",
        ),
        ("JSON of 200 tasks", json.dumps(padded).encode(), "application/json"),
    ]
    assert len(cases[0][1]) <= INLINE_JSON_MAX_BYTES < len(cases[3][1])
    timings = {}
    for label, body, content_type in cases:
        samples = []
        for _ in range(5):
            started = time.monotonic()
            status, reply = post(port, body, content_type)
            samples.append((time.monotonic() - started) * 1000)
            assert status == 202, (label, reply)
        timings[label] = (
            f"first {samples[0]:.1f} ms, then median {statistics.median(samples[1:]):.1f} ms"
        )
        if label == "small JSON":
            assert parser_workers(gateway) == []
    assert 1 <= len(parser_workers(gateway)) <= 2
    print(f"\nPOST /workflows (202: JetStream's ack included): {timings}")


def test_the_issues_39_mb_yaml_list_of_zeros_is_refused_at_once_while_health_answers(
    gateways: Gateways,
) -> None:
    body = zeros_yaml(1_300_000)
    assert 3_800_000 < len(body) < 4 * MiB  # under max_body_bytes, as in the issue
    started = time.monotonic()
    (status, reply), latencies = while_health_is_polled(
        gateways.default_http,
        lambda: post(port_of(gateways.default_http), body, "application/yaml"),
    )
    took = time.monotonic() - started
    print(f"\n3.9 MB YAML of zeros: {status} in {took:.2f}s; {describe(latencies)}")
    assert status == 413, reply
    assert reply["error"]["details"] == {"limit": 2 * MiB, "format": "yaml"}
    assert "max_yaml_bytes" in reply["error"]["message"]
    assert took < 5
    assert max(latencies) < HEALTH_BOUND_S


def test_a_yaml_slower_than_the_time_bound_is_refused_and_its_parser_killed(
    gateways: Gateways,
) -> None:
    body = zeros_yaml(650_000)  # under max_yaml_bytes; seconds of parsing
    assert len(body) < 2 * MiB
    port = port_of(gateways.strict_http)
    started = time.monotonic()
    (status, reply), latencies = while_health_is_polled(
        gateways.strict_http, lambda: post(port, body, "application/yaml")
    )
    took = time.monotonic() - started
    print(
        f"\n1.9 MB YAML of zeros, {STRICT_TIMEOUT_S}s bound: {status} in {took:.2f}s; "
        f"{describe(latencies)}"
    )
    assert status == 422, reply
    assert reply["error"]["details"]["reason"] == "parse_timeout"
    assert reply["error"]["details"]["limit"] == STRICT_TIMEOUT_S
    assert "parse_timeout_seconds" in reply["error"]["message"]
    assert took < 5
    assert max(latencies) < HEALTH_BOUND_S
    wait_until(lambda: not parser_workers(gateways.strict), 10, what="the parser killed")
    # the next definition gets a fresh parser
    small = b"name: after\ntasks:\n- {id: a, action: builtin.noop}\n"
    status, reply = post(port, small, "application/yaml")
    assert status == 202, reply


def test_a_2_mb_yaml_of_19000_tasks_is_accepted_without_stalling_health(
    gateways: Gateways,
) -> None:
    body = tasks_yaml(19_000, 2_000_000)
    assert 1_900_000 < len(body) <= 2 * MiB, len(body)
    started = time.monotonic()
    (status, reply), latencies = while_health_is_polled(
        gateways.default_http,
        lambda: post(port_of(gateways.default_http), body, "application/yaml"),
    )
    took = time.monotonic() - started
    print(f"\n{len(body)} B YAML of 19,000 tasks: {status} in {took:.2f}s; {describe(latencies)}")
    assert status == 202, reply
    assert reply["tasks"] == 19_000
    assert max(latencies) < HEALTH_BOUND_S


def test_a_json_of_20000_tasks_is_accepted_without_stalling_health(gateways: Gateways) -> None:
    tasks = [
        {"id": f"t{i}", "action": "builtin.noop", "depends_on": [f"t{i - 1}"] if i else []}
        for i in range(20_000)
    ]
    body = json.dumps({"name": "many", "tasks": tasks}).encode()
    started = time.monotonic()
    (status, reply), latencies = while_health_is_polled(
        gateways.default_http,
        lambda: post(port_of(gateways.default_http), body, "application/json"),
    )
    took = time.monotonic() - started
    print(f"\n{len(body)} B JSON of 20,000 tasks: {status} in {took:.2f}s; {describe(latencies)}")
    assert status == 202, reply
    assert max(latencies) < HEALTH_BOUND_S


@pytest.mark.parametrize(
    ("content_type", "fmt", "limit", "filler"),
    [
        ("application/yaml", "yaml", 2 * MiB, b"#"),
        ("application/toml", "toml", 2 * MiB, b"#"),
        ("application/x-nickel", "nickel", 1 * MiB, b" "),
    ],
)
def test_each_format_has_its_own_size_bound(
    gateways: Gateways, content_type: str, fmt: str, limit: int, filler: bytes
) -> None:
    port = port_of(gateways.default_http)
    status, reply = post(port, filler * (limit + 1), content_type)
    assert status == 413, reply
    assert reply["error"]["code"] == "payload_too_large"
    assert reply["error"]["details"] == {"limit": limit, "format": fmt}
