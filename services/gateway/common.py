"""What the gateway's handlers share: the application's state (typed keys), the error answer,
reading path parameters and JSON bodies, and who the caller is."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from aiohttp import web

from core.redact import Redactor
from core.registry import Registry
from engine import ClaimsFor
from shared.bus import Bus
from shared.config import Config
from shared.errors import DefinitionError, NotFound
from shared.ids import is_workflow_id, split_task_key
from shared.messages import SubmitWorkflow, WorkflowRecord
from shared.parsing import DefinitionParser
from shared.store import Store
from shared.streams import Streams

from .responses import Error, ErrorBody, json_response

__all__ = [
    "ANONYMOUS",
    "BUS",
    "CALLER",
    "CLAIMS",
    "CONFIG",
    "PARSER",
    "RECENT",
    "RECENT_LIMIT",
    "REDACTOR",
    "REGISTRY",
    "STORE",
    "STREAMS",
    "caller",
    "error_response",
    "json_body",
    "lookup_workflow",
    "task_ids",
    "workflow_id",
]

BUS = web.AppKey("bus", Bus)
CONFIG = web.AppKey("config", Config)
REGISTRY = web.AppKey("registry", Registry)
REDACTOR = web.AppKey("redactor", Redactor)
STORE = web.AppKey("store", Store)
STREAMS = web.AppKey("streams", Streams)
CLAIMS: web.AppKey[ClaimsFor] = web.AppKey("claims")
PARSER = web.AppKey("parser", DefinitionParser)
# Submissions this gateway accepted, by workflow id: (name, number of tasks, submitted at).
# Their summaries are answered from here until the scheduler writes the record, rather than by
# reading the submission back from JetStream (a 10,000-task definition is about 1 MB).
RECENT = web.AppKey("recent", dict[str, tuple[str, int, datetime]])
RECENT_LIMIT = 1024
# Who made a request: the name of the user whose token it carried (``[gateway] users``),
# ``operator`` for ``[gateway] auth_token``, ``anonymous`` when authentication is off.
CALLER = "caller"
ANONYMOUS = "anonymous"


def error_response(status: int, code: str, message: str, **details: Any) -> web.Response:
    body = ErrorBody(code=code, message=message)
    if details:
        body.details = details
    return json_response(Error(error=body), status=status)


def workflow_id(request: web.Request) -> str:
    wf_id = request.match_info["id"]
    if not is_workflow_id(wf_id):
        raise NotFound(f"no workflow {wf_id!r}", workflow_id=wf_id[:100])
    return wf_id


def task_ids(request: web.Request) -> tuple[str, str]:
    try:
        return split_task_key(request.match_info["id"])
    except ValueError:
        raise NotFound(f"no task {request.match_info['id'][:100]!r}") from None


async def json_body(request: web.Request) -> Any:
    body = await request.read()
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise DefinitionError("malformed JSON body", reason="malformed") from None


def caller(request: web.Request) -> str:
    return str(request.get(CALLER, ANONYMOUS))


async def lookup_workflow(
    request: web.Request, wf_id: str
) -> tuple[WorkflowRecord, int] | SubmitWorkflow | None:
    """The workflow's record, else its submission still waiting in the queue (accepted, not
    taken by the scheduler yet), else None.

    Checked record, queue, record: the scheduler writes the record before it acks (removes) the
    submission, so a workflow being taken over between the first two looks is seen by the third.
    """
    store = request.app[STORE]
    found = await store.workflow(wf_id)
    if found is not None:
        return found
    pending = await request.app[STREAMS].pending_submission(wf_id)
    if pending is not None:
        return pending
    return await store.workflow(wf_id)
