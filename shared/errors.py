"""One error tree for the whole project, rooted in :class:`ProvisioningError`."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ActionNotFound",
    "BusUnavailable",
    "ConfigError",
    "Conflict",
    "DefinitionError",
    "Forbidden",
    "MessageError",
    "NotFound",
    "PayloadTooLarge",
    "ProvisioningError",
    "QueueFull",
    "RequestTimeout",
    "StackError",
]


class ProvisioningError(Exception):
    """Base of every error this project raises on purpose.

    ``code`` is a stable machine-readable identifier, ``data`` extra facts about the failure.
    """

    code = "error"

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data:
            body["details"] = self.data
        return body


class ConfigError(ProvisioningError):
    """Raised when configuration (file, environment or flag) cannot be read or is invalid."""

    code = "config_error"


class DefinitionError(ProvisioningError):
    """Raised when a workflow definition is invalid; ``task`` names the offending task."""

    code = "invalid_definition"

    def __init__(self, message: str, *, task: str | None = None, reason: str, **data: Any) -> None:
        super().__init__(message, task=task, reason=reason, **data)
        self.task = task
        self.reason = reason


class ActionNotFound(DefinitionError):
    """Raised when an action is not in the registry (the allow-list)."""

    def __init__(self, action: str, *, task: str | None = None) -> None:
        where = f"task {task!r}: " if task else ""
        super().__init__(
            f"{where}unknown action {action!r} (not in the action registry)",
            task=task,
            reason="unknown_action",
            action=action,
        )


class MessageError(ProvisioningError):
    """Raised when a message or record does not decode: malformed, of the wrong shape, or
    nested too deeply. The one error every consumer catches for input it cannot read."""

    code = "bad_message"


class PayloadTooLarge(ProvisioningError):
    """Raised when a body or message exceeds its configured size limit."""

    code = "payload_too_large"


class NotFound(ProvisioningError):
    """Raised when a workflow, task or executor id is unknown."""

    code = "not_found"


class Conflict(ProvisioningError):
    """Raised when a request does not fit the current state (a plan already applied, a
    workflow with nothing awaiting approval, ...): a 409."""

    code = "conflict"


class Forbidden(ProvisioningError):
    """Raised when the caller is known but may not do this (approve their own run, approve a
    gate they are not an approver of): a 403."""

    code = "forbidden"


class BusUnavailable(ProvisioningError):
    """Raised when NATS or JetStream cannot be reached or does not answer in time."""

    code = "bus_unavailable"


class QueueFull(ProvisioningError):
    """Raised when JetStream refuses a publish because a queue reached its limit."""

    code = "queue_full"


class RequestTimeout(ProvisioningError):
    """Raised when a request takes longer than ``[gateway] request_timeout_seconds``."""

    code = "timeout"


class StackError(ProvisioningError):
    """Raised when the embedded local stack cannot start (port taken, binary missing, ...)."""

    code = "stack_error"
