"""Authentication on the HTTP API: the gateway's bearer token on every route but /health, the
CLI sending it from configuration or the environment, and per-task capability tokens with which
a running task (a real Nushell subprocess) posts its progress without ever seeing the secret.

One stack with ``PROVISIONING_GATEWAY_AUTH_TOKEN`` set serves the module.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core import NULIB_DIR
from core.runner import resolve_binary

from .support import PROBE_ENV, Stack, read_event_stream, running_stack, wait_until

pytestmark = pytest.mark.e2e

SECRET = "gw-secret-7c1f0e9a"
NOOP = {"id": "a", "action": "builtin.noop"}


def task_token(workflow_id: str, task_id: str, attempt: int, secret: str = SECRET) -> str:
    """The documented derivation, computed independently of shared/auth.py."""
    message = f"{workflow_id}.{task_id}.{attempt}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def call(
    stack: Stack, method: str, path: str, headers: dict[str, Any], body: Any = None
) -> tuple[int, dict[str, str], Any]:
    """One request with exactly these headers (no token added)."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
    try:
        data = json.dumps(body).encode() if body is not None else None
        hdrs = {"Content-Type": "application/json", **headers} if data else dict(headers)
        conn.request(method, path, body=data, headers=hdrs)
        response = conn.getresponse()
        raw = response.read()
        parsed: Any = raw
        if response.getheader("Content-Type", "").startswith("application/json"):
            parsed = json.loads(raw)
        return response.status, dict(response.getheaders()), parsed
    finally:
        conn.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_401(status: int, headers: dict[str, str], body: Any, what: str) -> None:
    assert status == 401, (what, status, body)
    assert body["error"]["code"] == "unauthorized", (what, body)
    assert headers.get("WWW-Authenticate", "").startswith("Bearer"), (what, headers)
    assert SECRET not in json.dumps(body), what


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {**PROBE_ENV, "PROVISIONING_GATEWAY_AUTH_TOKEN": SECRET}
    with running_stack(tmp_path_factory.mktemp("auth"), env=env) as stack:
        yield stack


@pytest.fixture(scope="module")
def finished(authed: Stack) -> str:
    """A completed workflow (with the right token), for the routes that need an id."""
    status, accepted = authed.http.post("/workflows", {"name": "done", "tasks": [NOOP]})
    assert status == 202, accepted
    assert authed.http.wait_workflow(accepted["workflow_id"])["status"] == "completed"
    return str(accepted["workflow_id"])


def routes(wf_id: str) -> list[tuple[str, str, Any]]:
    """Every route but /health, with ids that exist."""
    task = f"{wf_id}.a"
    return [
        ("GET", "/openapi.json", None),
        ("GET", "/workflows", None),
        ("POST", "/workflows", {"name": "x", "tasks": [NOOP]}),
        ("POST", "/workflows/servers/create", {"infra": "nope"}),
        ("POST", "/workflows/taskserv/create", {"infra": "nope"}),
        ("POST", "/workflows/cluster/create", {"infra": "nope"}),
        ("GET", f"/workflows/{wf_id}", None),
        ("GET", f"/workflows/{wf_id}/events", None),
        ("POST", f"/workflows/{wf_id}/cancel", None),
        ("POST", f"/workflows/{wf_id}/retry", None),
        ("GET", f"/tasks/{task}", None),
        ("GET", f"/tasks/{task}/logs", None),
        ("POST", f"/tasks/{task}/progress", {"progress": 5}),
        ("GET", "/executors", None),
        ("GET", "/no-such-route", None),
    ]


def bad_credentials() -> list[tuple[str, dict[str, Any]]]:
    b64 = base64.b64encode(f"user:{SECRET}".encode()).decode()
    return [
        ("no Authorization", {}),
        ("wrong token", bearer("wrong")),
        ("token plus a character", bearer(SECRET + "x")),
        ("token minus a character", bearer(SECRET[:-1])),
        ("token in upper case", bearer(SECRET.upper())),
        ("empty bearer", {"Authorization": "Bearer "}),
        ("scheme only", {"Authorization": "Bearer"}),
        ("no scheme", {"Authorization": SECRET}),
        ("Basic scheme", {"Authorization": f"Basic {b64}"}),
        ("Token scheme", {"Authorization": f"Token {SECRET}"}),
        ("Bearer glued", {"Authorization": f"Bearer{SECRET}"}),
        ("X-Auth-Token header", {"X-Auth-Token": SECRET}),
        ("X-Api-Key header", {"X-Api-Key": SECRET}),
        ("Proxy-Authorization", {"Proxy-Authorization": f"Bearer {SECRET}"}),
        ("cookie", {"Cookie": f"token={SECRET}; auth_token={SECRET}"}),
        ("non-UTF-8 bytes", {"Authorization": b"Bearer \xff\xfe"}),
        ("a task token for another task", bearer(task_token("0" * 32, "a", 1))),
    ]


