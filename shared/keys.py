"""Concurrency keys: their templates, rates and the rules a key must follow.

A task holds one or more keys while an executor has it (``{key, limit, strategy, rate}``, from
its action's defaults in the registry and its own ``concurrency`` list). A key is a string
such as ``server:wuji-cp-1``; a template may take parts of the task's own arguments,
``server:{args.server.hostname}``, and a part marked optional (``{args.server.provider?}``)
drops the whole key when the argument is missing. Nothing is evaluated: a template is a key
with paths into the arguments, and only strings and numbers are substituted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec

from .errors import DefinitionError

__all__ = [
    "KEY_MAX",
    "Claim",
    "KeySpec",
    "Rate",
    "Strategy",
    "claims",
    "key_problem",
    "parse_rate",
]

KEY_MAX = 256
Strategy = Literal["queue", "cancel_newest", "cancel_in_progress"]
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_PATH = re.compile(r"^args(\.[A-Za-z0-9_-]{1,64}){1,16}(\?)?$")
_RATE = re.compile(r"^\s*(\d{1,6})\s*/\s*(\d{0,6})\s*(second|minute|hour|day|s|m|h|d)\s*$")
_UNITS = {"second": 1, "s": 1, "minute": 60, "m": 60, "hour": 3600, "h": 3600, "day": 86400}
_UNITS["d"] = 86400


class KeySpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One key a task holds: a key or template, how many may hold it at once (default 1, or
    no limit when the key has a ``rate``; ``0`` is no limit: the key only counts starts for a
    rate, its own or a configured one), what a task that finds it full does, and how many may
    start per window."""

    key: Annotated[str, msgspec.Meta(max_length=1024)]
    limit: Annotated[int, msgspec.Meta(ge=0, le=100_000)] | None = None
    strategy: Strategy = "queue"
    rate: Annotated[str, msgspec.Meta(max_length=40)] | None = None  # "20/minute", "5/10s"


class Rate(msgspec.Struct, frozen=True):
    count: int
    window_s: float

    def __str__(self) -> str:
        return f"{self.count}/{self.window_s:g}s"


class Claim(msgspec.Struct, frozen=True):
    """A key as one task holds it: rendered, with its limit, strategy and rate."""

    key: str
    limit: int | None
    strategy: Strategy
    rate: Rate | None


def parse_rate(text: str) -> Rate:
    """``"20/minute"``, ``"5/10s"``, ``"100/hour"``; raises ValueError."""
    m = _RATE.match(text)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"not a rate: {text[:40]!r} (expected e.g. '20/minute' or '5/10s')")
    window = (int(m.group(2)) if m.group(2) else 1) * _UNITS[m.group(3)]
    if window < 1:
        raise ValueError(f"not a rate: {text[:40]!r} (the window must be at least 1 second)")
    return Rate(int(m.group(1)), float(window))


def key_problem(key: str) -> str | None:
    """Why a rendered key cannot be used, or None: keys are names in listings, KV and logs."""
    if not key:
        return "a key must not be empty"
    if len(key) > KEY_MAX:
        return f"a key is at most {KEY_MAX} characters (this one has {len(key)})"
    if not key.isprintable() or any(c.isspace() for c in key):
        return f"key {key[:60]!r} holds a control or space character"
    if "*" in key or ">" in key:
        return f"key {key[:60]!r} holds a wildcard character ('*' or '>')"
    return None


def _lookup(args: Any, path: str) -> Any:
    value = args
    for part in path.split(".")[1:]:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _render(template: str, args: dict[str, Any], task: str) -> str | None:
    """The key for ``args``; None when an optional part is missing."""
    parts: list[str] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(template[pos : m.start()])
        pos = m.end()
        path = m.group(1).strip()
        if not _PATH.match(path):
            raise DefinitionError(
                f"task {task!r}: concurrency key {template[:60]!r}: {{{path[:40]}}} is not a "
                "path into the arguments (e.g. {args.server.hostname})",
                task=task,
                reason="bad_key",
                key=template[:KEY_MAX],
            )
        optional = path.endswith("?")
        value = _lookup(args, path.rstrip("?"))
        if value is None or isinstance(value, bool) or not isinstance(value, str | int | float):
            if optional and value is None:
                return None
            what = "missing" if value is None else "not a string or number"
            raise DefinitionError(
                f"task {task!r}: concurrency key {template[:60]!r} needs {path.rstrip('?')}, "
                f"which is {what} in its arguments",
                task=task,
                reason="bad_key",
                key=template[:KEY_MAX],
                argument=path.rstrip("?"),
            )
        parts.append(str(value))
    parts.append(template[pos:])
    return "".join(parts)


def claims(
    defaults: Sequence[KeySpec],
    declared: Sequence[KeySpec] | None,
    args: dict[str, Any],
    rates: Mapping[str, Rate],
    *,
    task: str,
) -> list[Claim]:
    """The keys a task holds: its action's defaults, then its own (a key it declares again
    replaces the default's limit, strategy and rate), rendered from its arguments, in order.
    ``rates`` are the configured rates per key (a rate in the definition wins). Raises
    :class:`DefinitionError` naming the task and the key or argument at fault."""
    found: dict[str, Claim] = {}
    for spec in [*defaults, *(declared or ())]:
        key = _render(spec.key, args, task)
        if key is None:
            continue
        if (problem := key_problem(key)) is not None:
            raise DefinitionError(
                f"task {task!r}: concurrency key: {problem}",
                task=task,
                reason="bad_key",
                key=key[:KEY_MAX],
            )
        try:
            rate = parse_rate(spec.rate) if spec.rate else rates.get(key)
        except ValueError as exc:
            raise DefinitionError(
                f"task {task!r}: concurrency key {key!r}: {exc}",
                task=task,
                reason="bad_key",
                key=key,
            ) from None
        if spec.limit is None:
            limit: int | None = None if spec.rate else 1
        else:
            limit = spec.limit or None  # 0: no limit
        found[key] = Claim(key, limit, spec.strategy, rate)
    return list(found.values())
