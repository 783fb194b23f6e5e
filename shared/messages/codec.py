"""Encoding and strict decoding: one decoder per message family, built once.

Every decode goes through :func:`_decode`, the one place where a failure to decode (malformed
JSON, a wrong shape, nesting deep enough to exhaust the stack) becomes the project's own
:class:`~shared.errors.MessageError`. Consumers catch that and nothing else.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
import msgspec.inspect as mi

from ..errors import MessageError
from .commands import Command
from .events import Event, LogChunk
from .executors import ExecutorBeat
from .keys import KeyState
from .leases import SchedulerLease
from .records import Progress, TaskRecord, WorkflowRecord
from .tasks import Report, ReportMessage, TaskDispatch

__all__ = [
    "decode_beat",
    "decode_command",
    "decode_dispatch",
    "decode_event",
    "decode_key_state",
    "decode_lease",
    "decode_log",
    "decode_progress",
    "decode_report",
    "decode_report_message",
    "decode_task",
    "decode_task_ids",
    "decode_workflow",
    "encode",
    "from_builtins",
]

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_commands: msgspec.json.Decoder[Command] = msgspec.json.Decoder(Command)
_dispatch = msgspec.json.Decoder(TaskDispatch)
_reports: msgspec.json.Decoder[Report] = msgspec.json.Decoder(Report)
_report_messages: msgspec.json.Decoder[ReportMessage] = msgspec.json.Decoder(ReportMessage)
_events: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)
_logs = msgspec.json.Decoder(LogChunk)
_workflows = msgspec.json.Decoder(WorkflowRecord)
_tasks = msgspec.json.Decoder(TaskRecord)
_progress = msgspec.json.Decoder(Progress)
_beats = msgspec.json.Decoder(ExecutorBeat)
_leases = msgspec.json.Decoder(SchedulerLease)
_task_ids = msgspec.json.Decoder(list[str])
_key_states = msgspec.json.Decoder(KeyState)  # a kill request: the tasks of one workflow


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def _decode(decoder: msgspec.json.Decoder[T], data: bytes | None) -> T:
    try:
        return decoder.decode(data or b"")
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise MessageError(f"undecodable: {exc}") from None
    except RecursionError:
        raise MessageError("undecodable: nested too deeply") from None


def decode_command(data: bytes | None) -> Command:
    return _decode(_commands, data)


def decode_dispatch(data: bytes | None) -> TaskDispatch:
    return _decode(_dispatch, data)


def decode_report(data: bytes | None) -> Report:
    return _decode(_reports, data)


def decode_report_message(data: bytes | None) -> ReportMessage:
    """A report, or a batch of them (what the reports stream carries)."""
    return _decode(_report_messages, data)


def decode_event(data: bytes | None) -> Event:
    return _decode(_events, data)


def decode_log(data: bytes | None) -> LogChunk:
    return _decode(_logs, data)


def decode_workflow(data: bytes | None) -> WorkflowRecord:
    return _decode(_workflows, data)


def decode_task(data: bytes | None) -> TaskRecord:
    return _decode(_tasks, data)


def decode_progress(data: bytes | None) -> Progress:
    return _decode(_progress, data)


def decode_beat(data: bytes | None) -> ExecutorBeat:
    return _decode(_beats, data)


def decode_lease(data: bytes | None) -> SchedulerLease:
    return _decode(_leases, data)


def decode_task_ids(data: bytes | None) -> list[str]:
    return _decode(_task_ids, data)


def decode_key_state(data: bytes | None) -> KeyState:
    return _decode(_key_states, data)


def from_builtins(data: Any, type: type[T]) -> T:
    """``data`` decoded from JSON, TOML or YAML, converted strictly into ``type``.

    One leniency: a float with an integral value is taken where an integer is expected
    (``14.0`` as ``14``). JSON Schema's ``integer``, and so the API's OpenAPI document, counts
    it as one, and clients that compute numbers send them so; ``14.5`` is still refused. Only
    positions typed as integers are touched: free-form values (``args``) keep their floats.
    """
    return msgspec.convert(_integral(data, _type_info(type)), type, strict=True)


_type_infos: dict[Any, mi.Type] = {}


def _type_info(type: Any) -> mi.Type:
    info = _type_infos.get(type)
    if info is None:
        info = _type_infos[type] = mi.type_info(type)
    return info


def _choices(info: mi.Type) -> list[mi.Type]:
    """The types a value of ``info`` may take: unions flattened, metadata unwrapped."""
    while isinstance(info, mi.Metadata):
        info = info.type
    if isinstance(info, mi.UnionType):
        return [choice for member in info.types for choice in _choices(member)]
    return [info]


def _integral(value: Any, info: mi.Type) -> Any:
    """``value`` with integral floats made ints where ``info`` expects an integer (no
    recursion into ``Any``, so arguments nested arbitrarily deep cost nothing)."""
    choices = _choices(info)
    if isinstance(value, float):
        if value.is_integer() and any(isinstance(c, mi.IntType) for c in choices):
            return int(value)
        return value
    if isinstance(value, dict):
        for choice in choices:
            if isinstance(choice, mi.StructType):
                fields = {f.encode_name: f.type for f in choice.fields}
                return {k: _integral(v, fields[k]) if k in fields else v for k, v in value.items()}
            if isinstance(choice, mi.DictType):
                return {k: _integral(v, choice.value_type) for k, v in value.items()}
        return value
    if isinstance(value, list):
        for choice in choices:
            if isinstance(choice, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
                return [_integral(v, choice.item_type) for v in value]
        return value
    return value
