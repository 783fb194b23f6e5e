"""Workflow definitions: parsing from JSON, TOML, YAML or Nickel, and validation as a DAG.

Validation happens before anything is queued and names the task and the reason: an empty
workflow, too many tasks, a duplicate id, an unknown action, an unknown or self dependency,
a cycle (printed as ``a -> b -> a``), arguments nested too deeply or too large once expanded
(a YAML alias bomb), or values the message codec cannot carry (lone surrogates, integers
beyond 64 bits, non-finite floats, keys that are not strings or numbers).
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from typing import TYPE_CHECKING, Any

import msgspec
import yaml

from .errors import ActionNotFound, DefinitionError
from .ids import NAME_RE
from .messages import WorkflowDefinition, from_builtins
from .priority import parse_priority
from .refs import check_refs, find_refs, parse_ref

if TYPE_CHECKING:
    import networkx as nx

__all__ = [
    "CONTENT_TYPES",
    "build_graph",
    "definition_from_data",
    "find_cycle",
    "format_for_content_type",
    "parse_definition",
    "validate_definition",
]

CONTENT_TYPES = {
    "application/json": "json",
    "application/toml": "toml",
    "application/x-toml": "toml",
    "text/x-toml": "toml",
    "application/yaml": "yaml",
    "application/x-yaml": "yaml",
    "text/yaml": "yaml",
    "text/x-yaml": "yaml",
    "application/nickel": "nickel",
    "application/x-nickel": "nickel",
    "text/x-nickel": "nickel",
}
_PATH_TASK_RE = re.compile(r"^\$\.tasks\[(\d+)\]")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_ARGS_DEPTH = 64  # nesting of a task's arguments
MAX_VALUES = 1_000_000  # scalars, lists and records in all arguments, aliases expanded
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1  # what the message codec decodes
# libyaml's loader where PyYAML was built with it (its wheels are): it scans and parses in C,
# several times faster than the pure-Python loader, and refuses nesting deeper than 1000.
YAML_LOADER: type[yaml.SafeLoader] = (
    yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader  # type: ignore[assignment]
)


def format_for_content_type(content_type: str) -> str | None:
    return CONTENT_TYPES.get(content_type.split(";", 1)[0].strip().lower())


def _task_named(data: Any, index: int) -> str | None:
    try:
        task_id = data["tasks"][index]["id"]
    except (KeyError, IndexError, TypeError):
        return None
    return task_id if isinstance(task_id, str) else None


def definition_from_data(data: Any) -> WorkflowDefinition:
    """Convert decoded data (any format) into a definition, strictly typed."""
    if not isinstance(data, dict):
        raise DefinitionError("a workflow definition must be an object", reason="wrong_type")
    data = _named_priorities(data)
    try:
        return from_builtins(data, WorkflowDefinition)  # 14.0 is an integer, as in JSON Schema
    except RecursionError:
        raise DefinitionError("the definition is nested too deeply", reason="too_deep") from None
    except msgspec.ValidationError as exc:
        text = str(exc)
        task = None
        path = text.rpartition(" - at `")[2].rstrip("`") if " - at `" in text else ""
        if m := _PATH_TASK_RE.match(path):
            task = _task_named(data, int(m.group(1)))
        where = f"task {task!r}: " if task else ""
        raise DefinitionError(f"{where}{text}", task=task, reason="wrong_field") from None


def _named_priorities(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the named priorities (``High``, ...) of the workflow and of its tasks as
    their numbers (shared.priority); numbers are left to the strict conversion."""
    if isinstance(data.get("priority"), str):
        data = {**data, "priority": parse_priority(data["priority"])}
    tasks = data.get("tasks")
    if isinstance(tasks, list) and any(
        isinstance(t, dict) and isinstance(t.get("priority"), str) for t in tasks
    ):
        named = []
        for index, task in enumerate(tasks):
            if isinstance(task, dict) and isinstance(task.get("priority"), str):
                task_id = task.get("id") if isinstance(task.get("id"), str) else None
                try:
                    task = {**task, "priority": parse_priority(task["priority"])}
                except DefinitionError as exc:
                    where = f"task {task_id!r}: " if task_id else f"tasks[{index}]: "
                    raise DefinitionError(
                        where + exc.message, task=task_id, reason="wrong_field", field="priority"
                    ) from None
            named.append(task)
        data = {**data, "tasks": named}
    return data