def test_every_route_but_health_needs_the_token(authed: Stack, finished: str) -> None:
    checked = 0
    for name, headers in bad_credentials():
        for method, path, body in routes(finished):
            status, hdrs, reply = call(authed, method, path, headers, body)
            assert_401(status, hdrs, reply, f"{name}: {method} {path}")
            checked += 1
        for query in (f"?token={SECRET}", f"?access_token={SECRET}", f"?auth_token={SECRET}"):
            status, hdrs, reply = call(authed, "GET", f"/workflows{query}", headers)
            assert_401(status, hdrs, reply, f"{name} with {query}")
            checked += 1
    # /health stays open, and shows nothing secret
    status, _, health = call(authed, "GET", "/health", {})
    assert status == 200 and health["status"] == "healthy"
    # the right token opens every route (the scheme is case-insensitive, RFC 7235)
    for headers in (bearer(SECRET), {"Authorization": f"bearer {SECRET}"}):
        for method, path, body in routes(finished):
            status, _, reply = call(authed, method, path, headers, body)
            assert status != 401, (method, path, reply)
            assert status < 500, (method, path, reply)
    print(f"\nauth: {checked} refused requests")


def test_cli_sends_the_token_from_config_or_environment(
    authed: Stack, finished: str, tmp_path: Path
) -> None:
    no_token = {"PROVISIONING_GATEWAY_AUTH_TOKEN": "", "PROVISIONING_ORCHESTRATOR_AUTH_TOKEN": ""}

    def listed(run: subprocess.CompletedProcess[str]) -> list[str]:
        assert run.returncode == 0, (run.stdout, run.stderr)
        return [w["workflow_id"] for w in json.loads(run.stdout)["workflows"]]

    # none: refused with the API's exit code and a clear message
    run = authed.cli("workflow", "list", "--output", "json", env=no_token)
    assert run.returncode == 4, (run.stdout, run.stderr)
    assert "missing or invalid bearer token" in run.stderr
    # a wrong one
    run = authed.cli(
        "workflow",
        "status",
        finished,
        env={**no_token, "PROVISIONING_ORCHESTRATOR_AUTH_TOKEN": "x"},
    )
    assert run.returncode == 4 and "bearer token" in run.stderr, (run.stdout, run.stderr)
    # [orchestrator] auth_token from the environment
    env = {**no_token, "PROVISIONING_ORCHESTRATOR_AUTH_TOKEN": SECRET}
    assert finished in listed(authed.cli("workflow", "list", "--output", "json", env=env))
    # from a configuration file
    config = tmp_path / "config.toml"
    config.write_text(f'[orchestrator]\nauth_token = "{SECRET}"\n')
    env = {**no_token, "PROVISIONING_CONFIG": str(config)}
    env.pop("PROVISIONING_ORCHESTRATOR_AUTH_TOKEN")
    assert finished in listed(authed.cli("workflow", "list", "--output", "json", env=env))
    # falling back to [gateway] auth_token (an operator on the gateway's host)
    run = authed.cli("workflow", "list", "--output", "json")
    assert finished in listed(run)
    # a whole submission with --wait (POST, then polling and the event stream)
    definition = tmp_path / "w.json"
    definition.write_text(json.dumps({"name": "cli-auth", "tasks": [NOOP]}))
    env = {**no_token, "PROVISIONING_ORCHESTRATOR_AUTH_TOKEN": SECRET}
    run = authed.cli("workflow", "submit", str(definition), "--wait", "--output", "json", env=env)
    assert run.returncode == 0, (run.stdout, run.stderr)
    assert json.loads(run.stdout)["status"] == "completed"
    # the health check needs no token
    run = authed.cli("health", "--output", "json", env=no_token)
    assert run.returncode == 0, (run.stdout, run.stderr)
    for run_output in (run.stdout, run.stderr):
        assert SECRET not in run_output


