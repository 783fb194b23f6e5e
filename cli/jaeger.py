"""Reading a trace back from Jaeger's query API, as a tree of spans with durations."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

__all__ = ["fetch_spans", "render_tree"]


def fetch_spans(jaeger_ui: str, trace_id: str, timeout_s: float = 3) -> list[dict[str, Any]] | None:
    """``[{"span_id", "parent_id", "name", "service", "start_us", "duration_us"}]``, or None when
    Jaeger does not answer (or does not know the trace yet)."""
    if not jaeger_ui.startswith(("http://", "https://")):
        return None
    url = f"{jaeger_ui.rstrip('/')}/api/traces/{trace_id}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - http(s) only
            document = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    data = document.get("data") or []
    if not data:
        return None
    trace = data[0]
    processes = trace.get("processes", {})
    spans = []
    for span in trace.get("spans", []):
        parent = next(
            (r["spanID"] for r in span.get("references", []) if r.get("refType") == "CHILD_OF"),
            None,
        )
        spans.append(
            {
                "span_id": span["spanID"],
                "parent_id": parent,
                "name": span.get("operationName", "?"),
                "service": processes.get(span.get("processID"), {}).get("serviceName", "?"),
                "start_us": int(span.get("startTime", 0)),
                "duration_us": int(span.get("duration", 0)),
            }
        )
    return spans


def render_tree(spans: list[dict[str, Any]]) -> str:
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in spans:
        parent = span["parent_id"] if span["parent_id"] in ids else None
        children.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s["start_us"]):
            label = f"{'  ' * depth}{span['name']}"
            lines.append(
                f"{label:<60} {span['service']:<24} {span['duration_us'] / 1000:>10.1f} ms"
            )
            walk(span["span_id"], depth + 1)

    walk(None, 0)
    return "\n".join(lines)
