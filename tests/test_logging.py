"""G12 (command side): JSON log lines of a command carry its trace ids; terminals get readable lines."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from cqrskit.infra.logs import configure_logging
from cqrskit.infra.settings import LogFormat, Settings
from cqrskit.infra.store import EventStore
from cqrskit.producers.commands import new_command
from cqrskit.workers.execution import CommandExecutor

TRACE = ("command_id", "correlation_id", "causation_id", "type", "aggregate_id")


@pytest.fixture
def json_log() -> io.StringIO:
    stream = io.StringIO()
    configure_logging(Settings(log_format=LogFormat.json, log_level="DEBUG"), stream=stream)
    yield stream
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_every_line_of_a_command_carries_its_trace_ids(store: EventStore, json_log: io.StringIO) -> None:
    executor = CommandExecutor(store, store.registry)
    command = new_command("RegisterCustomer", "c1", {"name": "Ann", "email": "ann@example.com"},
                          correlation_id="flow-9", causation_id="request-3")
    executor.execute(command.to_json())
    executor.execute(command.to_json())  # the duplicate logs too
    logged = [line for line in lines(json_log) if line["event"].startswith("command.")]
    assert [line["event"] for line in logged] == ["command.succeeded", "command.duplicate"]
    for line in logged:
        assert {key: line[key] for key in TRACE} == {
            "command_id": command.command_id, "correlation_id": "flow-9", "causation_id": "request-3",
            "type": "RegisterCustomer", "aggregate_id": "c1",
        }
        assert line["level"] == "info" and line["timestamp"].endswith("Z")
    assert structlog.contextvars.get_contextvars() == {}, "context leaked past the command"


def test_invalid_command_lines_name_the_command(store: EventStore, json_log: io.StringIO) -> None:
    executor = CommandExecutor(store, store.registry)
    executor.execute(b'{"command_id": "bad-1", "type": "Nope", "aggregate_id": "a", "payload": {}}')
    (line,) = [line for line in lines(json_log) if line["event"] == "command.invalid"]
    assert (line["command_id"], line["type"], line["level"]) == ("bad-1", "Nope", "warning")
    assert "unknown command type" in line["reason"]


def test_console_format_is_readable_not_json() -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_format=LogFormat.console), stream=stream)
    structlog.get_logger("t").info("command.succeeded", command_id="abc")
    structlog.reset_defaults()
    text = stream.getvalue()
    assert "command.succeeded" in text and "command_id=abc" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
