"""NATS credentials and TLS, least privilege per service, and no secret anywhere it could leak.

A real nats-server requires TLS (a CA and server certificate made here with ``cryptography``)
and a user and password; its users and permissions are ``deploy/nats/accounts.conf`` as
shipped, plus an admin user for the test's own inspection. Each service connects as its own
user with ``[nats] user``/``password``/``tls_ca_file``; the gateway requires a bearer token and
every service exports spans to an OTLP receiver in the test. Then:

- the whole path works (submit, dispatch, a Nushell task posting progress, retry, cancel,
  events, logs);
- each user is held to its subjects: an executor cannot submit work (``prov.cmd.>``) or ack
  the scheduler's messages, the gateway cannot dispatch tasks, nobody can delete a stream;
  wrong, missing or plain-text credentials are refused;
- the gateway token and every NATS password appear in no service log, no task environment,
  task output or log, no error response, and no exported span.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from testkit.otlp import Receiver

from .support import PROBE_ENV, NatsServer, Stack, read_event_stream, wait_until

pytestmark = pytest.mark.e2e

ACCOUNTS = Path(__file__).resolve().parent.parent / "deploy" / "nats" / "accounts.conf"
TOKEN = "gwtok-5f3b9e71d2"
PASSWORDS = {
    "gateway": "natspw-gateway-8a1c4d",
    "scheduler": "natspw-scheduler-2e7f90",
    "executor": "natspw-executor-b63a15",
    "admin": "natspw-admin-0d94c7",
}
WRONG_PASSWORD = "natspw-wrong-71ee0b"
SECRETS = [TOKEN, WRONG_PASSWORD, *PASSWORDS.values()]


# -- a CA and a server certificate -----------------------------------------------------------


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """``(ca.pem, server.pem, server.key)``: a CA and a server certificate for 127.0.0.1."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "provisioning test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_pem, cert_pem, key_pem = (
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
    )
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_pem, cert_pem, key_pem


def server_config(cert: Path, key: Path) -> str:
    """deploy/nats/accounts.conf as shipped, plus an admin user for the test, and TLS."""
    accounts = ACCOUNTS.read_text()
    closing = "  ]\n}"
    assert accounts.rstrip().endswith(closing), "accounts.conf changed shape: adapt the test"
    admin = "    { user: admin, password: $PROVISIONING_NATS_ADMIN_PASSWORD }\n"
    accounts = accounts.rstrip()[: -len(closing)] + admin + closing + "\n"
    return (
        f"{accounts}\n"
        f"tls {{\n  cert_file: {json.dumps(str(cert))}\n  key_file: {json.dumps(str(key))}\n"
        "  timeout: 5\n}\n"
    )


# -- the stack -------------------------------------------------------------------------------


@dataclass
class Secured:
    stack: Stack
    receiver: Receiver
    ca: Path

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp("secured")
    ca, cert, key = make_certificates(tmp / "pki")
    nats_server = NatsServer(
        tmp / "nats",
        extra_conf=server_config(cert, key),
        env={f"PROVISIONING_NATS_{user.upper()}_PASSWORD": pw for user, pw in PASSWORDS.items()},
    ).start()
    with Receiver() as receiver:
        stack = Stack(
            tmp,
            nats_server,
            env={
                **PROBE_ENV,
                "PROVISIONING_GATEWAY_AUTH_TOKEN": TOKEN,
                "PROVISIONING_NATS_TLS_CA_FILE": str(ca),
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "300",
            },
        )
        for service in stack.services:  # each service its own NATS user
            user = service.name.split("-")[0]
            service.env = {
                **stack.env,
                "PROVISIONING_NATS_USER": user,
                "PROVISIONING_NATS_PASSWORD": PASSWORDS[user],
            }
        try:
            stack.start()
            yield Secured(stack, receiver, ca)
        except BaseException:
            print(stack.logs())
            raise
        finally:
            stack.stop()
            nats_server.stop()


