"""Workflow priorities: an integer from -1000 to 1000 (higher runs first when executors are
saturated), or one of the seed's named levels, case-insensitive.

The one mapping of names to numbers: workflow definitions (``priority`` of the workflow and of
a task), the shortcut endpoints' bodies and the CLI's ``-p priority=...`` all go through
:func:`parse_priority`.
"""

from __future__ import annotations

from typing import Any

from .errors import DefinitionError

__all__ = [
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "PRIORITY_NAMES",
    "PRIORITY_NAME_PATTERN",
    "parse_priority",
]

PRIORITY_MIN, PRIORITY_MAX = -1000, 1000
# The seed's levels (Priority::Low, Normal, High, Critical), spaced so that integers can still
# be put between them.
PRIORITY_NAMES: dict[str, int] = {"low": -10, "normal": 0, "high": 10, "critical": 100}
# The names, any case, as a regular expression that JSON Schema's dialect reads too (no flags).
PRIORITY_NAME_PATTERN = (
    "^(" + "|".join("".join(f"[{c.upper()}{c}]" for c in name) for name in PRIORITY_NAMES) + ")$"
)


def parse_priority(value: Any, *, field: str = "priority") -> int:
    """``value`` as a priority: an integer within -1000..1000 (``10.0`` counts as 10), or a
    named level (``Low``, ``Normal``, ``High``, ``Critical``, any case). Anything else raises
    :class:`DefinitionError` naming ``field``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if PRIORITY_MIN <= value <= PRIORITY_MAX:
            return value
    elif isinstance(value, str) and (number := PRIORITY_NAMES.get(value.lower())) is not None:
        return number
    names = ", ".join(name.capitalize() for name in PRIORITY_NAMES)
    raise DefinitionError(
        f"{field} must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX} or one of {names} "
        f"(any case); got {str(value)[:60]!r}",
        reason="wrong_field",
        field=field,
    )
