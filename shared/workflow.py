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
from typing import Any

import msgspec
import networkx as nx
import yaml

from .errors import ActionNotFound, DefinitionError
from .messages import WorkflowDefinition, from_builtins

__all__ = [
    "CONTENT_TYPES",
    "build_graph",
    "definition_from_data",
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
# libyaml's parser when PyYAML was built with it: the same safe loading, ten times faster (a
# 1.3 MB definition took 6 s with the pure-Python parser, holding up the gateway's event loop).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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


def parse_definition(body: bytes, fmt: str) -> WorkflowDefinition:
    """Parse ``json``, ``toml`` or ``yaml`` source. Nickel goes through :mod:`shared.nickel`."""
    try:
        if fmt == "json":
            data = json.loads(body)
        elif fmt == "toml":
            data = tomllib.loads(body.decode("utf-8"))
        elif fmt == "yaml":
            data = yaml.load(body.decode("utf-8"), Loader=_YAML_LOADER)  # noqa: S506 (safe)
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


def validate_definition(
    definition: WorkflowDefinition, known_actions: Any, *, max_tasks: int
) -> nx.DiGraph:
    """Check a definition; return its graph. ``known_actions`` supports ``in``."""
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
    graph = build_graph(definition)
    try:
        edges = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return graph
    cycle = [u for u, _ in edges] + [edges[0][0]]
    shown = " -> ".join(cycle)
    if len(cycle) > 21:  # the whole cycle is in details.cycle
        shown = f"{' -> '.join(cycle[:20])} -> ... -> {cycle[-1]} (a cycle of {len(edges)} tasks)"
    raise DefinitionError(f"dependency cycle: {shown}", task=cycle[0], reason="cycle", cycle=cycle)