async def _connect(secured: Secured, errors: list[str], **options: Any) -> Any:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(
        secured.stack.nats.url,
        error_cb=on_error,
        max_reconnect_attempts=0,
        connect_timeout=5,
        allow_reconnect=False,
        **options,
    )


def as_user(secured: Secured, user: str, body: Any) -> tuple[Any, list[str]]:
    """Run ``await body(nc)`` connected (TLS) as ``user``; return its result and the errors the
    server sent (permission violations arrive asynchronously)."""
    errors: list[str] = []

    async def main() -> Any:
        nc = await _connect(secured, errors, user=user, password=PASSWORDS[user], tls=secured.tls())
        try:
            result = await body(nc)
            await nc.flush(timeout=5)
            await asyncio.sleep(0.3)  # let -ERR lines arrive
            return result
        finally:
            await nc.close()

    return asyncio.run(main()), errors


# -- the tests -------------------------------------------------------------------------------


def test_whole_path_works_with_per_service_users_and_tls(secured: Secured) -> None:
    http = secured.stack.http
    tasks = [
        {"id": "env", "action": "probe.env"},
        {"id": "posted", "action": "probe.progress", "args": {"hold_seconds": 0}},
        {"id": "echo", "action": "probe.echo", "args": {"text": "over TLS"}, "depends_on": ["env"]},
        {
            "id": "flaky",
            "action": "builtin.fail",
            "args": {"message": "on purpose"},
            "retries": 1,
            "backoff": {"initial_seconds": 0.1},
        },
    ]
    status, accepted = http.post(
        "/workflows", {"name": "secured", "tasks": tasks, "on_failure": "continue"}
    )
    assert status == 202, accepted
    wf_id = accepted["workflow_id"]
    view = http.wait_workflow(wf_id, timeout=120)
    by_id = {t["id"]: t for t in view["tasks"]}
    assert view["status"] == "failed", view
    assert by_id["env"]["status"] == by_id["echo"]["status"] == "completed"
    assert by_id["posted"]["output"] == {"posted": True}  # task token, gateway -> NATS as gateway
    assert by_id["echo"]["output"] == {"args": {"text": "over TLS"}}
    assert by_id["flaky"]["attempt"] == 2 and by_id["flaky"]["status"] == "failed"
    events = read_event_stream(f"{http.base}/workflows/{wf_id}/events", token=TOKEN)
    assert any(e.event == "progress" and e.data["percent"] == 42 for e in events)
    status, logs = http.get(f"/tasks/{wf_id}.echo/logs")
    assert status == 200 and [e["line"] for e in logs["lines"]] == ["text: over TLS"]
    # cancel reaches a running task (scheduler -> prov.kill -> executor)
    status, accepted = http.post(
        "/workflows",
        {
            "name": "cancel",
            "tasks": [{"id": "s", "action": "builtin.sleep", "args": {"seconds": 60}}],
        },
    )
    assert status == 202
    wait_until(
        lambda: http.get(f"/tasks/{accepted['workflow_id']}.s")[1]["status"] == "running", 60
    )
    assert http.post(f"/workflows/{accepted['workflow_id']}/cancel")[0] == 202
    assert http.wait_workflow(accepted["workflow_id"])["status"] == "cancelled"
    for service in secured.stack.services:
        assert "Permissions Violation" not in service.log(), service.name
        assert service.alive, service.name


