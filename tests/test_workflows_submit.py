"""Submission: four formats by Content-Type, validation before anything is queued, the CLI's
``workflow submit`` and ``batch submit`` with the seed's Example 3 in every format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .support import Stack, stream_state

pytestmark = pytest.mark.e2e

WORKFLOWS = Path(__file__).resolve().parent.parent / "core" / "workflows"

SMALL = {
    "json": (
        "application/json",
        json.dumps(
            {
                "name": "small-json",
                "tasks": [
                    {"id": "a", "action": "builtin.noop"},
                    {"id": "b", "action": "builtin.noop", "depends_on": ["a"]},
                ],
            }
        ),
    ),
    "toml": (
        "application/toml",
        """
name = "small-toml"
[[tasks]]
id = "a"
action = "builtin.noop"
[[tasks]]
id = "b"
action = "builtin.noop"
depends_on = ["a"]
""",
    ),
    "yaml": (
        "application/x-yaml; charset=utf-8",
        """
name: small-yaml
tasks:
  - {id: a, action: builtin.noop}
  - {id: b, action: builtin.noop, depends_on: [a]}
""",
    ),
    "nickel": (
        "application/x-nickel",
        """
let w = import "workflow.ncl" in
{
  name = "small-nickel",
  tasks = [
    { id = "a", action = "builtin.noop" },
    { id = "b", action = "builtin.noop", depends_on = ["a"] },
  ],
} | w.Workflow
""",
    ),
}


def test_post_workflows_takes_json_toml_yaml_and_nickel(stack: Stack) -> None:
    accepted = {}
    for fmt, (content_type, body) in SMALL.items():
        status, reply = stack.http.post(
            "/workflows", raw=body.encode(), headers={"Content-Type": content_type}
        )
        assert status == 202, (fmt, reply)
        assert reply["status"] == "queued" and reply["tasks"] == 2
        accepted[fmt] = reply["workflow_id"]
    for fmt, wf_id in accepted.items():
        view = stack.http.wait_workflow(wf_id)
        assert view["status"] == "completed", view
        assert view["name"] == f"small-{fmt}"
        assert view["source"] == f"api:{fmt}"
        assert [t["id"] for t in view["tasks"]] == ["a", "b"]
    status, reply = stack.http.post(
        "/workflows", raw=b"name: x", headers={"Content-Type": "text/plain"}
    )
    assert status == 415, reply
    assert "JSON, TOML, YAML or Nickel" in reply["error"]["message"]


def _task(task_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": task_id, "action": "builtin.noop", **fields}


REJECTED: list[tuple[str, int, Any, str, str | None, str]] = [
    # (case, status, body, reason, task, words in the message)
    (
        "cycle",
        422,
        {
            "name": "c",
            "tasks": [
                _task("a", depends_on=["c"]),
                _task("b", depends_on=["a"]),
                _task("c", depends_on=["b"]),
            ],
        },
        "cycle",
        "a",
        "dependency cycle: a -> b -> c -> a",
    ),
    (
        "unknown dependency",
        422,
        {"name": "u", "tasks": [_task("a"), _task("b", depends_on=["a", "zz"])]},
        "unknown_dependency",
        "b",
        "task 'b' depends on unknown task 'zz'",
    ),
    (
        "duplicate id",
        422,
        {"name": "d", "tasks": [_task("a"), _task("b"), _task("a")]},
        "duplicate_id",
        "a",
        "duplicate task id 'a'",
    ),
    (
        "unknown action",
        422,
        {"name": "x", "tasks": [_task("a"), {"id": "b", "action": "server.teleport"}]},
        "unknown_action",
        "b",
        "task 'b': unknown action 'server.teleport'",
    ),
    (
        "wrong field type",
        422,
        {"name": "w", "tasks": [_task("a"), _task("b", retries="three")]},
        "wrong_field",
        "b",
        "Expected `int`, got `str` - at `$.tasks[1].retries`",
    ),
    (
        "unknown field",
        422,
        {"name": "w", "tasks": [_task("a", retry=3)]},
        "wrong_field",
        "a",
        "unknown field `retry`",
    ),
    ("empty workflow", 422, {"name": "e", "tasks": []}, "empty", None, "no tasks"),
    (
        "too many tasks",
        422,
        {"name": "big", "tasks": [_task(f"t{i}") for i in range(51)]},
        "too_many_tasks",
        None,
        "51 tasks; the limit is 50",
    ),
]


@pytest.mark.stack(
    env={
        "PROVISIONING_GATEWAY_MAX_TASKS_PER_WORKFLOW": "50",
        "PROVISIONING_GATEWAY_MAX_BODY_BYTES": "65536",
    }
)
def test_invalid_definitions_are_refused_and_queue_nothing(
    stack: Stack, subtests: pytest.Subtests
) -> None:
    before = stream_state(stack.nats.url, "PROV_COMMANDS")
    for case, status, body, reason, task, words in REJECTED:
        with subtests.test(case):
            got, reply = stack.http.post("/workflows", body)
            assert got == status, reply
            error = reply["error"]
            assert error["code"] == "invalid_definition", error
            assert error["details"]["reason"] == reason, error
            assert error["details"]["task"] == task, error
            assert words in error["message"], error["message"]

    with subtests.test("cycle in Nickel, TOML and YAML too"):
        sources = {
            "application/x-nickel": '{ name = "c", tasks = [ { id = "a", action = "builtin.noop",'
            ' depends_on = ["b"] }, { id = "b", action = "builtin.noop", depends_on = ["a"] } ] }',
            "application/toml": 'name = "c"\n[[tasks]]\nid = "a"\naction = "builtin.noop"\n'
            'depends_on = ["b"]\n[[tasks]]\nid = "b"\naction = "builtin.noop"\n'
            'depends_on = ["a"]\n',
            "application/yaml": "name: c\ntasks:\n- {id: a, action: builtin.noop, depends_on: [b]}"
            "\n- {id: b, action: builtin.noop, depends_on: [a]}\n",
        }
        for content_type, source in sources.items():
            got, reply = stack.http.post(
                "/workflows", raw=source.encode(), headers={"Content-Type": content_type}
            )
            assert got == 422, (content_type, reply)
            assert reply["error"]["message"] == "dependency cycle: a -> b -> a", reply

    with subtests.test("Nickel contract: Nickel's own error"):
        source = (
            'let w = import "workflow.ncl" in { name = "n", tasks = [ { id = "a",'
            ' action = "builtin.noop", timeout_seconds = "soon" } ] } | w.Workflow'
        )
        got, reply = stack.http.post(
            "/workflows", raw=source.encode(), headers={"Content-Type": "application/x-nickel"}
        )
        assert got == 422, reply
        assert reply["error"]["details"]["reason"] == "nickel_error"
        message = reply["error"]["message"]
        assert "contract broken by the value of `timeout_seconds`" in message, message
        assert 'timeout_seconds = "soon"' in message  # the excerpt of the source

    with subtests.test("body too large"):
        padding = "x" * 70_000
        got, reply = stack.http.post(
            "/workflows", {"name": "p", "description": padding, "tasks": [_task("a")]}
        )
        assert got == 413, reply
        assert reply["error"]["code"] == "payload_too_large"

    with subtests.test("malformed bodies"):
        for content_type, raw in (
            ("application/json", b'{"name": "x", "tasks": ['),
            ("application/toml", b"name = \n"),
            ("application/yaml", b"name: [x\n"),
        ):
            got, reply = stack.http.post(
                "/workflows", raw=raw, headers={"Content-Type": content_type}
            )
            assert got == 400, (content_type, reply)

    after = stream_state(stack.nats.url, "PROV_COMMANDS")
    assert after["last_seq"] == before["last_seq"], (before, after)
    status, page = stack.http.get("/workflows")
    assert status == 200 and page["workflows"] == []

    # and the same gateway does queue a valid workflow: the checks above can see a change
    status, reply = stack.http.post("/workflows", {"name": "ok", "tasks": [_task("a")]})
    assert status == 202, reply
    assert stream_state(stack.nats.url, "PROV_COMMANDS")["last_seq"] == before["last_seq"] + 1


def _times(view: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {t["id"]: (t["started_at"], t["finished_at"]) for t in view["tasks"]}


def _check_example3(view: dict[str, Any], *, first_run: bool) -> None:
    assert view["status"] == "completed", json.dumps(view, indent=2)
    tasks = {t["id"]: t for t in view["tasks"]}
    assert len(tasks) == 12
    times = _times(view)
    hosts = [f"ex3-srv-{i}" for i in range(1, 6)]
    servers = [f"server-{h}" for h in hosts]
    kubernetes = [f"kubernetes-{h}" for h in hosts]
    for host, server, k8s in zip(hosts, servers, kubernetes, strict=True):
        assert tasks[server]["output"]["hostname"] == host
        assert tasks[server]["output"]["existed"] is not first_run
        assert tasks[k8s]["output"]["taskserv"] == "kubernetes"
        assert tasks[k8s]["output"]["server"] == host
        assert times[k8s][0] >= times[server][1]  # after its own server
    # the five servers ran at the same time
    assert max(times[s][0] for s in servers) < min(times[s][1] for s in servers), times
    assert times["cluster"][0] >= max(times[k][1] for k in kubernetes)
    assert tasks["cluster"]["output"]["servers"] == hosts
    assert times["deploy-app"][0] >= times["cluster"][1]
    assert tasks["deploy-app"]["output"]["state"] == "deployed"
    assert all(t["attempt"] == 1 and t["exit_code"] == 0 for t in tasks.values())


def test_cli_submits_example3_in_every_format(stack: Stack) -> None:
    runs = [
        ("workflow", "submit", "example3.ncl"),
        ("batch", "submit", "example3.toml"),
        ("batch", "submit", "example3.yaml"),
        ("workflow", "submit", "example3.json"),
    ]
    for index, (group, command, name) in enumerate(runs):
        run = stack.cli(group, command, str(WORKFLOWS / name), "--wait", "--output", "json")
        assert run.returncode == 0, (name, run.stdout, run.stderr)
        view = json.loads(run.stdout)
        assert view["name"] == "example3"
        assert view["source"] == f"api:{'nickel' if name.endswith('.ncl') else name[-4:]}"
        _check_example3(view, first_run=index == 0)

    # without --wait: the id at once, then `batch monitor` follows it to the end
    run = stack.cli("batch", "submit", str(WORKFLOWS / "example3.yaml"), "--output", "json")
    assert run.returncode == 0, run.stderr
    accepted = json.loads(run.stdout)
    assert accepted["status"] == "queued" and accepted["tasks"] == 12
    monitor = stack.cli("batch", "monitor", accepted["workflow_id"], "--output", "json")
    assert monitor.returncode == 0, monitor.stderr
    _check_example3(json.loads(monitor.stdout), first_run=False)

    # a file the gateway refuses: a clear error and a distinct exit code, nothing queued
    count = len(stack.http.get("/workflows?limit=100")[1]["workflows"])
    bad = stack.tmp / "bad.yaml"
    bad.write_text("name: bad\ntasks:\n- {id: a, action: builtin.noop, depends_on: [a]}\n")
    run = stack.cli("workflow", "submit", str(bad))
    assert run.returncode == 4, (run.stdout, run.stderr)
    assert "task 'a' depends on itself" in run.stderr
    assert len(stack.http.get("/workflows?limit=100")[1]["workflows"]) == count


def test_a_submission_waiting_for_the_scheduler_shows_as_queued(stack: Stack) -> None:
    assert stack.scheduler.stop() == 0
    status, accepted = stack.http.post(
        "/workflows",
        {"name": "waits", "tasks": [{"id": f"t{i}", "action": "builtin.noop"} for i in range(3)]},
    )
    assert status == 202
    wf_id = accepted["workflow_id"]
    # the summary comes from what the gateway remembers of the submission it accepted
    status, summary = stack.http.get(f"/workflows/{wf_id}?tasks=false")
    assert status == 200 and "tasks" not in summary
    assert summary["status"] == "queued" and summary["tasks_total"] == 3
    assert summary["counts"] == {"pending": 3} and summary["progress"] == 0
    # the whole view reads the submission back from the queue
    status, view = stack.http.get(f"/workflows/{wf_id}")
    assert status == 200 and view["status"] == "queued"
    assert [(t["id"], t["status"]) for t in view["tasks"]] == [
        (f"t{i}", "pending") for i in range(3)
    ]
    assert stack.http.get("/workflows/" + "0" * 32 + "?tasks=false")[0] == 404

    stack.scheduler.start()
    assert stack.http.wait_workflow(wf_id)["status"] == "completed"
    status, summary = stack.http.get(f"/workflows/{wf_id}?tasks=false")
    assert summary["status"] == "completed" and summary["counts"] == {"completed": 3}
