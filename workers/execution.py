"""Executing one command body: from bytes to a terminal outcome. No broker in here: the actor
calls ``CommandExecutor.execute`` and nothing else, so the logic is tested without one.

Contracts:
- bad input never raises past this module except as ``BadCommand`` (the body is unreadable and
  names no command id: the actor parks it in the dead-letter queue, never retried) (G10);
- otherwise returns the command's outcome: ``invalid`` and ``rejected`` are final and recorded
  (G3), ``succeeded`` commits the events, the stream versions and the outcome in one
  transaction (G2); a delivery of an id that already has an outcome returns that outcome
  marked ``duplicate`` and changes nothing;
- version conflicts are retried here, bounded and jittered (G4); infrastructure errors propagate
  so that the broker's retries and dead-lettering see them.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import structlog
from pydantic import BaseModel, ValidationError

from cqrskit.domain.model import RuleViolation
from cqrskit.domain.registry import Registry, UnknownType
from cqrskit.infra.envelope import IDENTIFIER, CommandEnvelope
from cqrskit.infra.outcomes import Outcome, Status
from cqrskit.infra.store import ConcurrencyConflict, EventStore, read_outcome

log = structlog.get_logger("cqrskit.commands")
_IDENTIFIER = re.compile(IDENTIFIER)
_SNIFF_ID = re.compile(rb'"command_id"\s*:\s*"([A-Za-z0-9][A-Za-z0-9._:@/-]{0,127})"')


class BadCommand(Exception):
    """A body that names no readable command id: dead-lettered with this reason, never retried."""


class ConflictsExhausted(Exception):
    """The aggregate kept moving under us beyond the retry budget (treated as transient)."""


@dataclass
class CommandExecutor:
    store: EventStore
    registry: Registry
    max_bytes: int = 64 * 1024
    conflict_retries: int = 30

    def execute(self, body: bytes) -> Outcome:
        parsed = self._parse(body)
        if isinstance(parsed, Outcome):
            return self._record_final(parsed)
        envelope, command = parsed
        with structlog.contextvars.bound_contextvars(**_log_context(envelope)):
            return self._decide_with_retries(envelope, command)

    # -- reading the body -------------------------------------------------------------------
    def _parse(self, body: bytes) -> Outcome | tuple[CommandEnvelope, BaseModel]:
        if len(body) > self.max_bytes:
            reason = f"command of {len(body)} bytes exceeds CQRSKIT_MAX_COMMAND_BYTES={self.max_bytes}"
            return self._invalid_or_bad(_sniff_id(body[:4096]), reason, [], None)
        try:
            envelope = CommandEnvelope.model_validate_json(body)
        except ValidationError as exc:
            raw = _loads(body)
            try:
                surrogate = _find_char(raw, "", _is_surrogate)
            except RecursionError:  # deeper than any command; pydantic's error says so
                surrogate = None
            if surrogate is not None:
                errors = [{"loc": surrogate, "msg": "lone surrogate (unpaired \\ud800-\\udfff escape) in a string",
                           "type": "lone_surrogate"}]
                return self._invalid_or_bad(_id_of(raw), "invalid command envelope", errors, raw)
            command_id = _id_of(raw) or _sniff_id(body[:4096])
            return self._invalid_or_bad(command_id, "invalid command envelope", _errors(exc), raw)
        nul = _find_char(envelope.payload, "payload", _has_nul)
        if nul:
            return _invalid(envelope, "NUL character in a string", [{"loc": nul, "msg": "NUL (\\u0000) is not allowed"}])
        huge = _find_char(envelope.payload, "payload", _is_non_finite)
        if huge:
            return _invalid(envelope, "number out of range", [{"loc": huge, "msg": "not a finite number"}])
        try:
            command = self.registry.command_type(envelope.type).model_validate(envelope.payload)
        except UnknownType as exc:
            known = ", ".join(sorted(self.registry.commands))
            return _invalid(envelope, f"{exc}; known types: {known}", [])
        except ValidationError as exc:
            return _invalid(envelope, f"invalid payload for {envelope.type}", _errors(exc, prefix="payload"))
        return envelope, command

    def _invalid_or_bad(self, command_id: str | None, reason: str, errors: list[dict[str, Any]], raw: Any) -> Outcome:
        if command_id is None:
            detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:5])
            raise BadCommand(f"{reason}, and no readable command_id" + (f" ({detail})" if detail else ""))
        fields = raw if isinstance(raw, dict) else {}
        return Outcome(
            command_id=command_id,
            status=Status.invalid,
            type=_text(fields.get("type"), 200),
            aggregate_id=_text(fields.get("aggregate_id"), 200),
            reason=reason,
            errors=errors,
        )

    # -- deciding ---------------------------------------------------------------------------
    def _decide_with_retries(self, envelope: CommandEnvelope, command: BaseModel) -> Outcome:
        for attempt in range(self.conflict_retries + 1):
            try:
                outcome = self._decide(envelope, command)
            except ConcurrencyConflict as exc:
                log.debug("command.conflict", attempt=attempt, detail=str(exc)[:200])
                time.sleep(random.uniform(0, min(0.2, 0.002 * 2**attempt)))
                continue
            except RuleViolation as exc:
                return self._record_final(_outcome(envelope, Status.rejected, reason=exc.reason))
            _log_outcome(outcome)
            return outcome
        raise ConflictsExhausted(f"gave up after {self.conflict_retries} version conflicts")

    def _decide(self, envelope: CommandEnvelope, command: BaseModel) -> Outcome:
        with self.store.unit_of_work(serialize=True) as uow:
            existing = read_outcome(uow.conn, envelope.command_id)
            if existing is not None:
                return existing.as_duplicate()
            aggregate_type = self.registry.command_type(envelope.type).aggregate
            target = uow.load(aggregate_type, envelope.aggregate_id)
            expected = envelope.expected_version
            if expected is not None and target.version != expected:
                raise RuleViolation(f"expected version {expected}, but {target.stream_id} is at {target.version}")
            self.registry.handler(envelope.type)(command, envelope.aggregate_id, uow)
            outcome = _outcome(envelope, Status.succeeded, aggregate_version=target.version + len(target.pending))
            positions = uow.commit(_event_metadata(envelope), outcome)
            return outcome.model_copy(update={"positions": positions})

    def _record_final(self, outcome: Outcome) -> Outcome:
        stored = self.store.record_outcome(outcome)
        _log_outcome(stored)
        return stored


def _outcome(envelope: CommandEnvelope, status: Status, **fields: Any) -> Outcome:
    return Outcome(
        command_id=envelope.command_id,
        status=status,
        type=envelope.type,
        aggregate_id=envelope.aggregate_id,
        correlation_id=envelope.metadata.correlation_id or envelope.command_id,
        causation_id=envelope.metadata.causation_id,
        **fields,
    )


def _invalid(envelope: CommandEnvelope, reason: str, errors: list[dict[str, Any]]) -> Outcome:
    return _outcome(envelope, Status.invalid, reason=reason, errors=errors)


def _event_metadata(envelope: CommandEnvelope) -> dict[str, Any]:
    meta = {
        "command_id": envelope.command_id,
        "command_type": envelope.type,
        "correlation_id": envelope.metadata.correlation_id or envelope.command_id,
        "causation_id": envelope.command_id,
    }
    if envelope.metadata.issuer:
        meta["issuer"] = envelope.metadata.issuer
    return meta


def _log_context(envelope: CommandEnvelope) -> dict[str, Any]:
    return {
        "command_id": envelope.command_id,
        "correlation_id": envelope.metadata.correlation_id or envelope.command_id,
        "causation_id": envelope.metadata.causation_id,
        "type": envelope.type,
        "aggregate_id": envelope.aggregate_id,
    }


def _log_outcome(outcome: Outcome) -> None:
    event = "command.duplicate" if outcome.duplicate else f"command.{outcome.status.value}"
    level = log.warning if outcome.status in (Status.invalid, Status.dead) else log.info
    level(event, **_outcome_log_fields(outcome))


def _outcome_log_fields(outcome: Outcome) -> dict[str, Any]:
    fields: dict[str, Any] = {"status": outcome.status.value}
    if outcome.reason:
        fields["reason"] = outcome.reason
    if outcome.status is Status.succeeded:
        fields.update(aggregate_version=outcome.aggregate_version, positions=outcome.positions)
    if not structlog.contextvars.get_contextvars().get("command_id"):
        fields.update(command_id=outcome.command_id, type=outcome.type, aggregate_id=outcome.aggregate_id)
    return fields


def readable_command_id(body: bytes) -> str | None:
    """The command id of a body, if one can be read at all (for dead-letter bookkeeping)."""
    return _id_of(_loads(body)) or _sniff_id(body[:4096])


# -- helpers for hostile input -------------------------------------------------------------
def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _id_of(raw: Any) -> str | None:
    value = raw.get("command_id") if isinstance(raw, dict) else None
    if isinstance(value, str) and len(value) <= 128 and _IDENTIFIER.match(value) and value.isascii():
        return value
    return None


def _sniff_id(head: bytes) -> str | None:
    match = _SNIFF_ID.search(head)
    return match.group(1).decode() if match else None


def _errors(exc: ValidationError, prefix: str = "") -> list[dict[str, Any]]:
    """Pydantic errors as storable JSON: dotted locations, no echo of the (hostile) input."""
    out = []
    for err in exc.errors(include_url=False, include_context=False, include_input=False)[:50]:
        loc = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "")
        out.append({"loc": _text(loc, 300), "msg": _text(err["msg"], 500), "type": err["type"]})
    return out


def _text(value: Any, limit: int) -> str | None:
    """A string safe to store anywhere (no NUL, no lone surrogates), cut to ``limit``."""
    if not isinstance(value, str):
        return None
    safe = value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\u0000")
    return safe[:limit]


def _is_surrogate(value: Any) -> bool:
    return isinstance(value, str) and any("\ud800" <= char <= "\udfff" for char in value)


def _has_nul(value: Any) -> bool:
    return isinstance(value, str) and "\x00" in value


def _is_non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _find_char(value: Any, path: str, bad: Callable[[Any], bool]) -> str | None:
    """The dotted path of the first leaf value (or key) for which ``bad`` holds, if any."""
    if not isinstance(value, (dict, list)):
        return path if bad(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{_text(key, 100)}".lstrip(".")
            found = where if bad(key) else _find_char(item, where, bad)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _find_char(item, f"{path}.{index}".lstrip("."), bad)
            if found is not None:
                return found
    return None
