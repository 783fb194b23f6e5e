"""Bearer tokens: the gateway's shared secret, and per-task capability tokens derived from it.

A task may POST its progress while authentication is on without ever seeing the gateway's
secret: its executor (configured with the same ``[gateway] auth_token``) hands the subprocess
``PROVISIONING_TASK_TOKEN = HMAC-SHA256(auth_token, "<workflow>.<task>.<attempt>")`` in hex, and
the gateway accepts that token for ``POST /tasks/<workflow>.<task>/progress`` only, while the
task is at that attempt.
"""

from __future__ import annotations

import hashlib
import hmac
import re

__all__ = ["bearer_token", "redact_url", "task_token", "tokens_equal"]

_USERINFO_RE = re.compile(r"(?<=://)[^/@\s]*@")


def task_token(secret: str, workflow_id: str, task_id: str, attempt: int) -> str:
    """The capability token of one attempt of one task (hex HMAC-SHA256 of its key)."""
    message = f"{workflow_id}.{task_id}.{attempt}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value (the scheme is
    case-insensitive, RFC 7235); None for any other scheme or an empty token."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def tokens_equal(given: str, expected: str) -> bool:
    """Constant-time comparison that never raises, whatever bytes a client sent."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def redact_url(url: str) -> str:
    """A URL (or comma-separated URLs) fit for logs: ``nats://user:pass@host`` becomes
    ``nats://***@host``."""
    return _USERINFO_RE.sub("***@", url)
