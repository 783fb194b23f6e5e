"""Encoding and strict decoding: one decoder per message family, built once."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
import msgspec.inspect as mi

from .commands import Command
from .events import Event, LogChunk
from .executors import ExecutorBeat
from .leases import SchedulerLease
from .records import Progress, TaskRecord, WorkflowRecord
from .tasks import Report, TaskDispatch

__all__ = [
    "DecodeError",
    "decode_beat",
    "decode_command",
    "decode_dispatch",
    "decode_event",
    "decode_lease",
    "decode_log",
    "decode_progress",
    "decode_report",
    "decode_task",
    "decode_workflow",
    "encode",
    "from_builtins",
]

T = TypeVar("T")
DecodeError = msgspec.DecodeError

_encoder = msgspec.json.Encoder()
_commands: msgspec.json.Decoder[Command] = msgspec.json.Decoder(Command)
_dispatch = msgspec.json.Decoder(TaskDispatch)
_reports: msgspec.json.Decoder[Report] = msgspec.json.Decoder(Report)
_events: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)
_logs = msgspec.json.Decoder(LogChunk)
_workflows = msgspec.json.Decoder(WorkflowRecord)
_tasks = msgspec.json.Decoder(TaskRecord)
_progress = msgspec.json.Decoder(Progress)
_beats = msgspec.json.Decoder(ExecutorBeat)
_leases = msgspec.json.Decoder(SchedulerLease)


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode_command(data: bytes) -> Command:
    return _commands.decode(data)


def decode_dispatch(data: bytes) -> TaskDispatch:
    return _dispatch.decode(data)


def decode_report(data: bytes) -> Report:
    return _reports.decode(data)


def decode_event(data: bytes) -> Event:
    return _events.decode(data)


def decode_log(data: bytes) -> LogChunk:
    return _logs.decode(data)


def decode_workflow(data: bytes) -> WorkflowRecord:
    return _workflows.decode(data)


def decode_task(data: bytes) -> TaskRecord:
    return _tasks.decode(data)


def decode_progress(data: bytes) -> Progress:
    return _progress.decode(data)


def decode_beat(data: bytes) -> ExecutorBeat:
    return _beats.decode(data)


def decode_lease(data: bytes) -> SchedulerLease:
    return _leases.decode(data)


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
