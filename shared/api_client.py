"""A small synchronous HTTP client for the gateway (standard library only)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from shared.errors import ProvisioningError

__all__ = ["ApiClient", "ApiError", "OrchestratorUnavailable"]


class ApiError(ProvisioningError):
    """Raised when the gateway answers with an error; carries its status and code."""

    code = "api_error"

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message, status=status, api_code=code, details=details)
        self.status = status
        self.api_code = code


class OrchestratorUnavailable(ProvisioningError):
    """Raised when nothing answers at the orchestrator's endpoint."""

    code = "orchestrator_unavailable"


class ApiClient:
    def __init__(self, endpoint: str, *, token: str = "", timeout_s: float = 60) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise ProvisioningError(
                f"the orchestrator endpoint must be http(s)://, not {endpoint!r}"
            )
        self.endpoint = endpoint.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    @staticmethod
    def _api_error(exc: urllib.error.HTTPError) -> ApiError:
        try:
            error = json.loads(exc.read())["error"]
            return ApiError(
                exc.code, error.get("code", "error"), error.get("message", ""), error.get("details")
            )
        except (ValueError, KeyError, TypeError):
            return ApiError(exc.code, "http_error", f"HTTP {exc.code} {exc.reason}")

    def call(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        raw: bytes | None = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> Any:
        body = (
            raw
            if raw is not None
            else (json.dumps(payload).encode() if payload is not None else None)
        )
        hdrs = (
            {"Content-Type": content_type, **(headers or {})}
            if body is not None
            else dict(headers or {})
        )
        hdrs = {**hdrs}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(  # noqa: S310 - scheme checked in __init__
            f"{self.endpoint}{path}", data=body, method=method, headers=hdrs
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise self._api_error(exc) from None
        except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise OrchestratorUnavailable(
                f"no orchestrator answers at {self.endpoint} ({reason})", endpoint=self.endpoint
            ) from None

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def post(self, path: str, payload: Any = None, **kwargs: Any) -> Any:
        return self.call("POST", path, payload if payload is not None else {}, **kwargs)

    def health(self, timeout_s: float = 3) -> dict[str, Any]:
        """The health document, also when the gateway answers 503."""
        request = urllib.request.Request(f"{self.endpoint}/health")  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            try:
                return dict(json.loads(exc.read()))
            except ValueError:
                return {"status": "unhealthy", "detail": f"HTTP {exc.code}"}
        except (TimeoutError, urllib.error.URLError, ConnectionError, ValueError) as exc:
            raise OrchestratorUnavailable(
                f"no orchestrator answers at {self.endpoint} ({getattr(exc, 'reason', exc)})"
            ) from None

    def log_lines(
        self, task_id: str, *, attempt: int | None = None, page: int = 5000
    ) -> Iterator[dict[str, Any]]:
        """Every stored log line of a task (of one attempt), page by page, oldest first."""
        query = f"limit={page}" + (f"&attempt={attempt}" if attempt else "")
        cursor = ""
        while True:
            body = self.get(f"/tasks/{task_id}/logs?{query}{cursor}")
            yield from body["lines"]
            if not body.get("next_cursor") or not body["lines"]:
                return
            cursor = f"&cursor={body['next_cursor']}"

    def stream(
        self, path: str, *, reconnect_for_s: float = 30
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Server-Sent Events as ``(event, data)``; reconnects with Last-Event-ID if dropped."""
        last_id = ""
        deadline: float | None = None
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id:
                headers["Last-Event-ID"] = last_id
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            request = urllib.request.Request(f"{self.endpoint}{path}", headers=headers)  # noqa: S310
            try:
                with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
                    deadline = None
                    event, data = "message", ""
                    for raw in response:
                        line = raw.decode("utf-8", "replace").rstrip("\r\n")
                        if not line:
                            if data:
                                yield event, json.loads(data)
                            event, data = "message", ""
                        elif line.startswith("id:"):
                            last_id = line[3:].strip()
                        elif line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:"):
                            data += line[5:].strip()
                    return  # the server closed the stream: the workflow ended
            except urllib.error.HTTPError as exc:
                raise self._api_error(exc) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                now = time.monotonic()
                deadline = deadline or now + reconnect_for_s
                if now > deadline:
                    raise OrchestratorUnavailable(f"event stream lost: {exc}") from None
                time.sleep(1)
