"""What a user may do with a path, by its mode bits and those of the directories above it.

The executor asks this for its task user, who is not this process: at start-up, to refuse to
run when tasks could not reach what they need (``services.executor.isolation``), and for each
program a task starts, to look it up on PATH as the task itself would (``core.runner``).
ACLs are not read.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["denied"]

_BITS = {"r": 4, "w": 2, "x": 1}


def denied(path: Path, want: str, uid: int, groups: set[int]) -> str | None:
    """Why ``uid`` (with ``groups``) may not ``want`` (``"r"``, ``"w"`` or ``"x"``) the file
    ``path`` leads to (links followed), or None if it may."""
    resolved = path.resolve()
    for parent in reversed(resolved.parents):
        if not _allowed(parent, 1, uid, groups):
            return f"{parent} is not searchable"
    if not resolved.exists():
        return "missing"
    wanted = _BITS[want] | (1 if resolved.is_dir() else 0)
    return None if _allowed(resolved, wanted, uid, groups) else f"not {want!r}"


def _allowed(path: Path, wanted: int, uid: int, groups: set[int]) -> bool:
    info = path.stat()
    if info.st_uid == uid:
        granted = info.st_mode >> 6
    elif info.st_gid in groups:
        granted = info.st_mode >> 3
    else:
        granted = info.st_mode
    return granted & wanted == wanted