def test_tasks_post_progress_with_their_own_token_only(authed: Stack) -> None:
    tasks = [
        {"id": "probe", "action": "probe.env"},
        {"id": "posted", "action": "probe.progress", "args": {"hold_seconds": 0}},
        {"id": "hold", "action": "builtin.sleep", "args": {"seconds": 120}},
    ]
    status, accepted = authed.http.post("/workflows", {"name": "tokens", "tasks": tasks})
    assert status == 202, accepted
    wf_id = accepted["workflow_id"]
    wait_until(
        lambda: all(
            authed.http.get(f"/tasks/{wf_id}.{t}")[1]["status"] == "completed"
            for t in ("probe", "posted")
        ),
        120,
        what="the probe tasks",
    )
    view = authed.http.get(f"/workflows/{wf_id}")[1]
    by_id = {t["id"]: t for t in view["tasks"]}
    assert by_id["hold"]["status"] == "running", by_id["hold"]

    # the task got its capability token, not the secret
    environ = by_id["probe"]["output"]["environ"]
    env = dict(item.split("=", 1) for item in environ)
    own = env["PROVISIONING_TASK_TOKEN"]
    assert own == task_token(wf_id, "probe", 1)
    assert SECRET not in "\n".join(environ)
    assert "PROVISIONING_AUTH_TOKEN" not in env and "PROVISIONING_GATEWAY_AUTH_TOKEN" not in env

    # a real Nushell task posted its progress over HTTP with it (client.nu report-progress)
    assert by_id["posted"]["output"] == {"posted": True}, by_id["posted"]

    # the token opens POST /tasks/<its task>/progress, and nothing else
    hold = f"/tasks/{wf_id}.hold/progress"
    status, hdrs, body = call(authed, "POST", hold, bearer(own), {"progress": 5})
    assert_401(status, hdrs, body, "another task's progress")
    for method, path, payload in routes(wf_id):
        if path.endswith("/progress"):
            continue
        status, hdrs, body = call(authed, method, path, bearer(own), payload)
        assert_401(status, hdrs, body, f"task token on {method} {path}")
    status, hdrs, body = call(authed, "GET", f"/tasks/{wf_id}.probe", bearer(own))
    assert_401(status, hdrs, body, "task token reading its own task")
    # on its own (finished) task it is accepted as a credential; the task is over: 409
    status, _, body = call(
        authed, "POST", f"/tasks/{wf_id}.probe/progress", bearer(own), {"progress": 1}
    )
    assert status == 409, body

    # the running task: its token for the current attempt works, no other one does
    status, _, body = call(
        authed,
        "POST",
        hold,
        bearer(task_token(wf_id, "hold", 1)),
        {"progress": 33, "message": "via task token"},
    )
    assert status == 202, body
    assert authed.http.get(f"/tasks/{wf_id}.hold")[1]["progress"] == 33
    for what, token in (
        ("next attempt", task_token(wf_id, "hold", 2)),
        ("attempt 0", task_token(wf_id, "hold", 0)),
        ("another workflow", task_token("f" * 32, "hold", 1)),
        ("another secret", task_token(wf_id, "hold", 1, secret="not-the-secret")),
        ("upper-case hex", task_token(wf_id, "hold", 1).upper()),
    ):
        status, hdrs, body = call(authed, "POST", hold, bearer(token), {"progress": 34})
        assert_401(status, hdrs, body, what)
    status, _ = authed.http.post(f"/workflows/{wf_id}/cancel")
    assert status == 202
    assert authed.http.wait_workflow(wf_id)["status"] == "cancelled"
    # the event stream (complete now) has the progress the Nushell task posted over HTTP
    assert (42, "posted over HTTP") in _progress_events(authed, wf_id, "posted")
    assert (33, "via task token") in _progress_events(authed, wf_id, "hold")


def _progress_events(stack: Stack, wf_id: str, task_id: str) -> list[tuple[int, str]]:
    """Progress events of one task, read from the events stream of a finished workflow."""
    events = read_event_stream(f"{stack.http.base}/workflows/{wf_id}/events", token=SECRET)
    return [
        (e.data["percent"], e.data.get("message", ""))
        for e in events
        if e.event == "progress" and e.data["task_id"] == task_id
    ]


def test_client_nu_falls_back_to_provisioning_auth_token(authed: Stack) -> None:
    """report-progress outside an executor: PROVISIONING_TASK_TOKEN wins, else
    PROVISIONING_AUTH_TOKEN is sent; without either the gateway refuses it (false)."""
    status, accepted = authed.http.post(
        "/workflows",
        {
            "name": "nu",
            "tasks": [{"id": "hold", "action": "builtin.sleep", "args": {"seconds": 60}}],
        },
    )
    assert status == 202, accepted
    wf_id = accepted["workflow_id"]
    wait_until(
        lambda: authed.http.get(f"/tasks/{wf_id}.hold")[1]["status"] == "running",
        60,
        what="hold to run",
    )
    nu = resolve_binary("nu")
    script = "use lib_provisioning/orchestrator/client.nu [report-progress]; report-progress 7 hi"
    base = {
        "PATH": "/usr/bin:/bin",
        "NU_LIB_DIRS": str(NULIB_DIR),
        "PROVISIONING_GATEWAY_URL": authed.http.base,
        "PROVISIONING_TASK_ID": f"{wf_id}.hold",
    }

    def posted(**env: str) -> str:
        run = subprocess.run(
            [nu, "-n", "--no-std-lib", "-c", script],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout.strip().splitlines()[-1]

    assert posted() == "false"
    assert posted(PROVISIONING_AUTH_TOKEN=SECRET) == "true"
    assert posted(PROVISIONING_TASK_TOKEN=task_token(wf_id, "hold", 1)) == "true"
    assert posted(PROVISIONING_TASK_TOKEN="wrong", PROVISIONING_AUTH_TOKEN=SECRET) == "false"
    authed.http.post(f"/workflows/{wf_id}/cancel")
    assert authed.http.wait_workflow(wf_id)["status"] == "cancelled"
