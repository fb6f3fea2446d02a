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
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from cqrskit.domain.model import RuleViolation
from cqrskit.domain.ports import ConcurrencyConflict
from cqrskit.domain.registry import Registry
from cqrskit.infra import defaults
from cqrskit.infra.delivery import Delivery
from cqrskit.infra.envelope import IDENTIFIER, CommandEnvelope
from cqrskit.infra.outcomes import Outcome, Status
from cqrskit.infra.tracing_hooks import group_commit, traced_metadata
from cqrskit.infra.validation import (CommandTooLarge, InvalidCommand, ReservedCommandId, ValidCommand,
                                     validate_command)
from cqrskit.infra.write_store.port import Decision, UnitOfWork, WriteStore
from cqrskit.workers.admission import Gate
from cqrskit.workers.group_commit import GroupCommit, Pending

log = structlog.get_logger("cqrskit.commands")
_stdlib_log = logging.getLogger("cqrskit.commands")  # its level decides (structlog renders through it)
_IDENTIFIER = re.compile(IDENTIFIER)
_TYPE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.]*$")  # the envelope's TypeName
_SNIFF_ID = re.compile(rb'"command_id"\s*:\s*"([A-Za-z0-9][A-Za-z0-9._:@/-]{0,127})"')


class BadCommand(Exception):
    """A body that names no readable command id: dead-lettered with this reason, never retried."""


class ConflictsExhausted(Exception):
    """The aggregate kept moving under us beyond the retry budget (treated as transient)."""


@dataclass
class CommandExecutor:
    """``execute`` turns one body into its outcome, decided through the write-store port
    (``cqrskit.infra.write_store.port``). On a store that batches (PostgreSQL), commands executed
    at the same time by the threads of a process are decided and committed together (group
    commit, ``max_batch`` commands per transaction at most, ``leaders`` transactions at once):

    - in one batch transaction, commands are decided one after the other in their order of
      arrival, each seeing the effects of the ones before it (``cqrskit.infra.write_store.pg_batch``);
    - a command the store puts off (a lock held elsewhere) goes back to the head of the queue
      with what it must wait for, so one aggregate's commands never overtake each other;
    - a business rule refusal is recorded in the batch as ``rejected``; a duplicate delivery
      writes nothing and returns the stored outcome;
    - if the batch transaction fails (a conflict the locks did not prevent, a lost connection),
      it is rolled back as a whole and each of its commands is decided again alone, in its own
      thread, with the bounded conflict retries: a failing command never takes its neighbours
      down, and an infrastructure error reaches each message's own Dramatiq retries.
    """

    store: WriteStore
    registry: Registry
    max_bytes: int = defaults.MAX_COMMAND_BYTES
    conflict_retries: int = defaults.CONFLICT_RETRIES
    max_batch: int = defaults.GROUP_COMMIT_MAX
    leaders: int = defaults.GROUP_COMMIT_LEADERS
    linger: float = defaults.GROUP_COMMIT_LINGER_MS / 1000
    adaptive_linger: float = 0.0  # group commit: the bound of its adaptive linger (cqrskit.workers.pacing)
    gate: Gate = field(default_factory=Gate)
    sent_internally: Callable[[CommandEnvelope], bool] | None = None  # process managers' commands (the outbox)
    observers: list[Callable[[Outcome], None]] = field(default_factory=list)  # told every outcome returned (metrics)

    def __post_init__(self) -> None:
        grouped = self.store.batches and self.max_batch > 1
        self.group = (GroupCommit(group_commit(self._run_batch), max_batch=self.max_batch, leaders=self.leaders, linger=self.linger,
                                  adaptive=self.adaptive_linger) if grouped else None)

    def execute(self, body: bytes, delivery: Delivery | None = None) -> Outcome:
        """``delivery``: what the broker said about the body (None: a direct, trusted call). Each
        of ``observers`` is told the outcome before it is returned."""
        outcome = self._execute(body, delivery)
        for observe in self.observers:
            observe(outcome)
        return outcome

    def _execute(self, body: bytes, delivery: Delivery | None) -> Outcome:
        parsed = self._parse(body)
        if isinstance(parsed, Outcome):
            return self._record_final(parsed)
        with structlog.contextvars.bound_contextvars(**_log_context(parsed.envelope)):
            admission = self.gate.admit(parsed.envelope, delivery)
            if admission.refused:
                error = {"loc": "", "msg": admission.refused, "type": "not_allowed"}
                return self._record_final(_invalid(parsed.envelope, admission.refused, [error]))
            item = Pending(parsed.envelope, parsed.command, provenance=traced_metadata(admission.metadata(parsed.envelope)))
            if self.group is None:
                outcome = self._decide_with_retries(item)
            else:
                outcome = self._grouped(item)
            _log_outcome(outcome, quiet=item.batch_size > 1)
            return outcome

    # -- reading the body -------------------------------------------------------------------
    def _parse(self, body: bytes) -> Outcome | ValidCommand:
        try:
            return validate_command(body, self.registry, self.max_bytes, self.sent_internally)
        except ReservedCommandId as exc:
            raise BadCommand(exc.reason) from None
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
            type=_validated(fields.get("type"), _TYPE_NAME, 200),
            aggregate_id=_validated(fields.get("aggregate_id"), _IDENTIFIER, 200),
            reason=exc.reason,
            errors=errors,
        )

    # -- deciding: through the write store ------------------------------------------------------
    def _grouped(self, item: Pending) -> Outcome:
        self.group.submit(item)  # type: ignore[union-attr]
        if item.error is not None:
            raise item.error
        if item.alone:
            item.batch_size = 1
            return self._decide_with_retries(item)
        return item.outcome  # type: ignore[return-value]

    def _run_batch(self, batch: list[Pending]) -> list[Pending]:
        """Settle ``batch`` in one transaction; returns the commands put off. Never raises."""
        if _stdlib_log.isEnabledFor(logging.DEBUG):
            log.debug("group_commit.batch_begun", size=len(batch), command_ids=[i.envelope.command_id for i in batch])
        try:
            return self._attempt(batch)
        except Exception as exc:  # rolled back as a whole: each command alone, in its own thread
            log.debug("group_commit.batch_failed", size=len(batch), error=repr(exc)[:300])
            for item in batch:
                item.settle(alone=True)
            return []

    def _attempt(self, batch: list[Pending]) -> list[Pending]:
        """``batch`` decided by the store (one transaction when it batches): settles what it
        decided (after the commit) and returns what it put off. Raises ConcurrencyConflict and
        infrastructure errors (nothing committed)."""
        decisions = [self._decision(item) for item in batch]
        outcomes = self.store.decide(decisions)
        settled, deferred = [], []
        for item, decision, outcome in zip(batch, decisions, outcomes, strict=True):
            if outcome is None:
                item.wait_key = decision.wait_for
                deferred.append(item)
            else:
                settled.append((item, outcome))
        _log_batch(settled)
        for item, outcome in settled:
            item.settle(outcome)
        return deferred

    def _decision(self, item: Pending) -> Decision:
        envelope = item.envelope
        return Decision(
            command_id=envelope.command_id,
            aggregate=self.registry.command_type(envelope.type).aggregate,
            aggregate_id=envelope.aggregate_id,
            reads=self.registry.declared_reads(envelope.type, item.command, envelope.aggregate_id)
            if self.store.batches else (),
            decide=lambda uow: self._decide(uow, item),
            rejected=lambda reason: _outcome(envelope, Status.rejected, reason=reason),
            wait_for=item.wait_key,
        )

    def _decide_with_retries(self, item: Pending) -> Outcome:
        for attempt in range(self.conflict_retries + 1):
            try:
                if not self._attempt([item]):
                    return item.outcome  # type: ignore[return-value]
                continue  # put off: the next attempt waits for the busy lock first
            except ConcurrencyConflict as exc:
                log.debug("command.conflict", attempt=attempt, detail=str(exc)[:200])
                time.sleep(random.uniform(0, min(0.2, 0.002 * 2**attempt)))
        raise ConflictsExhausted(f"gave up after {self.conflict_retries} version conflicts")

    def _decide(self, uow: UnitOfWork, item: Pending) -> Outcome:
        envelope, command = item.envelope, item.command
        aggregate_type = self.registry.command_type(envelope.type).aggregate
        target = uow.load(aggregate_type, envelope.aggregate_id)
        expected = envelope.expected_version
        if expected is not None and target.version != expected:
            raise RuleViolation(f"expected version {expected}, but {target.stream_id} is at {target.version}")
        self.registry.handler(envelope.type)(command, envelope.aggregate_id, uow)
        outcome = _outcome(envelope, Status.succeeded, aggregate_version=target.version + len(target.pending))
        positions = uow.commit(_event_metadata(envelope) | item.provenance, outcome)
        outcome.positions = positions
        return outcome

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
    return {
        "command_id": envelope.command_id,
        "command_type": envelope.type,
        "correlation_id": envelope.metadata.correlation_id or envelope.command_id,
        "causation_id": envelope.command_id,
    }


