"""Masking secrets out of what a task prints and returns.

The runner passes every log line, progress message, error message and result through one
:class:`Redactor` before anything leaves it, so the executor's records, events, logs and traces,
and direct mode's output, never hold a secret the task was given (or found).

Two kinds of things are masked:

- configured secret values (the values of ``[providers] secrets`` variables, the credentials in
  an AWS credentials file, the orchestrator's own tokens), wherever they appear, also inside a
  longer string;
- anything shaped like an AWS secret access key: 40 characters of the base64 alphabet, preceded
  on the same line by ``secret`` or ``aws`` (``aws_secret_access_key = ...``,
  ``"SecretAccessKey": "..."``), or the value of a result field whose name says ``secret``.

AWS access key ids (``AKIA...``, ``ASIA...``) are identifiers, not secrets: they are left
readable, which is what one needs to tell which credentials a task used. Name
``AWS_ACCESS_KEY_ID`` in ``[providers] secrets`` to mask them too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["MASK", "MIN_SECRET_LENGTH", "Redactor"]

MASK = "[redacted]"
# Shorter values would mask ordinary words everywhere; such values are not secrets worth the name.
MIN_SECRET_LENGTH = 4
# Ends of a secret cut by a line split: at least this many characters of it are masked.
_MIN_FRAGMENT = 8
_KEY_SHAPE = r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
_KEY_IN_CONTEXT = re.compile(r"(?i)(secret|aws)([^\n]{0,40}?)(" + _KEY_SHAPE + ")")
_KEY_ALONE = re.compile(r"\s*" + _KEY_SHAPE + r"\s*")
_SECRET_FIELD = re.compile(r"(?i)secret")


class Redactor:
    """Masks secrets in text and in JSON-like values. Immutable; cheap to call per line."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        found = {v for v in values if isinstance(v, str) and len(v.strip()) >= MIN_SECRET_LENGTH}
        # longest first: a secret that contains another is masked whole
        self._values = sorted(found, key=len, reverse=True)

    @property
    def size(self) -> int:
        """How many secret values it knows (not the values themselves)."""
        return len(self._values)

    def with_values(self, values: Iterable[str]) -> Redactor:
        return Redactor([*self._values, *values])

    def text(self, text: str, *, fragment: bool = False) -> str:
        """``text`` with every secret masked. ``fragment``: the text is a piece cut out of a
        longer line, so a secret may begin at its end or end at its start: those ends are masked
        too."""
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        if fragment:
            text = self._edges(text)
        if "secret" in text.lower() or "aws" in text.lower():
            text = _KEY_IN_CONTEXT.sub(lambda m: m.group(1) + m.group(2) + MASK, text)
        return text

    def value(self, value: Any, *, field: str = "") -> Any:
        """A copy of a JSON-like value with every string (keys included) masked."""
        if isinstance(value, str):
            if field and _SECRET_FIELD.search(field) and _KEY_ALONE.fullmatch(value):
                return MASK
            return self.text(value)
        if isinstance(value, dict):
            return {
                self.text(k) if isinstance(k, str) else k: self.value(v, field=str(k))
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(v, field=field) for v in value]
        return value

    def _edges(self, text: str) -> str:
        for value in self._values:
            shortest = min(_MIN_FRAGMENT, len(value))
            for size in range(len(value) - 1, shortest - 1, -1):
                if text.endswith(value[:size]):
                    text = text[:-size] + MASK
                    break
            for size in range(len(value) - 1, shortest - 1, -1):
                if text.startswith(value[-size:]):
                    text = MASK + text[size:]
                    break
        return text
