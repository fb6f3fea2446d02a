"""Executing one command body: from bytes to a terminal outcome. No broker in here: the actor
calls ``CommandExecutor.execute`` and nothing else, so the logic is tested without one.

Contracts:
- a body is checked by ``cqrskit.infra.validation.validate_command``, the very check the gateway
  makes before it answers 202; an invalid one records the same reason and errors;
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
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import BaseModel

from cqrskit.domain.model import RuleViolation
from cqrskit.domain.registry import Registry
from cqrskit.infra.envelope import IDENTIFIER, CommandEnvelope
from cqrskit.infra.outcomes import Outcome, Status
from cqrskit.infra.store import ConcurrencyConflict, EventStore, read_outcome
from cqrskit.infra.validation import CommandTooLarge, InvalidCommand, ValidCommand, safe_text, validate_command

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
        with structlog.contextvars.bound_contextvars(**_log_context(parsed.envelope)):
            return self._decide_with_retries(parsed.envelope, parsed.command)

    # -- reading the body -------------------------------------------------------------------
    def _parse(self, body: bytes) -> Outcome | ValidCommand:
        try:
            return validate_command(body, self.registry, self.max_bytes)
        except InvalidCommand as exc:
            errors = [error.record() for error in exc.errors]
            if exc.envelope is not None:
                return _invalid(exc.envelope, exc.reason, errors)
            return self._invalid_or_bad(body, exc, errors)

    def _invalid_or_bad(self, body: bytes, exc: InvalidCommand, errors: list[dict[str, str]]) -> Outcome:
        command_id = _id_of(exc.document) or _sniff_id(body[:4096])
        if command_id is None:
            shown = [] if isinstance(exc, CommandTooLarge) else errors[:5]  # its one error is the reason
            detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in shown)
            raise BadCommand(f"{exc.reason}, and no readable command_id" + (f" ({detail})" if detail else ""))
        fields = exc.document if isinstance(exc.document, dict) else {}
        return Outcome(
            command_id=command_id,
            status=Status.invalid,
            type=_text(fields.get("type"), 200),
            aggregate_id=_text(fields.get("aggregate_id"), 200),
            reason=exc.reason,
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


def _text(value: Any, limit: int) -> str | None:
    return safe_text(value, limit) if isinstance(value, str) else None