def parse_definition(body: bytes, fmt: str) -> WorkflowDefinition:
    """Parse ``json``, ``toml`` or ``yaml`` source. Nickel goes through :mod:`shared.nickel`."""
    try:
        if fmt == "json":
            data = json.loads(body)
        elif fmt == "toml":
            data = tomllib.loads(body.decode("utf-8"))
        elif fmt == "yaml":
            data = yaml.load(body.decode("utf-8"), Loader=YAML_LOADER)  # noqa: S506 - a safe loader
        else:
            raise DefinitionError(f"unsupported format {fmt!r}", reason="bad_format")
    except (ValueError, UnicodeDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        message = _ANSI_RE.sub("", str(exc)).strip().splitlines()[0:3]
        raise DefinitionError(
            f"malformed {fmt.upper()}: {' '.join(message)}", reason="malformed"
        ) from None
    except RecursionError:
        raise DefinitionError(
            f"malformed {fmt.upper()}: nested too deeply", reason="malformed"
        ) from None
    return definition_from_data(data)


def build_graph(definition: WorkflowDefinition) -> nx.DiGraph:
    """Edges point from a dependency to its dependent."""
    import networkx as nx  # only for callers that want the graph: validation does without

    graph = nx.DiGraph()
    for task in definition.tasks:
        graph.add_node(task.id)
    for task in definition.tasks:
        for dep in task.depends_on:
            graph.add_edge(dep, task.id)
    return graph


def _bad_value(value: Any) -> str | None:
    """Why the codec cannot carry this scalar faithfully, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "a string that is not valid Unicode (lone surrogate)"
    elif isinstance(value, bool):
        return None
    elif isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            return "an integer beyond 64 bits"
    elif isinstance(value, float) and not math.isfinite(value):
        return "a number that is not finite (NaN or infinity)"
    return None


def _bad_key(key: Any) -> str | None:
    if isinstance(key, str):
        return _bad_value(key)
    try:  # numbers and dates become strings; true, null and lists cannot be keys
        msgspec.json.encode({key: None})
    except TypeError:
        return f"the key {key!r} is not a string (quote it in YAML)"
    return _bad_value(key)


def _check_value(root: Any, *, budget: list[int], task: str | None, where: str) -> None:
    """Walk ``root`` without recursion (arguments may be nested 100,000 levels deep or be a
    YAML alias bomb): bounded depth and size, and only values the codec carries faithfully."""
    stack: list[tuple[Any, int]] = [(root, 0)]
    prefix = f"task {task!r}: " if task else ""
    while stack:
        value, depth = stack.pop()
        budget[0] -= 1
        if budget[0] < 0:
            raise DefinitionError(
                f"{prefix}{where}: more than {MAX_VALUES} values in all (aliases expanded)",
                task=task,
                reason="too_large",
                limit=MAX_VALUES,
            )
        if isinstance(value, dict | list | tuple | set | frozenset):
            if depth >= MAX_ARGS_DEPTH:
                raise DefinitionError(
                    f"{prefix}{where}: nested deeper than {MAX_ARGS_DEPTH} levels",
                    task=task,
                    reason="too_deep",
                    limit=MAX_ARGS_DEPTH,
                )
            if isinstance(value, dict):
                for key, item in value.items():
                    if (why := _bad_key(key)) is not None:
                        raise DefinitionError(
                            f"{prefix}{where}: {why}", task=task, reason="wrong_field"
                        )
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)
        elif (why := _bad_value(value)) is not None:
            raise DefinitionError(f"{prefix}{where}: {why}", task=task, reason="wrong_field")


def _check_values(definition: WorkflowDefinition) -> None:
    budget = [MAX_VALUES]
    _check_value(definition.name, budget=budget, task=None, where="name")
    _check_value(definition.description, budget=budget, task=None, where="description")
    for task in definition.tasks:
        _check_value(task.args, budget=budget, task=task.id, where="arguments")
    try:  # what the scheduler will decode: anything the walk above missed
        msgspec.json.decode(msgspec.json.encode(definition), type=WorkflowDefinition)
    except (msgspec.ValidationError, TypeError, ValueError, RecursionError) as exc:
        text = str(exc)
        path = text.rpartition(" - at `")[2].rstrip("`") if " - at `" in text else ""
        m = _PATH_TASK_RE.match(path)
        named = definition.tasks[int(m.group(1))].id if m else None
        where = f"task {named!r}: " if named else ""
        raise DefinitionError(f"{where}{text}", task=named, reason="wrong_field") from None


def find_cycle(definition: WorkflowDefinition) -> list[str] | None:
    """A dependency cycle as ``[a, b, ..., a]``, or None; every dependency must name a task.

    A depth-first search along the edges dependency -> dependent, in the order of the tasks and
    of their ``depends_on``: the cycle ``networkx.find_cycle`` reports, in O(tasks + edges)
    without building a graph (20,000 tasks: milliseconds, where networkx took most of a second).
    """
    dependents: dict[str, list[str]] = {task.id: [] for task in definition.tasks}
    for task in definition.tasks:
        for dep in task.depends_on:
            dependents[dep].append(task.id)
    done: set[str] = set()
    for root in dependents:
        if root in done:
            continue
        path = [root]  # the tasks being explored, each depending on the one before
        on_path = {root: 0}  # their positions in ``path``
        todo = [iter(dependents[root])]
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:  # every dependent of path[-1] explored
                finished = path.pop()
                del on_path[finished]
                done.add(finished)
                todo.pop()
            elif nxt in on_path:
                return [*path[on_path[nxt] :], nxt]
            elif nxt not in done:
                on_path[nxt] = len(path)
                path.append(nxt)
                todo.append(iter(dependents[nxt]))
    return None


def validate_definition(
    definition: WorkflowDefinition, known_actions: Any, *, max_tasks: int
) -> None:
    """Check a definition. ``known_actions`` supports ``in``."""
    tasks = definition.tasks
    if not tasks:
        raise DefinitionError("the workflow has no tasks", reason="empty")
    if len(tasks) > max_tasks:
        raise DefinitionError(
            f"the workflow has {len(tasks)} tasks; the limit is {max_tasks}",
            reason="too_many_tasks",
            limit=max_tasks,
        )
    _check_values(definition)
    seen: set[str] = set()
    for task in tasks:
        if not NAME_RE.match(task.id):
            raise DefinitionError(
                f"task id {task.id!r} is not a name ({task.id} is how a fan-out names its "
                "children)",
                task=task.id,
                reason="wrong_field",
            )
        if task.id in seen:
            raise DefinitionError(
                f"duplicate task id {task.id!r}", task=task.id, reason="duplicate_id"
            )
        seen.add(task.id)
    for task in tasks:
        if task.action not in known_actions:
            raise ActionNotFound(task.action, task=task.id)
        deps: set[str] = set()
        for dep in task.depends_on:
            if dep == task.id:
                raise DefinitionError(
                    f"task {task.id!r} depends on itself",
                    task=task.id,
                    reason="cycle",
                    cycle=[dep, dep],
                )
            if dep not in seen:
                raise DefinitionError(
                    f"task {task.id!r} depends on unknown task {dep!r}",
                    task=task.id,
                    reason="unknown_dependency",
                    dependency=dep,
                )
            if dep in deps:
                raise DefinitionError(
                    f"task {task.id!r} lists dependency {dep!r} twice",
                    task=task.id,
                    reason="duplicate_dependency",
                )
            deps.add(dep)
    cycle = find_cycle(definition)
    if cycle is None:
        _check_references(definition)
        return
    shown = " -> ".join(cycle)
    if len(cycle) > 21:  # the whole cycle is in details.cycle
        shown = (
            f"{' -> '.join(cycle[:20])} -> ... -> {cycle[-1]} (a cycle of {len(cycle) - 1} tasks)"
        )
    raise DefinitionError(f"dependency cycle: {shown}", task=cycle[0], reason="cycle", cycle=cycle)


REFERENCE_WALK_BUDGET = 200_000  # dependency edges followed to check references, in all


def _check_references(definition: WorkflowDefinition) -> None:
    """References to other tasks' results point to tasks each one depends on, directly or
    not (checked by walking its dependencies, within a budget: references far up a huge graph
    are refused rather than checked for ever)."""
    deps = {t.id: t.depends_on for t in definition.tasks}
    budget = [REFERENCE_WALK_BUDGET]

    def depends_on(task_id: str, wanted: set[str]) -> set[str]:
        """Which of ``wanted`` are ancestors of ``task_id``."""
        found: set[str] = set()
        seen = {task_id}
        stack = list(deps[task_id])
        while stack and found != wanted:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            budget[0] -= 1
            if budget[0] < 0:
                raise DefinitionError(
                    f"task {task_id!r}: its references reach too far up a large graph to be "
                    "checked; refer to a direct dependency",
                    task=task_id,
                    reason="bad_reference",
                )
            if node in wanted:
                found.add(node)
            stack.extend(deps[node])
        return found

    for task in definition.tasks:
        if task.for_each is None and "${" not in msgspec.json.encode(task.args).decode():
            if task.parallelism is not None:
                raise DefinitionError(
                    f"task {task.id!r}: parallelism is only for a for_each task",
                    task=task.id,
                    reason="bad_reference",
                )
            continue
        named = {ref.task for ref, _ in _refs_of(task) if ref.task is not None}
        direct = set(task.depends_on)
        ancestors = (named & direct) | depends_on(task.id, named - direct)
        check_refs(task.id, task.args, task.for_each, ancestors)


def _refs_of(task: Any) -> list[Any]:
    try:
        found = find_refs(task.args)
        if task.for_each is not None and (each := parse_ref(task.for_each)) is not None:
            found.append((each, "for_each"))
    except ValueError:
        return []  # check_refs names the malformed one
    return found