def _log_context(envelope: CommandEnvelope) -> dict[str, Any]:
    return {
        "command_id": envelope.command_id,
        "correlation_id": envelope.metadata.correlation_id or envelope.command_id,
        "causation_id": envelope.metadata.causation_id,
        "type": envelope.type,
        "aggregate_id": envelope.aggregate_id,
    }


def _log_outcome(outcome: Outcome, *, quiet: bool = False) -> None:
    """One line per command at INFO, except a success committed in a batch of several: the
    batch's line names it (``command.batch``), and its own line is DEBUG (G12 at no cost per
    command under load)."""
    event = "command.duplicate" if outcome.duplicate else f"command.{outcome.status.value}"
    if outcome.status in (Status.invalid, Status.dead):
        level = log.warning
    elif quiet and outcome.status is Status.succeeded and not outcome.duplicate:
        if not _stdlib_log.isEnabledFor(logging.DEBUG):
            return
        level = log.debug
    else:
        level = log.info
    level(event, **_outcome_log_fields(outcome))


def _log_batch(decided: list[tuple[Pending, Outcome]]) -> None:
    """The batch's one INFO line after its commit: the command ids it committed (several only)."""
    if len(decided) < 2:
        return
    ids = [o.command_id for _, o in decided if o.status is Status.succeeded and not o.duplicate]
    if not ids:
        return
    context = structlog.contextvars.get_contextvars()  # the leader's own command is not the batch's
    structlog.contextvars.clear_contextvars()
    try:
        log.info("command.batch", size=len(decided), succeeded=len(ids), command_ids=ids)
    finally:
        structlog.contextvars.bind_contextvars(**context)


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


def _validated(value: Any, pattern: re.Pattern[str], limit: int) -> str | None:
    """``value`` only if it passes the envelope's own check (an outcome of an unreadable envelope
    records no type or aggregate id that the envelope would have refused: G10, G11)."""
    return value if isinstance(value, str) and len(value) <= limit and pattern.match(value) else None
