"""Request bodies the gateway decodes itself, as msgspec Structs (the workflow definition is
``shared.messages.WorkflowDefinition``). ``openapi.py`` generates their schemas; the handlers
decode with :func:`decode_body`: every unknown key is a 422 that names it (no silent drops),
then ``shared.messages.from_builtins`` converts strictly (but ``14.0`` is the integer 14)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
import msgspec.inspect as mi
from msgspec import UNSET, UnsetType

from shared.errors import DefinitionError
from shared.ids import CHILD_RE, NAME_RE
from shared.messages import from_builtins
from shared.priority import PRIORITY_MAX, PRIORITY_MIN, PRIORITY_NAME_PATTERN

__all__ = [
    "REQUESTS",
    "SHORTCUT_TYPES",
    "ApproveBody",
    "PriorityValue",
    "ProgressBody",
    "RejectBody",
    "ShortcutBody",
    "ShortcutParams",
    "decode_body",
    "unknown_keys",
]

T = TypeVar("T")

Name = Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern)]
TaskId = Annotated[str, msgspec.Meta(pattern=CHILD_RE.pattern)]
PriorityValue = (
    Annotated[int, msgspec.Meta(ge=PRIORITY_MIN, le=PRIORITY_MAX)]
    | Annotated[
        str,
        msgspec.Meta(
            pattern=PRIORITY_NAME_PATTERN,
            description="A named level, any case: Low (-10), Normal (0), High (10), Critical (100)",
        ),
    ]
)
# The seed's task types, one per shortcut (``{"type": "server_create", "infra": ...}``).
SHORTCUT_TYPES = {
    "servers": "server_create",
    "taskserv": "taskserv_create",
    "cluster": "cluster_create",
}
ShortcutType = Literal["server_create", "taskserv_create", "cluster_create"]


class ProgressBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A running task's progress (the seed's pattern 3)."""

    progress: Annotated[int, msgspec.Meta(ge=0, le=100)]
    message: Annotated[str, msgspec.Meta(description="Kept to 500 characters")] = ""
    status: Annotated[str, msgspec.Meta(description="Ignored (the seed's scripts send it)")] = ""


class ShortcutParams(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Options of the shortcuts, all optional; any other key is a 422 naming it. ``servers``:
    only these hostnames; ``taskserv``: only this task service; ``apps``: what cluster/create
    deploys; ``retries`` per task; ``priority`` of the workflow (as the seed's CLI sends it with
    ``-p priority=High``); ``delay_seconds``, ``fail``, ``fail_at``: the local provider's test
    knobs, passed to every task."""

    servers: list[str] | UnsetType = UNSET
    taskserv: Name | UnsetType = UNSET
    apps: list[str] | UnsetType = UNSET
    retries: Annotated[int, msgspec.Meta(ge=0, le=100)] | UnsetType = UNSET
    priority: PriorityValue | UnsetType = UNSET
    delay_seconds: Annotated[float, msgspec.Meta(ge=0)] | UnsetType = UNSET
    fail: Any | UnsetType = UNSET
    fail_at: Any | UnsetType = UNSET


class ShortcutBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /workflows/{servers,taskserv,cluster}/create``: an infra of ``core/infra``, named
    by ``infra`` or (the seed's name) ``infra_name``: one of them, or both the same. ``type``,
    the seed's task type, must be the endpoint's when given. ``priority``: the workflow's (also
    accepted as ``params.priority``; both given, they must agree)."""

    type: ShortcutType | UnsetType = UNSET
    infra: Name | UnsetType = UNSET
    infra_name: Name | UnsetType = UNSET
    priority: PriorityValue | UnsetType = UNSET
    params: ShortcutParams = msgspec.field(default_factory=ShortcutParams)


class ApproveBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Approve the gate of ``task`` (a task id), or every gate that waits when it is left out
    (the workflow's own, or its tasks')."""

    task: TaskId | None = None
    comment: Annotated[str, msgspec.Meta(max_length=1000)] = ""


class RejectBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Reject the gate of ``task``, or every gate that waits; the run is cancelled."""

    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
    task: TaskId | None = None


REQUESTS: tuple[type[msgspec.Struct], ...] = (
    ProgressBody,
    ShortcutBody,
    ApproveBody,
    RejectBody,
)


def _struct(info: mi.Type) -> mi.StructType | None:
    """The Struct ``info`` is (or may be, in a union), if any."""
    while isinstance(info, mi.Metadata):
        info = info.type
    if isinstance(info, mi.StructType):
        return info
    if isinstance(info, mi.UnionType):
        return next((s for t in info.types if (s := _struct(t)) is not None), None)
    return None


def unknown_keys(raw: Any, kind: type[Any], prefix: str = "") -> list[str]:
    """Every key of ``raw`` that ``kind`` (a Struct) does not have and does not allow, at any
    depth of nested Structs, as a dotted path (``params.bogus``)."""
    struct = _struct(mi.type_info(kind))
    return _unknown(raw, struct, prefix) if struct is not None else []


def _unknown(raw: Any, struct: mi.StructType, prefix: str) -> list[str]:
    if not isinstance(raw, dict):
        return []
    fields = {f.encode_name: f.type for f in struct.fields}
    found: list[str] = []
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            if struct.forbid_unknown_fields:
                found.append(path)
        elif (inner := _struct(fields[key])) is not None:
            found += _unknown(value, inner, f"{path}.")
    return found


def decode_body(raw: Any, kind: type[T]) -> T:
    """``raw`` (decoded JSON) as ``kind``: a 422 (``unknown_field``, ``details.fields``) naming
    every key it does not know, else the strict conversion's 422 (``wrong_field``)."""
    unknown = unknown_keys(raw, kind)
    if unknown:
        shown = ", ".join(repr(k[:100]) for k in unknown[:20])
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        raise DefinitionError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {shown}{more}",
            reason="unknown_field",
            fields=[k[:100] for k in unknown[:20]],
        )
    try:
        return from_builtins(raw, kind)
    except msgspec.ValidationError as exc:
        raise DefinitionError(str(exc), reason="wrong_field") from None
    except RecursionError:
        raise DefinitionError("the body is nested too deeply", reason="too_deep") from None
