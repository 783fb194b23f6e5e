"""``health``, ``env``, ``version``, ``trace``, ``orchestrator`` and ``completion``."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from shared import API_VERSION, __version__
from shared.api_client import OrchestratorUnavailable
from shared.auth import redact_url

from ..context import (
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    State,
    fail,
    output_option,
    user_errors,
)
from ..localstack import running_pid, start_background, stop_background, wait_healthy
from ..render import emit, health_text, table

__all__ = ["concurrency", "env", "health", "orchestrator", "trace", "version"]

START_WAIT_S = 60


@click.command()
@output_option
@click.pass_obj
def health(state: State, output: str) -> None:
    """Whether the orchestrator and its NATS answer."""
    with user_errors():
        doc = state.client().health()
        emit(doc, output, lambda d: health_text(d, state.config.orchestrator.endpoint))
        if doc.get("status") != "healthy":
            sys.exit(EXIT_UNAVAILABLE)


@click.command()
@output_option
@click.pass_obj
def env(state: State, output: str) -> None:
    """The effective configuration and where each value came from."""
    secret = ("auth_token", "password", "token")
    rows = []
    for key, value in state.config.flat().items():
        shown = "********" if key.endswith(secret) and value else value
        if key == "gateway.users":  # names are not secret; their tokens are
            shown = dict.fromkeys(value, "********")
        if key.endswith("url") and isinstance(value, str):
            shown = redact_url(value)  # nats://user:password@host
        rows.append(
            {"key": key, "value": shown, "source": state.config.sources.get(key, "default")}
        )
    emit(
        rows,
        output,
        lambda r: table(
            [
                [
                    x["key"],
                    json.dumps(x["value"]) if not isinstance(x["value"], str) else x["value"],
                    x["source"],
                ]
                for x in r
            ],
            ["key", "value", "source"],
        ),
    )


@click.command()
@output_option
@click.pass_obj
def version(state: State, output: str) -> None:
    """CLI, API and orchestrator versions, and whether they are compatible."""
    info: dict[str, Any] = {
        "cli": __version__,
        "api": API_VERSION,
        "orchestrator": None,
        "orchestrator_api": None,
        "compatible": None,
    }
    try:
        doc = state.client().health()
        info["orchestrator"], info["orchestrator_api"] = doc.get("version"), doc.get("api_version")
        same_major = str(doc.get("version", "")).split(".")[:2] == __version__.split(".")[:2]
        info["compatible"] = doc.get("api_version") == API_VERSION and same_major
    except OrchestratorUnavailable:
        pass
    emit(
        info,
        output,
        lambda i: (
            f"cli {i['cli']} (api {i['api']})\norchestrator "
            + (
                f"{i['orchestrator']} (api {i['orchestrator_api']}): "
                f"{'compatible' if i['compatible'] else 'INCOMPATIBLE'}"
                if i["orchestrator"]
                else "not reachable"
            )
        ),
    )


@click.command()
@click.argument("workflow_id")
@output_option
@click.pass_obj
def trace(state: State, workflow_id: str, output: str) -> None:
    """The Jaeger link of a workflow's trace, and its span tree when Jaeger answers."""
    from ..jaeger import fetch_spans, render_tree

    with user_errors():
        view = state.client().get(f"/workflows/{workflow_id}?tasks=false")
        trace_id = view.get("trace_id")
        if not trace_id:
            fail("this workflow has no trace id (tracing disabled?)", EXIT_NOT_FOUND)
        jaeger = state.config.tracing.jaeger_ui.rstrip("/")
        spans = fetch_spans(jaeger, trace_id)
        info = {
            "workflow_id": workflow_id,
            "trace_id": trace_id,
            "url": f"{jaeger}/trace/{trace_id}",
            "spans": spans,
        }

        def text(d: dict[str, Any]) -> str:
            head = f"trace {d['trace_id']}\n{d['url']}"
            if d["spans"]:
                return f"{head}\n\n{render_tree(d['spans'])}"
            return f"{head}\n(Jaeger's query API did not answer at {jaeger}: no span tree)"

        emit(info, output, text)


@click.group()
def concurrency() -> None:
    """Concurrency keys: who holds them, who waits."""


@concurrency.command("list")
@output_option
@click.pass_obj
def concurrency_list(state: State, output: str) -> None:
    """Every key in use: limit, holders, waiters in order, rate window."""
    with user_errors():
        doc = state.client().get("/concurrency")

        def text(d: dict[str, Any]) -> str:
            if not d["keys"]:
                return "no concurrency key in use"
            rows = []
            for k in d["keys"]:
                rate = k.get("rate")
                window = (
                    f"{rate['started_in_window']}/{rate['count']} per {rate['window_seconds']:g}s"
                    if rate
                    else "-"
                )
                rows.append(
                    [
                        k["key"],
                        "-" if k["limit"] is None else k["limit"],
                        ", ".join(k["holders"]) or "-",
                        ", ".join(k["waiters"]) or "-",
                        window,
                    ]
                )
            return table(rows, ["key", "limit", "holders", "waiters (in order)", "rate"])

        emit(doc, output, text)


@click.group()
def orchestrator() -> None:
    """Run the orchestrator locally."""


@orchestrator.command("start")
@click.pass_obj
def orchestrator_start(state: State) -> None:
    """Start the local stack in the background."""
    with user_errors():
        if pid := running_pid(state.config):
            click.echo(f"already running (pid {pid})")
            return
        pid = start_background(state.config)
        if not wait_healthy(state.client(), START_WAIT_S):
            fail(
                f"started (pid {pid}) but not healthy; see {state.config.data_dir / 'logs'}",
                EXIT_UNAVAILABLE,
            )
        click.echo(f"orchestrator running (pid {pid}) at {state.config.orchestrator.endpoint}")


@orchestrator.command("stop")
@click.pass_obj
def orchestrator_stop(state: State) -> None:
    """Stop the local stack started with `start` (or by auto_start)."""
    pid = running_pid(state.config)
    if not pid:
        click.echo("not running")
        return
    if not stop_background(state.config):
        fail(f"pid {pid} did not stop", EXIT_FAILED)
    click.echo("stopped")


@orchestrator.command("status")
@output_option
@click.pass_obj
def orchestrator_status(state: State, output: str) -> None:
    """Whether the local stack runs and answers."""
    pid = running_pid(state.config)
    try:
        health_doc = state.client().health()
    except OrchestratorUnavailable:
        health_doc = {"status": "unreachable"}
    info = {
        "pid": pid,
        "endpoint": state.config.orchestrator.endpoint,
        "status": health_doc.get("status"),
    }
    emit(
        info,
        output,
        lambda i: (
            f"{i['status']} at {i['endpoint']}" + (f" (local pid {i['pid']})" if i["pid"] else "")
        ),
    )
    if info["status"] != "healthy":
        sys.exit(EXIT_UNAVAILABLE)


@orchestrator.command("up", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def orchestrator_up(state: State, args: tuple[str, ...]) -> None:
    """Run the local stack in the foreground (same as `provisioning-orchestrator up`)."""
    os.execv(  # noqa: S606 - replaces this process with the service runner
        sys.executable,
        [sys.executable, "-m", "services", "--data-dir", str(state.config.data_dir), "up", *args],
    )
