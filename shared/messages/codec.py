"""Encoding and strict decoding: one decoder per message family, built once."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

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
