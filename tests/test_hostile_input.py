"""Hostile and malformed requests against every route of a real gateway (real NATS, scheduler,
executor): every answer is a 2xx or a clear 4xx JSON error, never a 5xx or a hung request, and
the services keep working afterwards.

One stack serves the whole module; the last test checks that it is still healthy: every
process alive, a normal workflow completes, nothing dead-lettered, no traceback logged.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shared.nickel_source import MAX_CONCURRENT

from .support import (
    PROBE_ENV,
    Stack,
    injection_payloads,
    running_stack,
    stream_state,
    wait_until,
)

pytestmark = pytest.mark.e2e

NOOP = {"id": "a", "action": "builtin.noop"}
VALID = {"name": "ok", "tasks": [NOOP]}
MAX_BODY = 4 * 1024 * 1024  # the gateway's default [gateway] max_body_bytes
COUNTS: Counter[str] = Counter()  # cases sent, by category (printed for docs/reliability.md)


# -- the client: raw enough to send anything -----------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Case:
    name: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    expect: tuple[int, ...] = ()  # allowed statuses; () = any 2xx or 4xx
    parser_error: bool = False  # refused by aiohttp's HTTP parser: a plain-text 4xx is fine


def send(port: int, case: Case, timeout: float = 60) -> Reply:
    """One request on a fresh connection; a request the server leaves hanging fails the test
    with a socket timeout."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(case.method, case.path, skip_accept_encoding=True)
        headers = dict(case.headers)
        chunked = headers.get("Transfer-Encoding") == "chunked"
        if case.body is not None and "Content-Length" not in headers and not chunked:
            headers["Content-Length"] = str(len(case.body))
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders()
        if case.body:
            try:
                if headers.get("Transfer-Encoding") == "chunked":
                    for start in range(0, len(case.body), 65536):
                        piece = case.body[start : start + 65536]
                        conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    conn.send(b"0\r\n\r\n")
                else:
                    conn.send(case.body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered early (e.g. 413) and closed: read what it said
        response = conn.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


def send_raw(port: int, data: bytes, timeout: float = 30) -> Reply:
    """Bytes that are not a well-formed HTTP request, straight on a socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return Reply(status, headers, body)


def check_reply(case: Case, reply: Reply) -> None:
    """2xx, or a 4xx with ``{"error": {"code", "message"}}``; never a 5xx."""
    where = f"{case.name}: {case.method} {case.path[:120]} -> {reply.status} {reply.body[:300]!r}"
    assert reply.status < 500, where
    if case.parser_error and reply.status in (400, 413, 431):
        return  # aiohttp's parser refused it before any handler: plain text, by design
    if case.expect:
        assert reply.status in case.expect, where
    else:
        assert 200 <= reply.status < 300 or 400 <= reply.status < 500, where
    if reply.status >= 400:
        assert reply.headers.get("Content-Type", "").startswith("application/json"), where
        error = reply.json()["error"]
        assert isinstance(error["code"], str) and error["code"], where
        assert isinstance(error["message"], str) and error["message"], where
        assert "Traceback" not in error["message"], where


def run_cases(stack: Stack, cases: list[Case], category: str) -> list[tuple[Case, Reply]]:
    results = []
    failures = []
    for case in cases:
        reply = send(stack.port, case)
        COUNTS[category] += 1
        try:
            check_reply(case, reply)
        except (AssertionError, ValueError, KeyError) as exc:
            failures.append(f"{exc}")
        results.append((case, reply))
    assert not failures, "\n".join(failures)
    return results


def post_json(path: str, value: Any, name: str, *expect: int, **headers: Any) -> Case:
    body = value if isinstance(value, bytes) else json.dumps(value).encode()
    return Case(name, "POST", path, body, {"Content-Type": "application/json", **headers}, expect)


def wf(*tasks: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"name": fields.pop("name", "hostile"), "tasks": list(tasks or [NOOP]), **fields}


def task(**fields: Any) -> dict[str, Any]:
    return {**NOOP, **fields}


def nested(depth: int, open_: str = "[", close: str = "]", inner: str = "") -> str:
    return open_ * depth + inner + close * depth


# -- the stack ------------------------------------------------------------------------------------


@dataclass
class Hostile:
    stack: Stack
    done_wf: str  # a completed workflow
    done_task: str  # <workflow>.<task> of a completed task
    holder_wf: str  # a workflow with a task running all along
    running_task: str
    marker: Path
    accepted: list[str] = field(default_factory=list)  # workflows the cases got accepted


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    tmp = tmp_path_factory.mktemp("hostile")
    with running_stack(tmp, executors=1, env=PROBE_ENV) as stack:
        status, accepted = stack.http.post("/workflows", wf(name="done"))
        assert status == 202, accepted
        done_wf = accepted["workflow_id"]
        assert stack.http.wait_workflow(done_wf)["status"] == "completed"
        holder = wf(task(id="hold", action="builtin.sleep", args={"seconds": 900}), name="holder")
        status, accepted = stack.http.post("/workflows", holder)
        assert status == 202, accepted
        holder_wf = accepted["workflow_id"]
        wait_until(
            lambda: stack.http.get(f"/tasks/{holder_wf}.hold")[1].get("status") == "running",
            60,
            what="the holder task to run",
        )
        yield Hostile(stack, done_wf, f"{done_wf}.a", holder_wf, f"{holder_wf}.hold", tmp / "pwned")
    print("\nhostile-input cases " + json.dumps(dict(COUNTS), sort_keys=True))


# -- the table ------------------------------------------------------------------------------------


def malformed_bodies() -> list[Case]:
    p = "/workflows"
    big_digits = b'{"name":"x","tasks":[{"id":"a","action":"builtin.noop","args":{"n":1' + (
        b"0" * 5000 + b"}}]}"
    )
    return [
        post_json(p, b"", "empty body", 400),
        post_json(p, b"{", "truncated", 400),
        post_json(p, b'{"name": "x", "tasks": [', "truncated array", 400),
        post_json(p, b'{"name":"x","tasks":[]} trailing', "trailing garbage", 400),
        post_json(p, b"null", "null", 422),
        post_json(p, b"[]", "array", 422),
        post_json(p, b"123", "number", 422),
        post_json(p, b'"workflow"', "string", 422),
        post_json(p, b"true", "boolean", 422),
        post_json(p, b"\xff\xfe\xfd", "not UTF-8", 400),
        post_json(p, b'{"name":"\xc0\xaf","tasks":[]}', "overlong UTF-8", 400),
        post_json(p, b'{"name":"a\x01b","tasks":[]}', "raw control character", 400),
        post_json(p, b"\xef\xbb\xbf" + json.dumps(VALID).encode(), "UTF-8 BOM", 202, 400),
        post_json(p, json.dumps(VALID).encode("utf-16"), "UTF-16", 202, 400),
        post_json(p, b"{'name': 'x'}", "single quotes", 400),
        post_json(p, b'{"name":"x","tasks":[{"id":"a","action":"builtin.noop",}]}', "comma", 400),
        post_json(p, json.dumps(wf(task(args={"n": 1}))).replace("1}", "NaN}"), "NaN", 422),
        post_json(p, json.dumps(wf(task(args={"n": 1}))).replace("1}", "Infinity}"), "Inf", 422),
        post_json(p, json.dumps(wf(task(args={"n": 1}))).replace("1}", "1e400}"), "1e400", 422),
        post_json(p, wf(task(args={"n": 10**30})), "integer beyond 64 bits", 422),
        post_json(p, wf(task(args={"n": -(10**30)})), "negative beyond 64 bits", 422),
        post_json(p, big_digits, "5000-digit integer", 400),
        post_json(
            p,
            b'{"name":"a","name":"b","tasks":[{"id":"a","action":"builtin.noop"}]}',
            "duplicate keys",
            202,
        ),
    ]


def wrong_types() -> list[Case]:
    p = "/workflows"
    cases = [
        ("name int", {"name": 1, "tasks": [NOOP]}),
        ("name null", {"name": None, "tasks": [NOOP]}),
        ("name empty", {"name": "", "tasks": [NOOP]}),
        ("name too long", {"name": "n" * 201, "tasks": [NOOP]}),
        ("name list", {"name": ["x"], "tasks": [NOOP]}),
        ("tasks object", {"name": "x", "tasks": {"a": NOOP}}),
        ("tasks string", {"name": "x", "tasks": "a"}),
        ("tasks null", {"name": "x", "tasks": None}),
        ("task int", {"name": "x", "tasks": [1]}),
        ("task null", {"name": "x", "tasks": [None]}),
        ("task list", {"name": "x", "tasks": [["a", "builtin.noop"]]}),
        ("id int", wf(task(id=1))),
        ("id empty", wf(task(id=""))),
        ("id too long", wf(task(id="i" * 65))),
        ("id with dot", wf(task(id="a.b"))),
        ("id with space", wf(task(id="a b"))),
        ("action list", wf(task(action=["builtin.noop"]))),
        ("action empty", wf(task(action=""))),
        ("action too long", wf(task(action="a." + "b" * 200))),
        ("action uppercase", wf(task(action="BUILTIN.NOOP"))),
        ("args list", wf(task(args=[1, 2]))),
        ("args string", wf(task(args="x"))),
        ("args null", wf(task(args=None))),
        ("depends_on string", wf(task(depends_on="b"))),
        ("depends_on ints", wf(task(depends_on=[1]))),
        ("depends_on null", wf(task(depends_on=None))),
        ("priority string", wf(task(priority="highest"))),  # not a named level
        ("priority name padded", wf(task(priority=" high"))),
        ("priority name in a list", wf(task(priority=["high"]))),
        ("workflow priority string", wf(priority="urgent")),
        ("priority huge", wf(task(priority=10**10))),
        ("priority float", wf(task(priority=1.5))),
        ("priority bool", wf(task(priority=True))),
        ("workflow priority", wf(priority=-1001)),
        ("retries negative", wf(task(retries=-1))),
        ("retries too many", wf(task(retries=101))),
        ("retries string", wf(task(retries="3"))),
        ("timeout zero", wf(task(timeout_seconds=0))),
        ("timeout negative", wf(task(timeout_seconds=-1))),
        ("timeout string", wf(task(timeout_seconds="60"))),
        ("timeout beyond a week", wf(task(timeout_seconds=10**9))),
        ("backoff string", wf(task(backoff="exponential"))),
        ("backoff multiplier 0", wf(task(backoff={"multiplier": 0}))),
        ("backoff negative", wf(task(backoff={"initial_seconds": -1}))),
        ("pool empty", wf(task(pool=""))),
        ("pool traversal", wf(task(pool="../x"))),
        ("pool wildcard", wf(task(pool=">"))),
        ("on_failure unknown", wf(on_failure="explode")),
        ("on_failure int", wf(on_failure=1)),
        ("description too long", wf(description="d" * 2001)),
        ("description int", wf(description=5)),
        ("missing everything", {}),
        ("missing tasks", {"name": "x"}),
        ("missing name", {"tasks": [NOOP]}),
        ("task missing id", wf({"action": "builtin.noop"})),
        ("task missing action", wf({"id": "a"})),
        ("unknown top-level field", {**VALID, "extra": 1}),
        ("unknown task field", wf(task(retry=3))),
        ("unknown backoff field", wf(task(backoff={"jitter": 1}))),
        ("args with a key true (YAML 1.1 style)", None),  # YAML case below
    ]
    out = [post_json(p, body, name, 422) for name, body in cases if body is not None]
    out.append(
        Case(
            "YAML key `on:` becomes true",
            "POST",
            p,
            b"name: y\ntasks:\n- {id: a, action: builtin.noop, args: {on: 1}}\n",
            {"Content-Type": "application/yaml"},
            (422,),
        )
    )
    out.append(
        Case(
            "YAML null key",
            "POST",
            p,
            b"name: y\ntasks:\n- {id: a, action: builtin.noop, args: {x: {null: 1}}}\n",
            {"Content-Type": "application/yaml"},
            (422,),
        )
    )
    return out


def huge_inputs(h: Hostile) -> list[Case]:
    p = "/workflows"
    return [
        post_json(
            p,
            wf(description="d" * 10, name="x" * 100) | {"pad": "x" * (MAX_BODY + 1000)},
            "body over max_body_bytes",
            413,
        ),
        Case(
            "chunked body over the limit",
            "POST",
            p,
            b" " * (MAX_BODY + 70_000),
            {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
            (413,),
        ),
        Case(
            "YAML over the limit",
            "POST",
            p,
            b"#" * (MAX_BODY + 10),
            {"Content-Type": "application/yaml"},
            (413,),
        ),
        post_json(p, wf(*[task(id=f"t{i}") for i in range(25_000)]), "25,000 tasks", 422),
        post_json(p, wf(task(args={"blob": "x" * 1_000_000})), "1 MB string argument", 202),
        post_json(p, wf(task(args={"many": list(range(200_000))})), "200,000-item array", 202),
        post_json(
            p,
            b'{"name":"x","tasks":[{"id":"a","action":"builtin.noop","args":{"z":['
            + b"0," * 1_100_000
            + b"0]}}]}",
            "1.1 million-item array",
            422,
        ),
        post_json(
            p,
            wf(task(depends_on=[f"u{i}" for i in range(10_000)])),
            "10,000 unknown dependencies",
            422,
        ),
        post_json(p, wf(task(args={f"k{i}": i for i in range(100_000)})), "100,000 keys", 202),
        post_json(
            f"/tasks/{h.running_task}/progress",
            {"progress": 1, "message": "m" * (MAX_BODY + 1)},
            "progress body over the limit",
            413,
        ),
        post_json(
            "/workflows/servers/create",
            {"infra": "i" * (MAX_BODY + 1)},
            "shortcut body over the limit",
            413,
        ),
    ]


def deep_nesting(h: Hostile) -> list[Case]:
    p = "/workflows"
    deep_args = '{"name":"x","tasks":[{"id":"a","action":"builtin.noop","args":{"d":%s}}]}'
    progress = f"/tasks/{h.running_task}/progress"

    def yaml(body: str) -> Case:
        return Case(
            f"YAML {body[:20]!r}",
            "POST",
            p,
            body.encode(),
            {"Content-Type": "application/yaml"},
            (400, 422),
        )

    billion_laughs = "name: x\ntasks:\n- id: a\n  action: builtin.noop\n  args:\n"
    billion_laughs += "    l0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, 10):
        billion_laughs += f"    l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    return [
        post_json(p, nested(100_000).encode(), "100k nested lists", 400),
        post_json(p, nested(100_000, '{"a":', "}", "1").encode(), "100k nested objects", 400),
        post_json(p, (deep_args % nested(100_000)).encode(), "100k nested lists in args", 400),
        post_json(p, (deep_args % nested(900)).encode(), "900 nested lists in args", 400, 422),
        post_json(p, (deep_args % nested(200)).encode(), "200 nested lists in args", 422),
        post_json(p, (deep_args % nested(60, '{"a":', "}", "1")).encode(), "60 levels", 202),
        yaml(nested(100_000)),
        yaml("a:\n" + "".join(" " * i + "- \n" for i in range(1, 2000))),
        yaml("&a [*a]"),
        yaml(billion_laughs),
        Case(
            "TOML nested arrays",
            "POST",
            p,
            ("a = " + nested(100_000)).encode(),
            {"Content-Type": "application/toml"},
            (400,),
        ),
        Case(
            "TOML dotted keys 5000 deep",
            "POST",
            p,
            (
                "name='x'\n[[tasks]]\nid='a'\naction='builtin.noop'\n[tasks.args]\n"
                + ".".join(["k"] * 5000)
                + " = 1\n"
            ).encode(),
            {"Content-Type": "application/toml"},
            (400, 422),
        ),
        Case(
            "Nickel 100k nested arrays",
            "POST",
            p,
            nested(100_000).encode(),
            {"Content-Type": "application/x-nickel"},
            (400, 422),
        ),
        Case(
            "Nickel that builds a huge value",
            "POST",
            p,
            b'{ name = "x", tasks = std.array.generate (fun i => { id = "t%{std.to_string i}",'
            b' action = "builtin.noop" }) 2000000 }',
            {"Content-Type": "application/x-nickel"},
            (413, 422),
        ),
        Case(
            "Nickel infinite recursion",
            "POST",
            p,
            b"let rec f = fun x => f (x + 1) in f 0",
            {"Content-Type": "application/x-nickel"},
            (422,),
        ),
        post_json(progress, nested(100_000).encode(), "progress 100k nested", 400),
        post_json(
            "/workflows/cluster/create",
            nested(100_000, '{"a":', "}", "1").encode(),
            "shortcut 100k nested",
            400,
        ),
        post_json(
            "/workflows/cluster/create",
            ('{"infra":"nope","params":{"apps":' + nested(900) + "}}").encode(),
            "shortcut params 900 deep",
            400,
            422,
        ),
    ]


def cycles_and_big_graphs() -> list[Case]:
    p = "/workflows"
    n = 10_000
    chain = [task(id=f"t{i}", depends_on=[f"t{i - 1}"] if i else []) for i in range(n)]
    ring = [task(id=f"t{i}", depends_on=[f"t{(i - 1) % n}"]) for i in range(n)]
    fan_in = [task(id=f"t{i}") for i in range(n - 1)]
    fan_in.append(task(id="sink", depends_on=[f"t{i}" for i in range(n - 1)]))
    return [
        post_json(p, wf(task(id="a", depends_on=["a"])), "self cycle", 422),
        post_json(
            p,
            wf(task(id="a", depends_on=["b"]), task(id="b", depends_on=["a"])),
            "two-task cycle",
            422,
        ),
        post_json(p, wf(*ring), "10,000-task ring", 422),
        post_json(
            p,
            wf(
                *chain[:-1],
                task(id="t9999", depends_on=["t9998", "t0"]),
                task(id="t0", depends_on=["t9999"]),
            ),
            "10,000 chain + duplicate",
            422,
        ),
        post_json(
            p,
            wf(*chain, task(id="x", depends_on=["t9999", "t0", "nope"])),
            "10,000 chain + unknown dependency",
            422,
        ),
        post_json(
            p,
            wf(*chain[:-1], task(id="t9999", depends_on=["t9998"], action="x.y")),
            "10,000 chain + unknown action at the end",
            422,
        ),
        post_json(
            p,
            wf(*fan_in[:-1], task(id="sink", depends_on=["t1", "t1"])),
            "duplicate dependency",
            422,
        ),
        post_json(p, wf(task(id="t0", depends_on=["sink"]), *fan_in[1:]), "fan-in + cycle", 422),
    ]


UNICODE = [
    "nul\u0000inside",
    "\u202eRTL override\u202c",
    "\u200f\u05e2\u05d1\u05e8\u05d9\u05ea \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "emoji \U0001f600\U0001f4a5",
    "zero\u200bwidth\u200djoiner",
    "\ufeffbom",
    "\uffff\ufffe noncharacters",
    "combining e\u0301\u0301\u0301\u0301",
    "\u0085\u2028\u2029 line separators",
    "\uff46\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 fullwidth",
]
LONE_SURROGATES = ['"\\ud800"', '"\\udfff"', '"a\\ud83d"', '"\\udc80\\udcff"']


def unicode_cases() -> list[Case]:
    p = "/workflows"
    cases = []
    for i, text in enumerate(UNICODE):
        body = wf(task(args={text: text}), name=text[:200], description=text)
        cases.append(post_json(p, body, f"unicode {i} in name, description, args", 202))
        cases.append(post_json(p, wf(task(id=text[:60])), f"unicode {i} in id", 422))
        cases.append(post_json(p, wf(task(action=f"builtin.{text}")), f"unicode {i} action", 422))
    for i, lone in enumerate(LONE_SURROGATES):
        base = '{"name":%s,"tasks":[{"id":"a","action":"builtin.noop","args":{%s:%s}}]}'
        cases.append(post_json(p, (base % (lone, '"k"', "1")).encode(), f"lone {i} name", 422))
        cases.append(post_json(p, (base % ('"n"', lone, "1")).encode(), f"lone {i} key", 422))
        cases.append(post_json(p, (base % ('"n"', '"k"', lone)).encode(), f"lone {i} val", 422))
    cases.append(
        post_json(
            p,
            b'{"name":"\\ud83d\\ude00","tasks":[{"id":"a","action":"builtin.noop"}]}',
            "escaped surrogate pair",
            202,
        )
    )
    for ct, body in (
        ("application/yaml", b'name: "a\\0b"\ntasks: [{id: a, action: builtin.noop}]\n'),
        ("application/yaml", b"name: a\x00b\ntasks: [{id: a, action: builtin.noop}]\n"),
        ("application/toml", b'name = "a\x00b"\n[[tasks]]\nid = "a"\naction = "builtin.noop"\n'),
        ("application/yaml", b"name: \xff\xfe\n"),
        ("application/toml", b"name = '\xff'\n"),
        ("application/x-nickel", b'{ name = "\xff" }'),
    ):
        cases.append(Case(f"{ct} with NUL or bad bytes", "POST", p, body, {"Content-Type": ct}))
    return cases


EXTRA_INJECTIONS = [
    "'; DROP TABLE workflows; --",
    '" OR 1=1 --',
    "${jndi:ldap://127.0.0.1:1/x}",
    "{{7*7}}${7*7}<%= 7*7 %>",
    "<script>alert(1)</script>",
    "../../../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "/etc/passwd",
    "prov.cmd.submit.>",
    "*",
    ">",
    "a.b.c",
    "\r\nX-Injected: 1",
    "%00%0d%0a",
    "-rf --no-preserve-root /",
    "$(printf '\\x41')",
]


def injections(h: Hostile) -> list[str]:
    return [*injection_payloads(h.marker), *EXTRA_INJECTIONS]


BAD_REFERENCE = "args holding ${ that is not a reference"


def escaped(value: Any) -> Any:
    """``value`` with every ``${`` in its strings (not keys) written ``$${``: literal text."""
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, list):
        return [escaped(v) for v in value]
    if isinstance(value, dict):
        return {k: escaped(v) for k, v in value.items()}
    return value


def injection_cases(h: Hostile) -> list[Case]:
    p = "/workflows"
    cases = []
    for i, text in enumerate(injections(h)):
        args = {text: text, "nested": [text, {"k": text}]}
        accepted = wf(task(args=args), name=text[:200])
        accepted["description"] = text
        if "${" in text:
            # In an argument's value, ${...} is a reference to a dependency's result: a payload
            # that is not one is a clean 422 (bad_reference) and is never evaluated; escaped
            # ($${ for a literal ${) it is plain text again, as everywhere else.
            cases.append(post_json(p, accepted, f"injection {i}: {BAD_REFERENCE}", 422))
            accepted = wf(task(args=escaped(args)), name=text[:200], description=text)
        cases.append(post_json(p, accepted, f"injection {i}: name, description, args", 202))
        for name, body in (
            ("id", wf(task(id=text))),
            ("action", wf(task(action=text))),
            ("depends_on", wf(task(depends_on=[text]))),
            ("pool", wf(task(pool=text))),
            ("on_failure", wf(on_failure=text)),
            ("priority", wf(task(priority=text))),
        ):
            cases.append(post_json(p, body, f"injection {i} in {name}", 422))
        quoted = urllib.parse.quote(text, safe="")
        for path in (
            f"/workflows/{quoted}",
            f"/workflows/{quoted}/events",
            f"/tasks/{quoted}",
            f"/tasks/{quoted}/logs",
            f"/tasks/{h.done_wf}.{quoted}",
            f"/plans/{quoted}",
        ):
            cases.append(Case(f"injection {i} in path {path[:30]}", "GET", path, expect=(404,)))
        for path in (
            f"/workflows/{quoted}/cancel",
            f"/workflows/{quoted}/retry",
            f"/workflows/{quoted}/approve",
            f"/workflows/{quoted}/reject",
            f"/tasks/{quoted}/progress",
            f"/plans/{quoted}/apply",
        ):
            cases.append(post_json(path, {"progress": 1}, f"injection {i} in POST path", 404))
        cases.append(
            Case(f"injection {i} in ?name", "GET", f"/workflows?name={quoted}", expect=(200,))
        )
        for param in ("status", "limit", "offset"):
            cases.append(
                Case(
                    f"injection {i} in ?{param}",
                    "GET",
                    f"/workflows?{param}={quoted}",
                    expect=(200, 400),
                )
            )
        cases.append(
            Case(
                f"injection {i} in ?tasks",
                "GET",
                f"/workflows/{h.done_wf}?tasks={quoted}",
                expect=(400,),  # a boolean, as the OpenAPI document says
            )
        )
        cases.append(
            Case(
                f"injection {i} in ?follow",
                "GET",
                f"/tasks/{h.done_task}/logs?follow={quoted}",
                expect=(400,),
            )
        )
        for path in ("/workflows/servers/create", "/workflows/taskserv/create"):
            cases.append(post_json(path, {"infra": text}, f"injection {i} in infra", 422))
        cases.append(
            post_json(
                "/workflows/servers/create",
                {"infra": "wuji", "params": {"servers": [text]}},
                f"injection {i} in params.servers",
                422,
            )
        )
        cases.append(
            post_json(
                "/workflows/taskserv/create",
                {"infra": "wuji", "params": {"taskserv": text}},
                f"injection {i} in params.taskserv",
                422,
            )
        )
        cases.append(
            post_json(
                "/workflows/cluster/create",
                {"infra": "wuji", "params": {"retries": text}},
                f"injection {i} in params.retries",
                422,
            )
        )
        cases.append(
            post_json(
                f"/tasks/{h.running_task}/progress",
                {"progress": 5, "message": text},
                f"injection {i} in progress message",
                202,
            )
        )
        cases.append(
            Case(
                f"injection {i} in Last-Event-ID",
                "GET",
                f"/workflows/{h.done_wf}/events",
                headers={"Last-Event-ID": _header(text)},
                expect=(200,),
                parser_error=refused_by_parser(_header(text)),
            )
        )
        cases.append(
            Case(
                f"injection {i} in traceparent",
                "GET",
                f"/workflows/{h.done_wf}",
                headers={"traceparent": _header(text)},
                expect=(200,),
                parser_error=refused_by_parser(_header(text)),
            )
        )
    return cases


def refused_by_parser(value: bytes | str) -> bool:
    """Control characters in a header value: aiohttp's parser refuses the request itself."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return any((b < 0x20 and b != 0x09) or b == 0x7F for b in raw)


def _header(text: str) -> bytes:
    """A header value http.client will send: UTF-8 bytes, line breaks folded away."""
    return text.replace("\r", " ").replace("\n", " ").encode("utf-8")


def traversal_cases(h: Hostile) -> list[Case]:
    p = "/workflows"
    names = [
        "../../etc/passwd",
        "..",
        "/etc/passwd",
        "builtin/../../x",
        "builtin.noop/../x",
        "%2e%2e/%2e%2e/etc",
        "..\\..\\windows",
        "~root",
        "file:///etc/passwd",
        "builtin..noop",
        "core.nulib.lib_provisioning",
    ]
    cases = []
    for i, name in enumerate(names):
        cases.append(post_json(p, wf(task(action=name)), f"traversal {i} action", 422))
        cases.append(post_json(p, wf(task(id=name)), f"traversal {i} id", 422))
        cases.append(
            post_json("/workflows/cluster/create", {"infra": name}, f"traversal {i} infra", 422)
        )
        cases.append(
            post_json(
                "/workflows/taskserv/create",
                {"infra": "wuji", "params": {"taskserv": name}},
                f"traversal {i} taskserv",
                422,
            )
        )
        cases.append(
            Case(
                f"traversal {i} Nickel import",
                "POST",
                p,
                f'let w = import "{name}" in {{ name = "x", tasks = [] }}'.encode(),
                {"Content-Type": "application/x-nickel"},
                (422,),
            )
        )
    for path in (
        "/workflows/../../etc/passwd",
        "/workflows/..%2f..%2fetc%2fpasswd",
        "/workflows/%2e%2e/%2e%2e/etc/passwd",
        "/workflows/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/tasks/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        f"/tasks/{h.done_wf}.%2e%2e/logs",
        f"/tasks/{h.done_wf}.a%2f..%2f..%2f/logs",
        "/tasks//etc/passwd",
        "//etc/passwd",
        "/workflows/%00",
        f"/workflows/{h.done_wf}%00",
        f"/workflows/{h.done_wf.upper()}",
        f"/workflows/{h.done_wf}/../../openapi.json",
        "/static/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/workflows/" + "a" * 5000,
    ):
        cases.append(Case(f"path {path[:40]}", "GET", path, expect=(200, 404)))
    cases.append(
        post_json(
            p,
            wf(task(action="probe.env", args={"path": "../../etc"})),
            "traversal in args (data only)",
            202,
        )
    )
    return cases


def content_type_cases(h: Hostile) -> list[Case]:
    p = "/workflows"
    valid = json.dumps(VALID).encode()
    cases = [
        Case(f"Content-Type {ct!r}", "POST", p, valid, {"Content-Type": ct}, (415,))
        for ct in (
            "text/plain",
            "multipart/form-data; boundary=x",
            "application/xml",
            "json",
            "application/json-patch+json",
            "*/*",
            "application/octet-stream",
        )
    ]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    cases += [
        Case("no Content-Type (JSON assumed)", "POST", p, valid, {}, (202,)),
        Case(
            "an empty Content-Type (JSON assumed)", "POST", p, valid, {"Content-Type": ""}, (202,)
        ),
        Case("an empty Content-Type, not JSON", "POST", p, b"a=b", {"Content-Type": ""}, (400,)),
        # curl's default for -d: a definition when the body is JSON, else what it says, a form
        Case("JSON as curl -d sends it", "POST", p, valid, form, (202,)),
        Case("a form", "POST", p, b"name=x&tasks=a", form, (415,)),
        Case("a form of JSON and more", "POST", p, valid + b"&x=1", form, (415,)),
        Case("an empty form", "POST", p, b"", form, (415,)),
        Case("uppercase type", "POST", p, valid, {"Content-Type": "APPLICATION/JSON"}, (202,)),
        Case(
            "charset latin-1",
            "POST",
            p,
            valid,
            {"Content-Type": "application/json; charset=latin-1"},
            (202, 400, 415),
        ),
        Case(
            "parameters galore",
            "POST",
            p,
            valid,
            {"Content-Type": 'application/json;;;a=b;;charset="x"'},
            (202, 400, 415),
        ),
        Case(
            "YAML body sent as JSON",
            "POST",
            p,
            b"name: x\ntasks: []\n",
            {"Content-Type": "application/json"},
            (400,),
        ),
        Case(
            "JSON body sent as YAML", "POST", p, valid, {"Content-Type": "application/yaml"}, (202,)
        ),
        Case(
            "JSON body sent as TOML", "POST", p, valid, {"Content-Type": "application/toml"}, (400,)
        ),
        Case(
            "TOML body sent as Nickel",
            "POST",
            p,
            b'name = "x"\n',
            {"Content-Type": "application/x-nickel"},
            (422,),
        ),
        Case(
            "form body to a shortcut",
            "POST",
            "/workflows/servers/create",
            b"infra=wuji",
            {"Content-Type": "application/x-www-form-urlencoded"},
            (400,),
        ),
        Case(
            "progress as text",
            "POST",
            f"/tasks/{h.running_task}/progress",
            b"50",
            {"Content-Type": "text/plain"},
            (202, 400, 415, 422),
        ),
    ]
    return cases


def query_cases(h: Hostile) -> list[Case]:
    def get(query: str, *expect: int, path: str = "/workflows") -> Case:
        return Case(f"query {query[:40]}", "GET", f"{path}?{query}", expect=expect)

    return [
        get("limit=abc", 400),
        get("limit=", 400),
        get("limit=-1", 200, 400),
        get("limit=0", 200, 400),
        get("limit=99999999999999999999999", 200, 400),
        get("limit=1e3", 400),
        get("limit=%20%205", 200, 400),
        get("limit=%D9%A5", 200, 400),  # Arabic-Indic five
        get("limit=%C2%B2", 400),  # superscript two: isdigit() but not int()
        get("limit=5&limit=abc", 200, 400),
        get("offset=abc", 400),
        get("offset=-5", 200, 400),
        get("offset=" + "9" * 30, 200, 400),
        get("status=bogus", 400),
        get("status=,,", 400),
        get("status=completed,completed", 200),
        get("status=COMPLETED", 200, 400),
        get("status=%00", 400),
        get("name=%00", 200),
        get("name=%ff%fe", 200),
        get("name=" + "n" * 4000, 200),
        get("%zz=%zz", 200),
        get("a[b]=c&&&=&", 200),
        get("tasks=maybe", 400, path=f"/workflows/{h.done_wf}"),  # true/false/1/0/yes/no only
        get("tasks=false", 200, path=f"/workflows/{h.done_wf}"),
        get("follow=maybe", 400, path=f"/tasks/{h.done_task}/logs"),
        get("follow=true", 200, path=f"/tasks/{h.done_task}/logs"),
        get("follow=%00", 400, path=f"/tasks/{h.done_task}/logs"),
        get("x=" + "y" * 7000, 200, 400, 414),
    ]


def idempotency_cases() -> list[Case]:
    p = "/workflows"
    body = json.dumps(VALID).encode()
    stamp = f"{time.time_ns()}"

    def key(value: bytes | str, *expect: int) -> Case:
        shown = value[:30] if isinstance(value, str) else value[:30].decode("latin-1")
        return Case(
            f"Idempotency-Key {shown!r}",
            "POST",
            p,
            body,
            {"Content-Type": "application/json", "Idempotency-Key": value},
            expect,
            parser_error=refused_by_parser(value),
        )

    return [
        key("", 400),
        key("   ", 400),
        key("k" * 201, 400),
        key("k" * 200 + stamp[:0], 202),
        Case(
            "Idempotency-Key of 10,000 characters",
            "POST",
            p,
            body,
            {"Content-Type": "application/json", "Idempotency-Key": "x" * 10_000},
            (400, 431),
            parser_error=True,
        ),
        key(f"unicode-\u00e9\u00e8-{stamp}".encode(), 202, 400),
        key(b"\xff\xfe\xfd-" + stamp.encode(), 202, 400),
        key(b"\x01\x02\x7f-" + stamp.encode(), 202, 400),
        key(f"'; DROP TABLE keys; --{stamp}", 202),
        key(f"../../etc/passwd{stamp}", 202),
        key(f"prov.cmd.>{stamp}", 202),
    ]


def last_event_id_cases(h: Hostile) -> list[Case]:
    path = f"/workflows/{h.done_wf}/events"
    values: list[bytes] = [
        b"abc",
        b"-1",
        b"",
        b"1e5",
        b"0x10",
        b" 3 ",
        b"99999999999999999999999999",
        b"9" * 19,
        b"9" * 5000,
        "\u00b2".encode(),  # superscript two
        "\u0661\u0662\u0663".encode(),  # Arabic-Indic digits
        b"\xff\xfe",
        b"3\x003",
    ]
    return [
        Case(
            f"Last-Event-ID {v[:20]!r}",
            "GET",
            path,
            headers={"Last-Event-ID": v},
            expect=(200, 400),
            parser_error=refused_by_parser(v),
        )
        for v in values
    ]


def progress_cases(h: Hostile) -> list[Case]:
    live = f"/tasks/{h.running_task}/progress"
    cases = [
        post_json(live, {"progress": 50}, "progress ok", 202),
        post_json(live, {"progress": 0, "message": ""}, "progress 0", 202),
        post_json(live, {"progress": 100, "message": "m" * 100_000}, "long message", 202),
        post_json(live, {"progress": 5, "unknown": 1}, "unknown field", 202, 422),
    ]
    for name, body in (
        ("101", {"progress": 101}),
        ("-1", {"progress": -1}),
        ("string", {"progress": "50"}),
        ("float", {"progress": 50.5}),
        ("bool", {"progress": True}),
        ("null", {"progress": None}),
        ("huge", {"progress": 10**30}),
        ("missing", {"message": "x"}),
        ("empty", {}),
        ("array", [50]),
        ("number", 50),
        ("message int", {"progress": 5, "message": 5}),
        ("message object", {"progress": 5, "message": {"a": 1}}),
        ("lone surrogate message", None),
    ):
        if body is not None:
            cases.append(post_json(live, body, f"progress {name}", 422))
    cases += [
        post_json(live, b'{"progress": 5, "message": "\\ud800"}', "lone surrogate", 202, 422),
        post_json(live, b"{", "progress malformed", 400),
        post_json(live, b"", "progress empty body", 400),
        post_json(f"/tasks/{h.done_task}/progress", {"progress": 1}, "finished task", 409),
        post_json(f"/tasks/{h.done_wf}.nope/progress", {"progress": 1}, "unknown task", 404),
        post_json(f"/tasks/{'0' * 32}.a/progress", {"progress": 1}, "unknown workflow", 404),
        post_json("/tasks/nope/progress", {"progress": 1}, "malformed task id", 404),
    ]
    return cases


def decision_and_plan_cases(h: Hostile) -> list[Case]:
    """Approvals, rejections, plans and concurrency keys: bodies, ids and states they refuse."""
    done, running = f"/workflows/{h.done_wf}", f"/workflows/{h.holder_wf}"
    unknown = f"/workflows/{'0' * 32}"
    cases = [
        post_json(f"{done}/approve", {}, "approve: nothing awaits", 409),
        post_json(f"{running}/approve", {}, "approve a running workflow", 409),
        post_json(f"{done}/approve", {"task": "a"}, "approve a task that does not wait", 409),
        post_json(f"{done}/approve", {"task": "a[0]"}, "approve a child's gate", 409),
        post_json(f"{unknown}/approve", {}, "approve an unknown workflow", 404),
        post_json("/workflows/nope/approve", {}, "approve a malformed id", 404),
        post_json(f"{done}/approve", b"{", "approve: malformed JSON", 400),
        post_json(f"{done}/approve", b"\xff", "approve: not UTF-8", 400),
        post_json(f"{done}/approve", [], "approve: an array", 422),
        post_json(f"{done}/approve", "yes", "approve: a string", 422),
        post_json(f"{done}/approve", {"task": 5}, "approve: task a number", 422),
        post_json(f"{done}/approve", {"task": "../x"}, "approve: task not a task id", 422),
        post_json(f"{done}/approve", {"comment": "c" * 1001}, "approve: long comment", 422),
        post_json(f"{done}/approve", {"comment": ["x"]}, "approve: comment a list", 422),
        post_json(f"{done}/approve", {"by": "admin"}, "approve: who decides is the caller", 422),
        Case("approve without a body", "POST", f"{done}/approve", b"", expect=(409,)),
        post_json(f"{done}/reject", {}, "reject without a reason", 422),
        post_json(f"{done}/reject", {"reason": ""}, "reject: empty reason", 422),
        post_json(f"{done}/reject", {"reason": "r" * 1001}, "reject: long reason", 422),
        post_json(f"{done}/reject", {"reason": None}, "reject: null reason", 422),
        post_json(f"{done}/reject", {"reason": "no", "x": 1}, "reject: unknown key", 422),
        post_json(f"{done}/reject", {"reason": "no"}, "reject: nothing awaits", 409),
        post_json(f"{done}/reject", b"{", "reject: malformed JSON", 400),
        post_json(f"{unknown}/reject", {"reason": "no"}, "reject an unknown workflow", 404),
        Case("reject without a body", "POST", f"{done}/reject", b"", expect=(422,)),
        Case("GET approve", "GET", f"{done}/approve", expect=(405,)),
        Case("GET reject", "GET", f"{done}/reject", expect=(405,)),
        Case("plan of a run", "GET", f"/plans/{h.done_wf}", expect=(404,)),
        Case("unknown plan", "GET", f"/plans/{'0' * 32}", expect=(404,)),
        Case("malformed plan id", "GET", "/plans/..%2f..%2fetc", expect=(404,)),
        Case("plan id with a query", "GET", f"/plans/{h.done_wf}?x=%00", expect=(404,)),
        Case("apply a run", "POST", f"/plans/{h.done_wf}/apply", b"", expect=(404,)),
        Case("apply an unknown plan", "POST", f"/plans/{'0' * 32}/apply", b"{}", expect=(404,)),
        Case("apply a malformed id", "POST", "/plans/nope/apply", b"", expect=(404,)),
        Case("GET apply", "GET", f"/plans/{h.done_wf}/apply", expect=(405,)),
        Case("DELETE plan", "DELETE", f"/plans/{h.done_wf}", expect=(405,)),
        Case("concurrency", "GET", "/concurrency", expect=(200,)),
        Case("concurrency query", "GET", "/concurrency?key=%00%ff&limit=-1", expect=(200,)),
        Case("POST concurrency", "POST", "/concurrency", b"{}", expect=(405,)),
        Case(
            "concurrency with a garbage traceparent",
            "GET",
            "/concurrency",
            headers={"traceparent": "00-zz-zz-zz"},
            expect=(200,),
        ),
    ]
    for query in ("plan=maybe", "plan=%00", "plan=" + "t" * 5000):
        cases.append(post_json(f"/workflows?{query}", VALID, f"submit ?{query[:20]}", 400))
    return cases


def method_and_route_cases(h: Hostile) -> list[Case]:
    cases = []
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"):
        for path in (
            "/workflows",
            f"/workflows/{h.done_wf}",
            f"/tasks/{h.done_task}",
            "/executors",
            "/health",
        ):
            cases.append(
                Case(
                    f"{method} {path[:20]}",
                    method,
                    path,
                    expect=(404, 405),
                    parser_error=method == "FOO",
                )
            )
    for path in (
        f"/workflows/{h.done_wf}/cancel",
        f"/workflows/{h.done_wf}/retry",
        f"/tasks/{h.done_task}/progress",
        "/workflows/servers/create",
    ):
        cases.append(Case(f"GET {path[-20:]}", "GET", path, expect=(405,)))
    for query in ("", "?limit=abc", "?x=%00%ff", "?" + "a" * 5000):
        cases.append(
            Case(f"GET /executors{query[:20]}", "GET", f"/executors{query}", expect=(200,))
        )
    cases.append(
        Case(
            "executors with a garbage traceparent",
            "GET",
            "/executors",
            headers={"traceparent": "00-zz-zz-zz", "tracestate": "=" * 500},
            expect=(200,),
        )
    )
    for path in ("/executors", "/openapi.json", "/health", f"/workflows/{h.done_wf}"):
        cases.append(Case(f"POST {path[-20:]}", "POST", path, b"{}", expect=(405,)))
    cases += [
        Case("HEAD /workflows", "HEAD", "/workflows", expect=(200,)),
        Case("unknown route", "GET", "/nope", expect=(404,)),
        Case("cancel finished", "POST", f"/workflows/{h.done_wf}/cancel", b"", expect=(409,)),
        Case("retry completed", "POST", f"/workflows/{h.done_wf}/retry", b"", expect=(409,)),
        Case(
            "cancel with a body",
            "POST",
            f"/workflows/{'0' * 32}/cancel",
            b"{" * 1000,
            expect=(404,),
        ),
        Case("cancel unknown", "POST", f"/workflows/{'f' * 32}/cancel", expect=(404,)),
        Case("retry unknown", "POST", f"/workflows/{'f' * 32}/retry", expect=(404,)),
        Case("events unknown", "GET", f"/workflows/{'f' * 32}/events", expect=(404,)),
        Case("logs unknown", "GET", f"/tasks/{'f' * 32}.a/logs?follow=true", expect=(404,)),
        Case("shortcut: no body", "POST", "/workflows/servers/create", expect=(400,)),
        post_json(
            "/workflows/servers/create", {"infra": "wuji", "extra": 1}, "shortcut extra", 422
        ),
        post_json("/workflows/servers/create", {"infra": 5}, "shortcut infra int", 422),
        post_json("/workflows/servers/create", {"params": {}}, "shortcut no infra", 422),
        post_json("/workflows/servers/create", {"infra": "wuji", "params": []}, "params list", 422),
        post_json(
            "/workflows/servers/create",
            {"infra": "wuji", "params": {"servers": "x"}},
            "params.servers string",
            422,
        ),
        post_json(
            "/workflows/cluster/create",
            {"infra": "wuji", "params": {"apps": 5}},
            "params.apps int",
            422,
        ),
        post_json(
            "/workflows/cluster/create",
            {"infra": "wuji", "params": {"retries": 10**9}},
            "params.retries huge",
            422,
        ),
        post_json(
            "/workflows/cluster/create",
            {"infra": "wuji", "params": {"retries": [1]}},
            "params.retries list",
            422,
        ),
        post_json(
            "/workflows/taskserv/create",
            {"infra": "wuji", "params": {"taskserv": "t" * 60}},
            "task id too long from the shortcut",
            422,
        ),
    ]
    return cases


RAW_REQUESTS: list[tuple[str, bytes]] = [
    ("garbage request line", b"HELLO\r\n\r\n"),
    ("no version", b"GET /health\r\n\r\n"),
    ("HTTP/0.9", b"GET /health HTTP/0.9\r\n\r\n"),
    ("HTTP/3.0", b"GET /health HTTP/3.0\r\nHost: x\r\n\r\n"),
    (
        "header too long",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    ),
    ("NUL in header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
    ("obs-fold", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"),
    ("bad Content-Length", b"POST /workflows HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
    (
        "negative Content-Length",
        b"POST /workflows HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    ),
    (
        "two Content-Lengths",
        b"POST /workflows HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    ),
    (
        "bad chunk size",
        b"POST /workflows HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"\r\nzz\r\n{}\r\n0\r\n\r\n",
    ),
    (
        "chunked and Content-Length",
        b"POST /workflows HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "unknown Transfer-Encoding",
        b"POST /workflows HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    ),
    ("space in path", b"GET /work flows HTTP/1.1\r\nHost: x\r\n\r\n"),
    (
        "absolute URI",
        b"GET http://evil.invalid/workflows HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ),
    ("10,000 headers", b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 10_000 + b"\r\n"),
    ("8 KB path", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
]


# -- the tests --------------------------------------------------------------------------------


def test_malformed_and_hostile_definitions(hostile: Hostile) -> None:
    stack = hostile.stack
    for category, cases in (
        ("malformed bodies", malformed_bodies()),
        ("wrong types, missing and unknown fields", wrong_types()),
        ("huge bodies and arrays", huge_inputs(hostile)),
        ("deep nesting", deep_nesting(hostile)),
        ("cycles and 10,000-task graphs", cycles_and_big_graphs()),
        ("unicode", unicode_cases()),
        ("content types", content_type_cases(hostile)),
    ):
        for case, reply in run_cases(stack, cases, category):
            if reply.status == 202:
                hostile.accepted.append(reply.json()["workflow_id"])
            if case.name == "10,000-task ring":
                error = reply.json()["error"]
                assert error["details"]["reason"] == "cycle"
                assert len(error["details"]["cycle"]) == 10_001
                assert error["message"].endswith("(a cycle of 10000 tasks)"), error["message"]
            if case.name == "fan-in + cycle":
                assert reply.json()["error"]["details"]["reason"] == "cycle", reply.body
            if case.name.startswith("lone"):
                assert "surrogate" in reply.json()["error"]["message"], reply.body


def test_ten_thousand_task_chain_whose_first_task_fails(hostile: Hostile) -> None:
    """A valid 10,000-task graph, 10,000 levels deep: the first task fails and every other one
    is skipped (nothing in the scheduler recurses along the chain)."""
    n = 10_000
    tasks = [task(id="t0", action="builtin.fail", args={"message": "first"})]
    for i in range(1, n):
        deps = [f"t{i - 1}"] + ([f"t{i // 2}"] if i > 2 and i // 2 != i - 1 else [])
        tasks.append(task(id=f"t{i}", depends_on=deps))
    status, accepted = hostile.stack.http.post(
        "/workflows", wf(*tasks, on_failure="continue"), timeout=60
    )
    assert status == 202, accepted
    view = hostile.stack.http.wait_workflow(accepted["workflow_id"], timeout=300)
    assert view["status"] == "failed"
    assert view["counts"] == {"failed": 1, "skipped": n - 1}, view["counts"]


def test_injection_and_traversal_in_every_field(hostile: Hostile) -> None:
    stack = hostile.stack
    for category, cases in (
        ("injection strings", injection_cases(hostile)),
        ("path traversal", traversal_cases(hostile)),
    ):
        for case, reply in run_cases(stack, cases, category):
            if reply.status == 202 and case.path == "/workflows":
                hostile.accepted.append(reply.json()["workflow_id"])
            if case.name.endswith(BAD_REFERENCE):
                details = reply.json()["error"]["details"]
                assert details["reason"] == "bad_reference", (case.name, details)
    assert any(c.name.endswith(BAD_REFERENCE) for c in injection_cases(hostile))
    # the strings also reach a real Nushell task as plain data (${ escaped as $${ in values:
    # the task gets the text itself, and nothing evaluates it)
    payloads = injections(hostile)
    tasks = [
        {"id": f"echo{i}", "action": "probe.echo", "args": escaped({"text": p, p: p})}
        for i, p in enumerate(payloads)
    ]
    status, accepted = stack.http.post("/workflows", wf(*tasks, on_failure="continue"))
    assert status == 202, accepted
    view = stack.http.wait_workflow(accepted["workflow_id"], timeout=180)
    assert view["status"] == "completed", view
    outputs = {t["id"]: t["output"] for t in view["tasks"]}
    for i, p in enumerate(payloads):
        assert outputs[f"echo{i}"] == {"args": {"text": p, p: p}}, (p, outputs[f"echo{i}"])
    assert not hostile.marker.exists()


def test_bad_query_parameters_headers_and_methods(hostile: Hostile) -> None:
    stack = hostile.stack
    for category, cases in (
        ("query parameters", query_cases(hostile)),
        ("Idempotency-Key", idempotency_cases()),
        ("Last-Event-ID", last_event_id_cases(hostile)),
        ("progress bodies", progress_cases(hostile)),
        ("methods and routes", method_and_route_cases(hostile)),
        ("approvals, plans, keys", decision_and_plan_cases(hostile)),
    ):
        for case, reply in run_cases(stack, cases, category):
            if reply.status == 202 and case.path == "/workflows":
                hostile.accepted.append(reply.json()["workflow_id"])
            if case.name.startswith("Last-Event-ID") and reply.status == 200:
                assert b"event: workflow" in reply.body or b"event:" not in reply.body


def test_protocol_level_garbage(hostile: Hostile) -> None:
    """Bytes that are not HTTP at all are refused by aiohttp's parser before any handler: a 4xx
    (plain text there, our middleware never runs), never a 5xx, never a hang."""
    for name, data in RAW_REQUESTS:
        reply = send_raw(hostile.stack.port, data)
        COUNTS["raw protocol"] += 1
        assert reply.status == 0 or 400 <= reply.status < 500 or reply.status == 200, (
            name,
            reply.status,
            reply.body[:200],
        )


def nickel_children(parent: int) -> int:
    """Nickel evaluations the gateway runs right now (its ``shared.nickel_source`` children)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        count += ppid == parent and b"shared.nickel_source" in cmdline
    return count


def test_a_burst_of_hostile_nickel_waits_its_turn(hostile: Hostile) -> None:
    """Each Nickel evaluation may take 1 GiB and a core for 10 s: a burst of sources that
    exhaust both is evaluated a few at a time, every one gets its 422, and the gateway lives."""
    stack = hostile.stack
    assert stack.gateway.proc is not None
    gateway_pid = stack.gateway.proc.pid
    burst = 3 * MAX_CONCURRENT + 2
    case = Case(
        "Nickel recursion bomb",
        "POST",
        "/workflows",
        b"let rec f = fun x => f (x + 1) in f 0",
        {"Content-Type": "application/x-nickel"},
        (422,),
    )
    replies: list[Reply] = []
    threads = [
        threading.Thread(target=lambda: replies.append(send(stack.port, case, timeout=300)))
        for _ in range(burst)
    ]
    for thread in threads:
        thread.start()
    most = 0
    while any(thread.is_alive() for thread in threads):
        most = max(most, nickel_children(gateway_pid))
        time.sleep(0.02)
    for thread in threads:
        thread.join()
    COUNTS["Nickel burst"] += burst
    assert len(replies) == burst
    for reply in replies:
        check_reply(case, reply)
    assert 1 <= most <= MAX_CONCURRENT, most
    assert stack.gateway.alive
    assert stack.http.get("/health")[0] == 200


def test_every_route_was_attacked(hostile: Hostile) -> None:
    """Each route of the OpenAPI document got hostile cases in the tests above."""
    status, document = hostile.stack.http.get("/openapi.json")
    assert status == 200
    cases = [
        *malformed_bodies(),
        *huge_inputs(hostile),
        *injection_cases(hostile),
        *traversal_cases(hostile),
        *query_cases(hostile),
        *last_event_id_cases(hostile),
        *progress_cases(hostile),
        *method_and_route_cases(hostile),
        *decision_and_plan_cases(hostile),
    ]
    hit: Counter[tuple[str, str]] = Counter()
    for template, methods in document["paths"].items():
        pattern = "^" + template.replace("{id}", "[^/?]+") + r"(\?|$)"
        for method in methods:
            for case in cases:
                if case.method == method.upper() and re.match(pattern, case.path):
                    hit[(method, template)] += 1
    routes = [(m, t) for t, ms in document["paths"].items() for m in ms]
    missing = [r for r in routes if hit[r] == 0 and r[1] not in ("/health", "/openapi.json")]
    assert not missing, missing
    print("\nhostile cases per route " + json.dumps({f"{m} {t}": hit[(m, t)] for m, t in routes}))


def test_stack_survives_and_still_works(hostile: Hostile) -> None:
    stack = hostile.stack
    for service in stack.services:
        assert service.alive, f"{service.name} died:\n{service.log()[-3000:]}"
    # a normal workflow, end to end
    status, accepted = stack.http.post(
        "/workflows",
        wf(
            task(id="first"),
            task(id="echo", action="probe.echo", args={"text": "after"}, depends_on=["first"]),
        ),
    )
    assert status == 202, accepted
    view = stack.http.wait_workflow(accepted["workflow_id"], timeout=120)
    assert view["status"] == "completed", view
    # what the hostile cases got accepted ran to an end, and no bad input reached the DLQ
    for wf_id in hostile.accepted:
        assert stack.http.wait_workflow(wf_id, timeout=120)["status"] == "completed", wf_id
    assert stream_state(stack.nats.url, "PROV_DLQ")["messages"] == 0
    status, holder = stack.http.post(f"/workflows/{hostile.holder_wf}/cancel")
    assert status == 202, holder
    assert stack.http.wait_workflow(hostile.holder_wf)["status"] == "cancelled"
    for service in stack.services:
        text = service.log()
        assert "Traceback" not in text, f"{service.name}:\n{text[-5000:]}"
        assert "unexpected error" not in text, f"{service.name}:\n{text[-5000:]}"
        assert service.alive, service.name
    print(f"\nhostile accepted workflows {len(hostile.accepted)}")
