"""Workflow definitions without a stack: the four formats, the Nickel contract, the DAG checks.

Everything here runs the real parsers and the real Nickel evaluator (in its child process)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from core.registry import load_registry
from shared.errors import DefinitionError
from shared.messages import WorkflowDefinition
from shared.nickel_source import SCHEMAS_DIR, evaluate_nickel
from shared.workflow import definition_from_data, parse_definition, validate_definition

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "core" / "workflows"
NULIB = ROOT / "core" / "nulib"


def nickel(source: str) -> WorkflowDefinition:
    return definition_from_data(json.loads(asyncio.run(evaluate_nickel(source.encode()))))


def nickel_error(source: str) -> str:
    with pytest.raises(DefinitionError) as caught:
        nickel(source)
    assert caught.value.reason == "nickel_error", caught.value.message
    return caught.value.message


def load(fmt: str) -> WorkflowDefinition:
    if fmt == "ncl":
        return nickel((WORKFLOWS / "example3.ncl").read_text())
    return parse_definition((WORKFLOWS / f"example3.{fmt}").read_bytes(), fmt)


def test_example3_is_the_same_workflow_in_all_four_formats() -> None:
    definitions = {fmt: load(fmt) for fmt in ("ncl", "toml", "yaml", "json")}
    assert definitions["ncl"] == definitions["toml"] == definitions["yaml"] == definitions["json"]
    validate_definition(definitions["ncl"], load_registry(), max_tasks=100)


def test_example3_is_the_seeds_batch_workflow() -> None:
    wf = load("ncl")
    by_id = {t.id: t for t in wf.tasks}
    hosts = [f"ex3-srv-{i}" for i in range(1, 6)]
    servers = [t for t in wf.tasks if t.action == "server.create"]
    kubernetes = [t for t in wf.tasks if t.action == "taskserv.create"]
    # five servers in parallel: nothing before them
    assert [t.args for t in servers] == [
        {"infra": "wuji", "server": {"hostname": h}} for h in hosts
    ]
    assert all(not t.depends_on for t in servers)
    # Kubernetes on each, after its own server only (taskserv.create needs the server)
    assert [t.args for t in kubernetes] == [
        {"infra": "wuji", "taskserv": "kubernetes", "server": h} for h in hosts
    ]
    for host, task in zip(hosts, kubernetes, strict=True):
        (dep,) = task.depends_on
        assert by_id[dep].args["server"]["hostname"] == host
    # the cluster over the five, after Kubernetes on all of them; then the app on it
    cluster = by_id["cluster"]
    assert cluster.action == "cluster.create"
    assert cluster.args == {"infra": "wuji", "cluster": {"name": "ex3-k8s", "servers": hosts}}
    assert sorted(cluster.depends_on) == sorted(t.id for t in kubernetes)
    app = by_id["deploy-app"]
    assert app.action == "app.deploy"
    assert app.args == {"infra": "wuji", "cluster": "ex3-k8s", "app": "web"}
    assert app.depends_on == ["cluster"]


def test_example3_args_are_the_ones_the_nushell_actions_read() -> None:
    """The argument names of each action, as documented and read in core/nulib/*/mod.nu."""
    sources = {
        "server.create": (NULIB / "servers" / "mod.nu").read_text(),
        "taskserv.create": (NULIB / "taskservs" / "mod.nu").read_text(),
        "cluster.create": (NULIB / "clusters" / "mod.nu").read_text(),
        "app.deploy": (NULIB / "clusters" / "mod.nu").read_text(),
    }
    for task in load("ncl").tasks:
        source = sources[task.action]
        for key in task.args:
            assert f"$args.{key}?" in source, (task.id, key)
        for key in task.args.get("server", {}) if task.action == "server.create" else ():
            assert f"$server.{key}?" in source, (task.id, key)
        for key in task.args.get("cluster", {}) if task.action == "cluster.create" else ():
            assert f"$cluster.{key}?" in source, (task.id, key)


def test_nickel_contract_accepts_every_field() -> None:
    wf = nickel(
        """
        let w = import "workflow.ncl" in
        {
          name = "all-fields",
          description = "every field of the schema",
          priority = 5,
          on_failure = "continue",
          tasks = [
            { id = "a", action = "builtin.noop" },
            {
              id = "b",
              action = "builtin.sleep",
              args = { seconds = 0.1 },
              depends_on = ["a"],
              priority = -3,
              retries = 2,
              backoff = { initial_seconds = 0.5, multiplier = 3, max_seconds = 4 },
              timeout_seconds = 10,
              pool = "default",
            },
          ],
        } | w.Workflow
        """
    )
    assert wf.on_failure == "continue" and wf.priority == 5
    b = wf.tasks[1]
    assert (b.priority, b.retries, b.timeout_seconds, b.depends_on) == (-3, 2, 10, ["a"])
    assert (b.backoff.initial_seconds, b.backoff.multiplier, b.backoff.max_seconds) == (0.5, 3, 4)


@pytest.mark.parametrize(
    ("task", "field", "expected"),
    [
        (
            '{ id = "a", action = "builtin.noop", retries = "3" }',
            "retries",
            "integer within 0..100",
        ),
        ('{ id = "a b", action = "builtin.noop" }', "id", "expected a name"),
        ('{ id = "a", action = "Builtin Noop" }', "action", "expected an action name"),
        ('{ id = "a", action = "builtin.noop", priority = 1.5 }', "priority", "integer priority"),
        ('{ id = "a", action = "builtin.noop", depends_on = "b" }', "depends_on", "Array"),
        ('{ id = "a", action = "builtin.noop", timeout_seconds = 0 }', "timeout_seconds", "more"),
        (
            '{ id = "a", action = "builtin.noop", backoff = { multiplier = 0.5 } }',
            "multiplier",
            "within 1..10",
        ),
    ],
)
def test_nickel_contract_reports_the_field_and_the_reason(
    task: str, field: str, expected: str
) -> None:
    message = nickel_error(
        f'let w = import "workflow.ncl" in {{ name = "x", tasks = [{task}] }} | w.Workflow'
    )
    assert f"`{field}`" in message, message
    assert expected in message, message
    assert "\x1b[" not in message  # colour codes stripped


def test_nickel_contract_rejects_unknown_and_missing_fields() -> None:
    unknown = nickel_error(
        'let w = import "workflow.ncl" in '
        '{ name = "x", tasks = [{ id = "a", action = "builtin.noop", retry = 3 }] } | w.Workflow'
    )
    assert "extra field `retry`" in unknown, unknown
    missing = nickel_error(
        'let w = import "workflow.ncl" in { name = "x", tasks = [{ id = "a" }] } | w.Workflow'
    )
    assert "missing definition for `action`" in missing, missing
    on_failure = nickel_error(
        'let w = import "workflow.ncl" in { name = "x", on_failure = "abort", tasks = [] }'
        " | w.Workflow"
    )
    assert "`on_failure`" in on_failure and '"stop"' in on_failure, on_failure


def test_nickel_imports_are_limited_to_the_shipped_schemas(tmp_path: Path) -> None:
    assert (SCHEMAS_DIR / "workflow.ncl").is_file()
    secret = tmp_path / "secret.ncl"
    secret.write_text('{ token = "s3cret" }')
    for source in (
        f'import "{secret}"',
        'import "../workflows/example3.ncl"',
        'let x = import "nope.ncl" in x',
    ):
        with pytest.raises(DefinitionError) as caught:
            nickel(source)
        assert caught.value.reason == "bad_import", source
        assert "workflow.ncl" in caught.value.message


def test_the_word_import_in_comments_and_strings_is_not_an_import() -> None:
    wf = nickel(
        """
        # we import nothing but the schema
        let w = import "workflow.ncl" in
        {
          name = "import-data",
          description = "import the \\"data\\" # not a comment",
          tasks = [{ id = "a", action = "builtin.noop", args = { mode = "import" } }],
        } | w.Workflow
        """
    )
    assert wf.description == 'import the "data" # not a comment'
    assert wf.tasks[0].args == {"mode": "import"}


@pytest.mark.parametrize(
    "source",
    [
        # an interpolation hides a quote in a comment: a lexer that pairs quotes is fooled
        'let x = "%{ 1 # "\n} " in { name = import "/etc/passwd" as \'Text, tasks = [] }',
        # a symbolic string holds quotes: likewise
        '{ name = x-s%" " "% , d = import "/etc/hostname" as \'Text }',
        '{ name = m%"\n" import "/etc/hostname" "\n"%, tasks = [] }',
        'let f = "/etc/hostname" in import f',
    ],
)
def test_imports_hidden_in_tricky_strings_are_refused(source: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        nickel(source)
    assert caught.value.reason == "bad_import", caught.value.message


def registry_names() -> set[str]:
    return set(load_registry().names())


@pytest.mark.parametrize(
    ("tasks", "reason", "task", "words"),
    [
        ([], "empty", None, "no tasks"),
        (
            [{"id": "a", "action": "builtin.noop"}, {"id": "a", "action": "builtin.noop"}],
            "duplicate_id",
            "a",
            "duplicate task id 'a'",
        ),
        ([{"id": "a", "action": "server.explode"}], "unknown_action", "a", "'server.explode'"),
        (
            [{"id": "a", "action": "builtin.noop", "depends_on": ["ghost"]}],
            "unknown_dependency",
            "a",
            "unknown task 'ghost'",
        ),
        (
            [
                {"id": "a", "action": "builtin.noop", "depends_on": ["c"]},
                {"id": "b", "action": "builtin.noop", "depends_on": ["a"]},
                {"id": "c", "action": "builtin.noop", "depends_on": ["b"]},
            ],
            "cycle",
            "a",
            "a -> b -> c -> a",
        ),
        (
            [{"id": "a", "action": "builtin.noop", "depends_on": ["a"]}],
            "cycle",
            "a",
            "depends on itself",
        ),
    ],
)
def test_validation_names_the_task_and_the_reason(
    tasks: list[dict[str, object]], reason: str, task: str | None, words: str
) -> None:
    definition = definition_from_data({"name": "bad", "tasks": tasks})
    with pytest.raises(DefinitionError) as caught:
        validate_definition(definition, registry_names(), max_tasks=100)
    assert caught.value.reason == reason
    assert caught.value.task == task
    assert words in caught.value.message, caught.value.message


def test_wrong_field_type_names_the_task() -> None:
    with pytest.raises(DefinitionError) as caught:
        definition_from_data(
            {
                "name": "bad",
                "tasks": [
                    {"id": "ok", "action": "builtin.noop"},
                    {"id": "typo", "action": "builtin.noop", "retries": "3"},
                ],
            }
        )
    assert caught.value.reason == "wrong_field" and caught.value.task == "typo"
    assert "$.tasks[1].retries" in caught.value.message


def test_task_limit() -> None:
    tasks = [{"id": f"t{i}", "action": "builtin.noop"} for i in range(11)]
    definition = definition_from_data({"name": "big", "tasks": tasks})
    with pytest.raises(DefinitionError) as caught:
        validate_definition(definition, registry_names(), max_tasks=10)
    assert caught.value.reason == "too_many_tasks"
    assert "11 tasks; the limit is 10" in caught.value.message