def test_each_service_user_is_held_to_its_subjects(secured: Secured) -> None:
    async def executor_tries(nc: Any) -> list[str]:
        refused = []
        await nc.publish("prov.cmd.submit.0123", b"{}")  # submit work
        await nc.publish("prov.dispatch.default.x.y", b"{}")  # dispatch tasks
        await nc.publish("$JS.ACK.PROV_COMMANDS.scheduler-commands.1.1.1.1.1", b"+ACK")
        await nc.publish("$KV.prov_tasks.x.y", b"{}")  # overwrite a checkpoint
        await nc.subscribe("prov.cmd.>")  # read commands
        try:
            await nc.jetstream().delete_stream("PROV_COMMANDS")
        except (nats.errors.Error, TimeoutError) as exc:
            refused.append(f"delete_stream: {exc!r}")
        try:
            await nc.jetstream().publish("prov.cmd.submit.0123", b"{}", timeout=2)
        except (nats.errors.Error, TimeoutError) as exc:
            refused.append(f"js.publish: {exc!r}")
        await nc.publish("prov.report.x.y", b"{}")  # allowed: its own subjects
        return refused

    refused, errors = as_user(secured, "executor", executor_tries)
    text = "\n".join(errors)
    for subject in (
        "prov.cmd.submit.0123",
        "prov.dispatch.default.x.y",
        "$JS.ACK.PROV_COMMANDS",
        "$KV.prov_tasks.x.y",
        'Subscription to "prov.cmd.>"',
        "$JS.API.STREAM.DELETE.PROV_COMMANDS",
    ):
        assert subject.lower() in text.lower(), (subject, errors)
    assert "prov.report.x.y" not in text, errors
    assert len(refused) == 2, refused

    async def gateway_tries(nc: Any) -> None:
        await nc.publish("prov.dispatch.default.x.y", b"{}")
        await nc.publish("prov.report.x.y", b"{}")
        await nc.publish("prov.kill.x", b"[]")

    _, errors = as_user(secured, "gateway", gateway_tries)
    for subject in ("prov.dispatch.default.x.y", "prov.report.x.y", "prov.kill.x"):
        assert any(subject in e for e in errors), (subject, errors)

    async def scheduler_tries(nc: Any) -> None:
        await nc.publish("prov.report.x.y", b"{}")  # forging an executor's report
        await nc.publish("$KV.prov_executors.fake", b"{}")  # forging a heartbeat

    _, errors = as_user(secured, "scheduler", scheduler_tries)
    assert any("prov.report.x.y" in e for e in errors), errors
    assert any("prov_executors" in e for e in errors), errors

    # wrong, missing, or plain-text credentials are refused
    async def refused_connect(**options: Any) -> str:
        try:
            nc = await _connect(secured, [], **options)
        except Exception as exc:  # the client reports each refusal its own way
            return repr(exc)
        await nc.close()
        return "connected"

    async def attempts() -> dict[str, str]:
        return {
            "wrong password": await refused_connect(
                user="executor", password=WRONG_PASSWORD, tls=secured.tls()
            ),
            "no credentials": await refused_connect(tls=secured.tls()),
            "no TLS": await refused_connect(user="executor", password=PASSWORDS["executor"]),
        }

    for what, outcome in asyncio.run(attempts()).items():
        assert outcome != "connected", what


