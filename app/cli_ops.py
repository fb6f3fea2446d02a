"""The operator's commands: ``cqrskit status`` (the pipeline at a glance, G12) and ``cqrskit dlq``
over the commands' dead-letter queue (``<commands queue>.XQ``, see ``cqrskit.infra.deadletters``).
``dlq`` shows both kinds of dead letter by the command inside. Positions count from the head of
the queue (1).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Optional

import pika
import sqlalchemy as sa
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from cqrskit.app import bootstrap
from cqrskit.app.status import PipelineStatus, gather_status
from cqrskit.app.terminal import inert_json, shown
from cqrskit.infra.deadletters import DeadLetter, DeadLetterQueue
from cqrskit.infra.grants import ProducerGrants
from cqrskit.infra.inert import inert, inert_lines
from cqrskit.infra.outcomes import Outcome, Status
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import EventStore

console = Console()
err = Console(stderr=True, soft_wrap=True)  # one line per message, however narrow the terminal
RATE_WINDOW = 2.0  # seconds between the two snapshots of a single `status`
dlq_app = typer.Typer(help="The commands' dead-letter queue: list, show, retry, purge.", no_args_is_help=True)


# -- status -------------------------------------------------------------------------------------
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (one document per refresh with --watch).")] = False,
    watch: Annotated[Optional[float], typer.Option(help="Refresh every SECONDS until interrupted.")] = None,
) -> None:
    """The endpoints checked; rates (commands, events appended and published, new documents per
    second, over 2 s or between refreshes); queue depths, dead letters, unpublished events, lag
    and parked documents per read model, live workers and outcomes. Exit 1 when a component
    cannot be reached or a read model's live mapping is older than its declaration (a broker
    cluster with a node down still serves: its nodes are listed, the down ones in red, and the
    exit status is 0).

    Example: cqrskit status --watch 2
    """
    settings: Settings = ctx.obj
    _quiet_clients()
    if watch is None:
        first = gather_status(settings)
        time.sleep(RATE_WINDOW)
        snapshot = gather_status(settings).with_rates(first)
        _show(snapshot, as_json)
        raise typer.Exit(0 if snapshot.healthy else 1)
    try:
        previous = gather_status(settings)
        if as_json:
            _show(previous, True)
        with Live(render_status(previous), console=console, auto_refresh=False) if not as_json else _nothing() as live:
            while True:
                time.sleep(watch)
                previous = gather_status(settings).with_rates(previous)
                if live is None:
                    _show(previous, True)
                else:
                    live.update(render_status(previous), refresh=True)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _quiet_clients() -> None:
    """The clients' own log lines (a 404 for each missing queue, each HTTP request) would bury the view."""
    for name in ("pika", "elastic_transport"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _show(snapshot: PipelineStatus, as_json: bool) -> None:
    if as_json:
        print(inert_json(snapshot.model_dump(mode="json")), flush=True)
    else:
        console.print(render_status(snapshot))


def render_status(s: PipelineStatus) -> Group:
    parts: list[Any] = [f"[bold]cqrskit status[/bold] at {s.taken_at:%Y-%m-%d %H:%M:%S} UTC   " + "   ".join(
        f"{shown(name)}: " + ("[green]up[/]" if c.reachable else "[red]down[/]") for name, c in s.components.items())]
    parts += [f"  {name} [dim]{shown(c.endpoint or '')}[/]" + ("" if c.reachable else f": [red]{shown(c.error or '')}[/]")
              for name, c in s.components.items()]
    parts += [f"    node [dim]{escape(n.endpoint)}[/]: " + ("[green]up[/]" if n.reachable else f"[red]down[/]: {escape(n.error or '')}")
              for n in s.broker_nodes if len(s.broker_nodes) > 1]  # a cluster: which nodes serve
    queues = Table("queue", "name", "ready", "consumers", title="queues", title_justify="left")
    for role, q in s.queues.items():
        style = "red" if role.endswith(".XQ") and q.ready else ""
        queues.add_row(shown(role), shown(q.name), _n(q.ready) if q.exists else "[red]missing[/]", _n(q.consumers), style=style)
    if s.queues:
        parts.append(queues)
    r = s.relay
    relay = Table("unpublished events", "oldest (s)", "checkpoint", "active relay", "lease until",
                  title="event relay", title_justify="left")
    relay.add_row(_n(r.unpublished_events), _n(r.oldest_unpublished_seconds), _n(r.checkpoint_position),
                  shown(r.holder) or f"[red]none[/] (last: {shown(r.last_holder) or '-'})",
                  f"{r.lease_expires_at:%H:%M:%S}" if r.lease_expires_at else "-")
    models = Table("read model", "index", "documents", "parked", "lag (events)", "lag (s)",
                   title="read models", title_justify="left")
    search_up = s.components.get("search") is not None and s.components["search"].reachable
    for name, m in s.read_models.items():
        index = shown(", ".join(m.indices)) or ("[red]missing[/]" if search_up else "?")
        index += shown(f" (building {', '.join(m.building)})") if m.building else ""
        lag = _n(m.lag_events) + ("+" if m.lag_exact is False else "")
        models.add_row(shown(name), index, _n(m.documents), f"[red]{m.parked}[/]" if m.parked else _n(m.parked), lag,
                       _n(m.lag_seconds))
    parts += [_rates_line(s), relay, models]
    parts += [f"[red]{escape(m.mapping_drift)}[/]" for m in s.read_models.values() if m.mapping_drift]
    if s.outcomes is not None:
        outcomes = Table(*s.outcomes, title="outcomes", title_justify="left")
        outcomes.add_row(*(str(n) for n in s.outcomes.values()))
        parts.append(outcomes)
    if (pm := s.process_managers) is not None:
        late = f"[red]{pm.timers_overdue} overdue (oldest {pm.oldest_overdue_seconds:g} s)[/]" \
            if pm.timers_overdue else "0 overdue"
        parts.append(f"process managers: {pm.instances} instances, timers {pm.timers_pending} pending, {late}, "
                     f"outbox {pm.outbox_unpublished} unpublished")
    w = s.workers
    parts += [f"workers: commands {_n(w.commands)}, indexer {_n(w.indexer)}, "
              f"relay {shown(w.relay) or 'none'}   dead letters: "
              + (", ".join(f"{shown(k)} {_n(v)}" for k, v in s.dead_letters.items()) or "?")]
    return Group(*parts)


def _rates_line(s: PipelineStatus) -> str:
    if s.rates is None:
        return "rates: from the next refresh"
    r = s.rates
    return (f"[bold]rates[/bold] over {r.window_seconds:g} s: {_n(r.commands)} commands/s, {_n(r.events)} events/s "
            f"appended, {_n(r.published)} published/s, {_n(r.documents)} new documents/s")


def _n(value: int | float | None) -> str:
    return "?" if value is None else str(value)


# -- dead letters -------------------------------------------------------------------------------
@contextmanager
def dead_letter_queue(settings: Settings) -> Iterator[DeadLetterQueue]:
    _quiet_clients()
    if settings.embedded_broker:
        err.print("[red]the dead-letter queue lives in RabbitMQ:[/red] set CQRSKIT_BROKER_URL=amqp://...")
        raise typer.Exit(2)
    from cqrskit.workers.execution import readable_command_id

    try:
        queue = DeadLetterQueue(settings, readable_command_id)
    except (pika.exceptions.AMQPError, OSError) as exc:
        err.print(f"[red]cannot reach the broker:[/red] {escape(repr(exc))}")
        raise typer.Exit(2) from None
    try:
        yield queue
    finally:
        queue.close()


def _letters(queue: DeadLetterQueue, limit: int) -> Iterator[tuple[int, DeadLetter]]:
    """At most ``limit`` messages from the head (at most as many as were there at the start, so
    that messages dead-lettered again meanwhile are not met twice)."""
    for _ in range(min(limit, queue.count())):
        taken = queue.take()
        if taken is None:
            return
        yield taken


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="At most this many, from the head.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List dead letters: position, command id, type, size, reason. Leaves them in place.

    Example: cqrskit dlq list --limit 20
    """
    with dead_letter_queue(ctx.obj) as queue:
        letters = [letter for _tag, letter in _letters(queue, limit)]
    if as_json:
        print(inert_json([{"position": d.position, "command_id": d.command_id, "type": d.type, "bytes": len(d.body),
                           "wrapped": d.wrapper is not None, "producer": d.delivery.producer,
                           "issuer": d.delivery.on_behalf_of or d.delivery.producer, "reason": d.reason}
                          for d in letters]))
        return
    table = Table("#", "command id", "type", "bytes", "producer", "reason", title=f"{queue.name}")
    for d in letters:
        table.add_row(str(d.position), shown(d.command_id) if d.command_id else "[red]unreadable[/]",
                      shown(d.type), str(len(d.body)), shown(d.delivery.producer) or "[dim]none[/]", shown(d.reason))
    console.print(table if letters else f"{queue.name} is empty")





@dlq_app.command("show")
def dlq_show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="A position (from dlq list) or a command id.")],
) -> None:
    """Show one dead letter in full: the command body, the reason and Dramatiq's traceback.

    Example: cqrskit dlq show 1
    """
    with dead_letter_queue(ctx.obj) as queue:
        found = next((d for _tag, d in _letters(queue, 1_000_000) if ref in (str(d.position), d.command_id)), None)
    if found is None:
        err.print(f"no dead letter {escape(inert(repr(ref)))} in {escape(queue.name)}")
        raise typer.Exit(3)
    console.print(f"[bold]#{found.position}[/bold] command {shown(found.command_id or '(unreadable)')} type "
                  f"{shown(found.type or '?')}, {len(found.body)} bytes"
                  + (", in a worker's Dramatiq message" if found.wrapper else ""))
    delivery = found.delivery
    console.print(f"producer: {inert(delivery.producer) or 'none validated'}, issuer: "
                  f"{inert(delivery.on_behalf_of or delivery.producer) or 'none'}", markup=False)
    console.print(f"reason: {inert(found.reason)}", markup=False)
    envelope = found.envelope
    console.print(inert_json(envelope) if envelope is not None else repr(found.body), markup=False)
    if found.traceback:
        console.print(inert_lines(found.traceback), markup=False)


@dlq_app.command("retry")
def dlq_retry(
    ctx: typer.Context,
    positions: Annotated[Optional[list[int]], typer.Argument(help="Positions (from dlq list).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Retry every dead letter.")] = False,
) -> None:
    """Publish the commands again (the original bodies, to the commands exchange, confirmed),
    then remove them from the dead-letter queue. A dead outcome is deleted first so that the
    command can run; any other outcome stays, and the command is a duplicate. Each keeps its
    original producer and issuer: a command someone else sent is retried only when your
    RabbitMQ user is granted --on-behalf, else it is left in place with one line saying so. Bodies
    with no readable command id are left in place: they would be dead-lettered again.

    Example: cqrskit dlq retry 1 2 (or --all)
    """
    if not positions and not all_:
        err.print("give positions, or --all")
        raise typer.Exit(2)
    wanted = set(positions or [])
    retried = skipped = kept = 0
    with _store(ctx.obj) as store, dead_letter_queue(ctx.obj) as queue:
        grants = ProducerGrants(store.engine, ttl=0)
        for tag, letter in _letters(queue, 1_000_000 if all_ else max(wanted)):
            if not all_ and letter.position not in wanted:
                continue
            if letter.command_id is None:
                skipped += 1
                continue
            if queue.needs_vouching(letter) and not _may_vouch(grants, queue.user):
                err.print(f"#{letter.position} {inert(letter.command_id)} left in place: it keeps its producer "
                          f"{inert(letter.delivery.producer)} only if {inert(queue.user)} is granted --on-behalf "
                          f"(cqrskit producers grant {inert(queue.user)} '*' --on-behalf)", markup=False)
                kept += 1
                continue
            _retry(queue, store, tag, letter)
            retried += 1
    console.print(f"retried {retried}" + (f", left {skipped} unreadable in place (dlq purge)" if skipped else "")
                  + (f", left {kept} whose producer cannot be kept" if kept else ""))


def _may_vouch(grants: ProducerGrants, user: str) -> bool:
    found = grants.producer(user)
    return found is not None and found.on_behalf


def _retry(queue: DeadLetterQueue, store: EventStore, tag: int, letter: DeadLetter) -> None:
    """Delete a dead outcome, republish, then ack. If the broker does not confirm, the outcome is
    put back and the message stays in the dead-letter queue."""
    removed = store.delete_dead_outcome(letter.command_id)  # type: ignore[arg-type]
    try:
        queue.republish(letter)
    except (pika.exceptions.AMQPError, OSError) as exc:
        if removed is not None:
            store.record_outcome(removed)
        err.print(f"[red]#{letter.position} {escape(inert(letter.command_id))} not republished:[/red] "
                  f"{escape(inert(repr(exc)))}")
        raise typer.Exit(1) from None
    queue.ack(tag)


@dlq_app.command("purge")
def dlq_purge(
    ctx: typer.Context,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove every dead letter. A command with a readable id and no outcome yet is recorded
    dead first, so that it keeps a queryable outcome.

    Example: cqrskit dlq purge --yes
    """
    purged = recorded = 0
    with _store(ctx.obj) as store, dead_letter_queue(ctx.obj) as queue:
        count = queue.count()
        if not count:
            console.print(f"{queue.name} is empty")
            return
        if not yes:
            typer.confirm(f"Purge {count} dead letters from {queue.name}?", abort=True)
        for tag, letter in _letters(queue, count):
            if letter.command_id is not None:
                outcome = Outcome(command_id=letter.command_id, status=Status.dead, type=letter.type,
                                  reason=f"{letter.reason}; purged from {queue.name}"[:1000])
                recorded += not store.record_outcome(outcome).duplicate
            queue.ack(tag)
            purged += 1
    console.print(f"purged {purged} from {queue.name}; recorded {recorded} dead outcomes")


@contextmanager
def _store(settings: Settings) -> Iterator[EventStore]:
    try:
        with bootstrap.write_store(settings, pool_size=1) as store:
            yield store  # type: ignore[misc]
    except sa.exc.SQLAlchemyError as exc:  # messages taken and not acknowledged are back in place
        err.print(f"[red]write store error:[/red] {exc}")
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    app.command()(status)
    app.add_typer(dlq_app, name="dlq")
