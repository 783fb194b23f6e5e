"""A burst of submissions while the gateway is killed (-9) and restarted: every 202 completes,
exactly once; every refusal is clear (connection refused, or a JSON error body, never a 5xx
with a traceback); a client that retries with its Idempotency-Key ends with one workflow."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from shared.ids import idempotent_workflow_id

from .faults import Audit, audit_workflow, sleep, submit_retrying
from .support import Stack, wait_until

pytestmark = pytest.mark.e2e

SUBMISSIONS = 200
OVER_S = 5.0


def _definition(i: int) -> dict[str, Any]:
    return {
        "name": f"burst-{i}",
        "tasks": [sleep("a", 0.2), {"id": "b", "action": "builtin.noop", "depends_on": ["a"]}],
    }


def _keyed(i: int) -> bool:
    return i % 2 == 0


def _post(base: str, i: int) -> tuple[str, Any]:
    """One submission, classified: ``accepted`` (202, the workflow id), ``refused`` (the
    connection was refused), ``error`` (a JSON error body: its status and code), ``cut`` (the
    gateway died with the request in flight), ``bad`` (anything else: the test fails)."""
    headers = {"Content-Type": "application/json"}
    if _keyed(i):
        headers["Idempotency-Key"] = f"burst-{i}"
    request = urllib.request.Request(
        f"{base}/workflows",
        data=json.dumps(_definition(i)).encode(),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read()
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return "refused", None
        if isinstance(exc.reason, ConnectionResetError | socket.timeout):
            return "cut", repr(exc.reason)
        return "bad", repr(exc)
    except (ConnectionResetError, http.client.HTTPException, TimeoutError) as exc:
        return "cut", repr(exc)
    try:
        body = json.loads(text)
    except ValueError:
        return "bad", (status, text[:300])
    if status == 202 and isinstance(body.get("workflow_id"), str):
        return "accepted", body["workflow_id"]
    error = body.get("error") if isinstance(body, dict) else None
    if (
        isinstance(error, dict)
        and error.get("message")
        and error.get("code") not in (None, "internal")
        and status in (429, 503)
    ):
        return "error", (status, error["code"])
    return "bad", (status, body)


@pytest.mark.stack(executors=2)
def test_burst_while_gateway_is_killed_and_restarted(stack: Stack) -> None:
    audit = Audit()
    base = stack.http.base
    t0 = time.monotonic()

    def paced(i: int) -> tuple[str, Any]:
        time.sleep(max(0.0, t0 + i * OVER_S / SUBMISSIONS - time.monotonic()))
        return _post(base, i)

    with ThreadPoolExecutor(max_workers=24) as pool:
        futures = [pool.submit(paced, i) for i in range(SUBMISSIONS)]
        for at, down_s in ((1.2, 0.0), (3.0, 0.8)):  # restarted at once, then after a pause
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            stack.gateway.kill9()
            audit.fault("kill -9 gateway during a burst")
            time.sleep(down_s)
            stack.gateway.start()
        outcomes = [f.result() for f in futures]

    tally = Counter(kind for kind, _ in outcomes)
    codes = Counter(d for k, d in outcomes if k == "error")
    print(f"burst outcomes: {dict(tally)}; error codes: {dict(codes)}")
    bad = [(i, d) for i, (k, d) in enumerate(outcomes) if k == "bad"]
    assert not bad, bad
    assert tally["accepted"] > 0 and tally["accepted"] < SUBMISSIONS, tally  # the kills hit it
    accepted = {i: d for i, (k, d) in enumerate(outcomes) if k == "accepted"}
    for i, wf_id in accepted.items():
        if _keyed(i):
            assert wf_id == idempotent_workflow_id(f"burst-{i}")

    stack.http.wait_healthy(30)
    # a client that was refused or cut off retries with its key: one workflow per key
    retried = {}
    for i, (kind, _) in enumerate(outcomes):
        if kind != "accepted" and _keyed(i):
            retried[i] = submit_retrying(stack.http, _definition(i), f"burst-{i}")
            assert retried[i] == idempotent_workflow_id(f"burst-{i}")

    # every accepted workflow, and every retried one, completes exactly once
    for wf_id in [*accepted.values(), *retried.values()]:
        audit_workflow(stack, wf_id, audit, timeout=180)

    # nothing else ran twice either: whatever a cut-off request left behind is one workflow
    status, listing = stack.http.get("/workflows?limit=500")
    assert status == 200, listing
    names = Counter(w["name"] for w in listing["workflows"])
    assert all(n == 1 for n in names.values()), [k for k, n in names.items() if n > 1]
    known = {*accepted.values(), *retried.values()}
    orphans = [w["workflow_id"] for w in listing["workflows"] if w["workflow_id"] not in known]
    for wf_id in orphans:  # unkeyed requests cut off after JetStream took them
        audit_workflow(stack, wf_id, audit, timeout=180)
    assert len(listing["workflows"]) == len(known) + len(orphans) <= SUBMISSIONS
    wait_until(lambda: all(s.alive for s in stack.services), 5)
    print(
        f"burst: {SUBMISSIONS} submissions, {tally['accepted']} accepted, "
        f"{tally['refused']} refused, {tally['error']} JSON errors, {tally['cut']} cut off; "
        f"{len(retried)} retried with their key; {len(orphans)} orphans completed"
    )
    audit.fault("submission refused or cut off", SUBMISSIONS - tally["accepted"])
    audit.report("burst with gateway kill -9")
