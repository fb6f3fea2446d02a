"""The table of bad inputs (docs/commands.md, "Bad input"), shared by the executor test and the
end-to-end test over RabbitMQ. Each row: a name, a function of the command id giving the body,
and its expected fate: ``("invalid", fragment of the reason or an error location)`` when the
command id can be read, else ``("dead-letter", fragment of the logged reason)``."""

from __future__ import annotations

import json

GOOD_PAYLOAD = {"name": "Ann", "email": "ann@example.com"}


def envelope(command_id: str, **changes: object) -> dict:
    body = {"command_id": command_id, "type": "RegisterCustomer", "aggregate_id": f"c-{command_id}",
            "payload": dict(GOOD_PAYLOAD)}
    body.update(changes)
    return body


def dumps(value: object) -> bytes:
    return json.dumps(value).encode()


BAD_INPUTS: list[tuple[str, object, tuple[str, str]]] = [
    ("garbage bytes", lambda cid: b"\xff\xfe\x00\x81garbage", ("dead-letter", "Invalid JSON")),
    ("not JSON", lambda cid: b"PlaceOrder please", ("dead-letter", "Invalid JSON")),
    ("empty body", lambda cid: b"", ("dead-letter", "Invalid JSON")),
    ("JSON array", lambda cid: b"[1, 2, 3]", ("dead-letter", "no readable command_id")),
    ("no command id", lambda cid: dumps({"type": "RegisterCustomer", "payload": {}}), ("dead-letter", "command_id")),
    ("command id with NUL", lambda cid: dumps(envelope(cid + "\x00")), ("dead-letter", "no readable command_id")),
    ("truncated JSON", lambda cid: dumps(envelope(cid))[:-5], ("invalid", "invalid command envelope")),
    ("NUL in payload", lambda cid: dumps(envelope(cid, payload={"name": "A\x00nn", "email": "a@example.com"})),
     ("invalid", "NUL")),
    ("lone surrogate in payload", lambda cid: dumps(envelope(cid)).replace(b"Ann", b"A\\ud800nn"),
     ("invalid", "surrogate")),
    ("oversized", lambda cid: dumps(envelope(cid, payload={"name": "A" * 70_000, "email": "a@example.com"})),
     ("invalid", "exceeds CQRSKIT_MAX_COMMAND_BYTES")),
    ("unknown type", lambda cid: dumps(envelope(cid, type="LaunchRocket")), ("invalid", "unknown command type")),
    ("extra envelope field", lambda cid: dumps(envelope(cid, priority="high")), ("invalid", "priority")),
    ("extra payload field", lambda cid: dumps(envelope(cid, payload={**GOOD_PAYLOAD, "age": 3})), ("invalid", "payload.age")),
    ("missing payload field", lambda cid: dumps(envelope(cid, payload={"name": "Ann"})), ("invalid", "payload.email")),
    ("wrong payload type", lambda cid: dumps(envelope(cid, payload={"name": 42, "email": "a@example.com"})),
     ("invalid", "payload.name")),
    ("payload not an object", lambda cid: dumps(envelope(cid, payload=[1])), ("invalid", "payload")),
    ("bad aggregate id", lambda cid: dumps(envelope(cid, aggregate_id="")), ("invalid", "aggregate_id")),
    ("negative expected version", lambda cid: dumps(envelope(cid, expected_version=-1)), ("invalid", "expected_version")),
    ("unknown envelope version", lambda cid: dumps(envelope(cid, envelope_version=2)), ("invalid", "envelope_version")),
    ("number beyond float range", lambda cid: dumps(envelope(cid, payload={"name": "Ann", "email": "a@example.com"}))
     .replace(b'"name": "Ann"', b'"name": "Ann", "age": 1e400'), ("invalid", "not a finite number")),
    ("deeply nested", lambda cid: dumps(envelope(cid)).replace(b'"Ann"', b"[" * 5000 + b"]" * 5000),
     ("invalid", "invalid command envelope")),
]


def outcome_text(outcome) -> str:  # type: ignore[no-untyped-def]
    """Everything an outcome says about why, to look for the expected fragment in."""
    errors = " ".join(f"{e['loc']} {e['msg']}" for e in outcome.errors or [])
    return f"{outcome.reason} {errors}"
