"""Deciding a batch of commands in ONE PostgreSQL transaction (group commit), for
``EventStore.decide``; the transaction itself is ``cqrskit.infra.pg_store``'s.

- the batch first locks and reads what its commands address and declared they will read (their
  streams, the claims with their holders' streams, then what follows from each command's own
  aggregate: ``cqrskit.domain.reads``), in one or two round trips;
- commands are decided one after the other in their order, each seeing the effects of those
  before it; each writes its streams, events, claims and outcome in one statement;
- a command that finds a lock busy writes nothing and is put off (None), with every later
  command that touches what it touched; its ``Decision.wait_for`` is the busy lock, which the
  next batch it leads waits for first;
- a refusal is recorded as ``rejected`` in the batch; a duplicate delivery writes nothing and
  returns the stored outcome marked ``duplicate``.

Raises ``ConcurrencyConflict`` and infrastructure errors when the transaction fails (it is then
rolled back as a whole: nothing of the batch is committed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cqrskit.domain.model import RuleViolation, stream_id
from cqrskit.domain.reads import ClaimRead, FromTarget, StreamRead
from cqrskit.infra.outcomes import Outcome
from cqrskit.infra.pg_rows import lock_key, restored
from cqrskit.infra.pg_store import LockBusy, PgTransaction, PgUnitOfWork
from cqrskit.infra.write_store.port import Decision

Streams = list[tuple[int, str]]
Claims = list[tuple[int, str, str, str | None]]


def decide_batch(store: Any, decisions: Sequence[Decision]) -> list[Outcome | None]:
    """``decisions`` settled in one transaction of ``store`` (an ``EventStore`` on PostgreSQL):
    each one's committed outcome, or None for one put off (see the module docstring)."""
    decided: list[tuple[int, Outcome, Any]] = []
    results: list[Outcome | None] = [None] * len(decisions)
    with store.transaction() as tx:
        first = () if decisions[0].wait_for is None else (decisions[0].wait_for,)
        streams, claims, follows = _reads(decisions)
        tx.prefetch(streams, claims, first=first, after=(lambda: _followed(tx, follows)) if follows else None)
        for index, decision in enumerate(decisions):
            uow = tx.unit()
            try:
                decided.append((index, *_decide_in(tx, uow, decision)))
            except LockBusy as busy:
                decision.wait_for = busy.key
                tx.refuse(uow.keys)
    for index, outcome, write in decided:
        results[index] = _committed(store, tx, outcome, write)
    return results


def _reads(decisions: Sequence[Decision]) -> tuple[Streams, Claims, list[tuple[type, str, Any]]]:
    """What the batch's commands address and declared they will read, as lock keys: the
    streams, the claims with the stream type of their holders, and the reads that follow from
    each command's aggregate (its type, its id, the hint)."""
    streams: Streams = []
    claims: Claims = []
    follows = []
    for decision in decisions:
        sid = stream_id(decision.aggregate.stream_type, decision.aggregate_id)
        streams.append((lock_key("s", sid), sid))
        for read in decision.reads:
            if isinstance(read, FromTarget):
                follows.append((decision.aggregate, decision.aggregate_id, read.reads))
            else:
                _add_read(read, streams, claims)
    return streams, claims, follows


def _decide_in(tx: PgTransaction, uow: PgUnitOfWork, decision: Decision) -> tuple[Outcome, Any]:
    """The outcome decided in ``tx`` and what tells, after the commit, whether it was written
    (the unit of work, or the cursor of a rejection's insert)."""
    try:
        return decision.decide(uow), uow
    except RuleViolation as exc:
        rejected = decision.rejected(exc.reason)
        return rejected, tx.record_outcome(rejected)


def _committed(store: Any, tx: PgTransaction, outcome: Outcome, write: Any) -> Outcome:
    """``outcome`` as committed: with its positions, or the stored one when it was a duplicate."""
    if isinstance(write, PgUnitOfWork):
        outcome.positions = write.result()
        duplicate = write.duplicate
    else:
        duplicate = tx.row(write) is None
    if not duplicate:
        return outcome
    return (store.outcome(outcome.command_id) or outcome).as_duplicate()


def _add_read(read: Any, streams: Streams, claims: Claims) -> None:
    """``read`` (a declared hint) as the lock key and stream or claim it names; anything else is ignored."""
    if isinstance(read, StreamRead) and isinstance(read.aggregate_id, str):
        sid = stream_id(read.aggregate.stream_type, read.aggregate_id)
        streams.append((lock_key("s", sid), sid))
    elif isinstance(read, ClaimRead) and isinstance(read.scope, str) and isinstance(read.key, str):
        owner = read.owner.stream_type if read.owner is not None else None
        claims.append((lock_key("c", read.scope, read.key), read.scope, read.key, owner))


def _followed(tx: PgTransaction, follows: list[tuple[type, str, Any]]) -> tuple[Streams, Claims]:
    """The reads that follow from each command's aggregate as the batch's first round trip
    read it (``FromTarget``); a hint that raises, or an aggregate not read, adds nothing."""
    streams: Streams = []
    claims: Claims = []
    for cls, aggregate_id, hint in follows:
        sid = stream_id(cls.stream_type, aggregate_id)
        if sid not in tx.cache:
            continue
        try:
            aggregate = restored(cls, aggregate_id, tx.cache[sid], tx)
            for read in hint(aggregate):
                _add_read(read, streams, claims)
        except Exception:  # noqa: BLE001 - a hint never decides: the handler reads what it reads
            continue
    return streams, claims
