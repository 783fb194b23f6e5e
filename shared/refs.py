"""References between tasks: a task's arguments may take the results of the tasks it depends on.

A reference is a string that is exactly ``${tasks.<id>.result}`` or
``${tasks.<id>.result.<path>}`` (the path into the task's result as the API shows it: keys and
list indexes, dot separated), or, in a fan-out child, ``${item}`` / ``${item.<path>}``. The
whole string is replaced by the value, whatever its type. Nothing else is substituted and
nothing is evaluated: a string holding ``${`` anywhere but as a whole reference is refused
(write ``$${`` for a literal ``${``), and a value that came from a result is never scanned again,
so a result holding ``${tasks.x.result}`` text is passed on literally.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from .errors import DefinitionError, ProvisioningError

__all__ = [
    "MissingPath",
    "Ref",
    "check_refs",
    "find_refs",
    "parse_ref",
    "resolve",
]

_REF = re.compile(r"^\$\{([^{}]{1,512})\}$")
_TASK_REF = re.compile(
    r"^tasks\.([A-Za-z0-9][A-Za-z0-9_-]{0,63})\.result((?:\.[^.]{1,128}){0,32})$"
)
_ITEM_REF = re.compile(r"^item((?:\.[^.]{1,128}){0,32})$")
_ESCAPED = "$${"
MAX_WALK = 100_000


class Ref(msgspec.Struct, frozen=True):
    """``task`` is None for ``${item...}``; ``path`` the keys and indexes after ``result``."""

    text: str
    task: str | None
    path: tuple[str, ...]


class MissingPath(ProvisioningError):
    """Raised when a reference's path is not in the result it points into."""

    code = "missing_path"


def parse_ref(text: str) -> Ref | None:
    """The reference a string is, None if it is plain text; raises ValueError for a string
    that holds ``${`` but is not exactly one reference."""
    if "${" not in text:
        return None
    m = _REF.match(text)
    if m is None:
        if _ESCAPED in text and "${" not in text.replace(_ESCAPED, ""):
            return None  # only escaped: literal text
        raise ValueError(
            f"{text[:80]!r}: a reference must be the whole value, "
            "${tasks.<id>.result[.<path>]} or ${item[.<path>]} (write $${ for a literal ${)"
        )
    body = m.group(1).strip()
    if (t := _TASK_REF.match(body)) is not None:
        return Ref(text, t.group(1), tuple(p for p in t.group(2).split(".") if p))
    if (i := _ITEM_REF.match(body)) is not None:
        return Ref(text, None, tuple(p for p in i.group(1).split(".") if p))
    raise ValueError(
        f"{text[:80]!r}: not a reference (expected ${{tasks.<id>.result[.<path>]}} or "
        "${item[.<path>]})"
    )


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """Every string in ``value`` (keys excluded) with where it is, without recursion."""
    stack: list[tuple[Any, str]] = [(value, where)]
    seen = 0
    while stack:
        item, at = stack.pop()
        seen += 1
        if seen > MAX_WALK:
            return
        if isinstance(item, str):
            yield item, at
        elif isinstance(item, dict):
            stack.extend((v, f"{at}.{k}") for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{at}[{n}]") for n, v in enumerate(item))


def find_refs(value: Any, where: str = "args") -> list[tuple[Ref, str]]:
    """Every reference in ``value`` and where it is; raises ValueError (with the place) for a
    malformed one."""
    out = []
    for text, at in _strings(value, where):
        try:
            ref = parse_ref(text)
        except ValueError as exc:
            raise ValueError(f"{at}: {exc}") from None
        if ref is not None:
            out.append((ref, at))
    return out


def _follow(value: Any, ref: Ref, what: str) -> Any:
    for part in ref.path:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise MissingPath(
                f"{ref.text}: {what} has no {part!r} at {'.'.join(ref.path)}",
                reference=ref.text,
            )
    return value


def resolve(
    value: Any,
    result_of: Callable[[str], Any],
    *,
    item: Any = None,
    has_item: bool = False,
) -> Any:
    """``value`` with every reference replaced by what it points to (``result_of(task)`` gives
    a task's result); escaped ``$${`` become ``${``. One pass: substituted values are never
    scanned again. Raises :class:`MissingPath` naming the reference and the path."""

    def one(text: str) -> Any:
        ref = parse_ref(text)
        if ref is None:
            return text.replace(_ESCAPED, "${") if _ESCAPED in text else text
        if ref.task is None:
            if not has_item:
                raise MissingPath(f"{ref.text}: only a fan-out child has an item")
            return _follow(item, ref, "the item")
        return _follow(result_of(ref.task), ref, f"the result of {ref.task!r}")

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return one(node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(value)


def check_refs(
    task_id: str,
    args: Any,
    for_each: str | None,
    ancestors: set[str],
) -> None:
    """At submission: every reference well formed and pointing to a task this one depends on
    (directly or not); ``${item}`` only in a fan-out; ``for_each`` a reference to such a task's
    result. Raises :class:`DefinitionError` (422) naming the task and the reference."""

    def refuse(message: str, ref: str) -> DefinitionError:
        return DefinitionError(
            f"task {task_id!r}: {message}", task=task_id, reason="bad_reference", reference=ref
        )

    try:
        found = find_refs(args)
    except ValueError as exc:
        raise refuse(str(exc), "") from None
    if for_each is not None:
        try:
            each = parse_ref(for_each)
        except ValueError as exc:
            raise refuse(f"for_each: {exc}", for_each[:200]) from None
        if each is None or each.task is None:
            raise refuse(
                "for_each must be a reference to a task's result, e.g. "
                "${tasks.inventory.result.hosts}",
                for_each[:200],
            )
        found.append((each, "for_each"))
    for ref, at in found:
        if ref.task is None:
            if for_each is None:
                raise refuse(f"{at}: {ref.text} is only meaningful in a for_each task", ref.text)
        elif ref.task not in ancestors:
            raise refuse(
                f"{at}: {ref.text} refers to task {ref.task!r}, which this task does not depend "
                "on (directly or through its dependencies)",
                ref.text,
            )
