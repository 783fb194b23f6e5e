"""Request bodies the gateway decodes itself, as msgspec Structs (the workflow definition is
``shared.messages.WorkflowDefinition``). ``openapi.py`` generates their schemas; the handlers
convert with ``shared.messages.from_builtins`` (strict, but ``14.0`` is the integer 14)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, UnsetType

from shared.ids import NAME_RE

__all__ = ["REQUESTS", "ProgressBody", "ShortcutBody", "ShortcutParams"]

Name = Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern)]


class ProgressBody(msgspec.Struct, kw_only=True):
    """A running task's progress (the seed's pattern 3). Other keys are ignored."""

    progress: Annotated[int, msgspec.Meta(ge=0, le=100)]
    message: Annotated[str, msgspec.Meta(description="Kept to 500 characters")] = ""
    status: Annotated[str, msgspec.Meta(description="Ignored (the seed's scripts send it)")] = ""


class ShortcutParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Options of the shortcuts, all optional; other keys are ignored. ``servers``: only these
    hostnames; ``taskserv``: only this task service; ``apps``: what cluster/create deploys;
    ``retries`` per task; ``delay_seconds``, ``fail``, ``fail_at``: the local provider's test
    knobs, passed to every task."""

    servers: list[str] | UnsetType = UNSET
    taskserv: Name | UnsetType = UNSET
    apps: list[str] | UnsetType = UNSET
    retries: Annotated[int, msgspec.Meta(ge=0, le=100)] | UnsetType = UNSET
    delay_seconds: Annotated[float, msgspec.Meta(ge=0)] | UnsetType = UNSET
    fail: Any | UnsetType = UNSET
    fail_at: Any | UnsetType = UNSET


class ShortcutBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /workflows/{servers,taskserv,cluster}/create``: an infra of ``core/infra``."""

    infra: Name
    params: ShortcutParams = msgspec.field(default_factory=ShortcutParams)


REQUESTS: tuple[type[msgspec.Struct], ...] = (ProgressBody, ShortcutBody)