def test_no_secret_in_logs_env_outputs_errors_or_spans(secured: Secured) -> None:
    stack, http = secured.stack, secured.stack.http
    # work that exercises every component, including failures and error paths
    status, accepted = http.post(
        "/workflows",
        {
            "name": "secrets",
            "tasks": [
                {"id": "env", "action": "probe.env"},
                {"id": "posted", "action": "probe.progress", "args": {"hold_seconds": 0}},
                {"id": "bad", "action": "probe.exit", "args": {"code": 3}},
            ],
            "on_failure": "continue",
        },
    )
    assert status == 202, accepted
    wf_id = accepted["workflow_id"]
    view = http.wait_workflow(wf_id, timeout=120)
    by_id = {t["id"]: t for t in view["tasks"]}
    environ = by_id["env"]["output"]["environ"]
    assert any(item.startswith("PROVISIONING_TASK_TOKEN=") for item in environ)
    # an executor with the credentials in NATS_URL, and one with a wrong password
    url_creds = stack.new_executor(
        90,
        env={
            "NATS_URL": stack.nats.url.replace(
                "nats://", f"nats://executor:{PASSWORDS['executor']}@"
            ),
            "PROVISIONING_NATS_USER": "",
            "PROVISIONING_NATS_PASSWORD": "",
        },
    )
    wrong = stack.new_executor(
        91,
        env={"PROVISIONING_NATS_USER": "executor", "PROVISIONING_NATS_PASSWORD": WRONG_PASSWORD},
    )
    for extra in (url_creds, wrong):
        stack.executors.append(extra)
        extra.start()
    wait_until(lambda: stack.executors_alive() >= 2, 60, what="the URL-credentials executor")
    wait_until(lambda: "Authorization Violation" in wrong.log(), 60, what="a refused executor")
    wrong.stop()
    url_creds.stop()

    answers: list[Any] = []
    for method, path, headers, body in (
        ("GET", "/workflows", {"Authorization": "Bearer " + TOKEN[:-1]}, None),
        ("GET", "/workflows", {"Authorization": f"Basic {TOKEN}"}, None),
        ("POST", "/workflows", {}, {"name": "x", "tasks": [{"id": "a", "action": "no.such"}]}),
        ("POST", "/workflows", {}, {"name": TOKEN, "tasks": []}),
        ("GET", f"/workflows/{'f' * 32}", {}, None),
        ("POST", f"/tasks/{wf_id}.env/progress", {}, {"progress": 1}),
    ):
        answers.append(http.request(method, path, body, headers=headers)[1])
    status, _ = http.request(
        "GET", f"/workflows?access_token={TOKEN}", headers={"Authorization": "Bearer nope"}
    )
    assert status == 401
    # a request aiohttp's parser refuses, echoing the header that holds the token: the gateway
    # logs one line without the bytes (aiohttp alone logs them with a traceback)
    with socket.create_connection(("127.0.0.1", stack.port), timeout=30) as sock:
        head = f"GET /workflows HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\x01\r\n"
        sock.sendall(head.encode() + b"\r\n")
        assert b" 400 " in sock.recv(65536).split(b"\r\n")[0]
    logs = [http.get(f"/tasks/{wf_id}.{t}/logs")[1] for t in by_id]
    events = read_event_stream(f"{http.base}/workflows/{wf_id}/events", token=TOKEN)
    # spans of this workflow, and of the gateway's requests
    trace_id = view["trace_id"]
    wait_until(
        lambda: any(
            s["name"].startswith("subprocess probe.env") for s in secured.receiver.trace(trace_id)
        ),
        60,
        what="the workflow's spans",
    )
    time.sleep(1)  # one more export round for the last requests' spans
    with secured.receiver.lock:
        spans = list(secured.receiver.spans)
    assert spans

    cli_env = stack.cli(
        "env",
        "--output",
        "json",
        env={
            "NATS_URL": stack.nats.url.replace(
                "nats://", f"nats://gateway:{PASSWORDS['gateway']}@"
            ),
            "PROVISIONING_NATS_PASSWORD": PASSWORDS["scheduler"],
        },
    )
    assert cli_env.returncode == 0, cli_env.stderr
    shown = {row["key"]: row["value"] for row in json.loads(cli_env.stdout)}
    assert shown["nats.url"].startswith("nats://***@"), shown["nats.url"]
    places = {
        "provisioning env": cli_env.stdout + cli_env.stderr,
        "task environment": "\n".join(environ),
        "task outputs": json.dumps([t["output"] for t in view["tasks"]]),
        "task errors": json.dumps([t["error"] for t in view["tasks"]]),
        "task logs": json.dumps(logs),
        "events": json.dumps([e.data for e in events]),
        "error responses": json.dumps(answers[:3] + answers[4:]),
        "spans": json.dumps(spans, default=str),
        "nats-server log": stack.nats.log_path.read_text(errors="replace"),
    }
    for service in stack.services:
        places[f"{service.name} log"] = service.log()
    for place, text in places.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked into the {place}"
    # the checks can see something: the places are not empty, and the logs name the users
    assert "Authorization Violation" in places["executor-91 log"]
    assert len(places["spans"]) > 1000 and "subprocess probe.env" in places["spans"]
