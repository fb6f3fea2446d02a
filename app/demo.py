"""``cqrskit demo``: the whole pipeline under the app's demo load (``App(demo=...)``),
shown stage by stage. On the embedded default it needs nothing installed; given service URLs it runs against
them (commands over RabbitMQ, PostgreSQL as the write store)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from cqrskit.app.errors import DATABASE, Problem
from cqrskit.infra.envelope import CommandEnvelope
from cqrskit.infra.logs import configure_logging
from cqrskit.infra.schema import command_outcomes, events
from cqrskit.infra.settings import EMBEDDED_SEARCH, Settings, masked
from cqrskit.app.bootstrap import app_of
from cqrskit.app.declaration import DemoLoad
from cqrskit.app.local import LocalPipeline

LOG = Path("var") / "cqrskit-demo.log"


def run_demo(settings: Settings, *, size: int, seed: int, console: Console, log_path: Path = LOG) -> int:
    """Runs the demo; returns the exit status (0 when every command reached its expected fate;
    2 when the app has no demo load). Logs go to ``log_path`` (so that no line breaks a progress
    bar), and so do the embedded search server's own lines; the verdict is the last thing printed."""
    app = app_of(settings)
    if app.demo is None:
        console.print(f"[red]the app {app.name!r} declares no demo load[/red] (App(..., demo=...))")
        return 2
    load = app.demo(size, seed)
    console.rule("[bold]cqrskit demo[/bold]: commands in, events and outcomes out")
    cleaned = clean_start(settings)
    console.print(f"write store [cyan]{_where(settings.database_url)}[/cyan], broker [cyan]{escape(masked(settings.broker_url))}[/cyan], "
                  f"logs [cyan]{log_path}[/cyan]" + (f"\n{cleaned}" if cleaned else ""))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        configure_logging(settings, stream=log)
        return _run(settings, app, load, console, log, log_path)


def _run(settings: Settings, app: Any, load: DemoLoad, console: Console, log: IO[str], log_path: Path) -> int:
    sent: list[CommandEnvelope] = []
    started = time.perf_counter()
    with LocalPipeline(settings, threads=2 if settings.sqlite_path else 8, search_log=log) as pipeline:
        for name, envelopes in load.phases():
            _run_phase(pipeline, name, envelopes, console)
            sent += envelopes
        elapsed = time.perf_counter() - started
        with console.status("read models: waiting until verify finds them equal to the write store"):
            converge_started = time.perf_counter()
            reports = pipeline.wait_converged()
            catch_up = time.perf_counter() - converge_started
        statuses = _statuses(pipeline, [e.command_id for e in sent])
        event_counts = _event_counts(pipeline, [e.command_id for e in sent])
        _print_summary(console, load, sent, statuses, event_counts, elapsed)
        _print_read_models(console, reports, catch_up)
        if app.showcase is not None:
            app.showcase(pipeline.runtime.search, settings.index_prefix, console)
    ok = statuses.get("rejected", 0) >= load.expected.get("rejected", 0) and statuses.get("invalid", 0) == load.expected.get(
        "invalid", 0) and statuses.get("dead", 0) == 0 and sum(statuses.values()) == len(sent)
    converged = all(r.ok for r in reports)
    log.flush()
    noted = _warnings(log_path)
    if noted:
        console.print(f"{noted} warnings or errors logged in {log_path} (each command invalid on purpose logs one)")
    console.print("[green]every command reached a terminal outcome[/green]" if ok else "[red]unexpected outcomes[/red]")
    console.print("[green]every read model equals a fresh projection of the write store[/green]" if converged
                  else "[red]read models differ from the write store[/red]")
    return 0 if ok and converged else 1


def _run_phase(pipeline: LocalPipeline, name: str, envelopes: list[CommandEnvelope], console: Console) -> None:
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        published = progress.add_task(f"{name}: publish", total=len(envelopes))
        executed = progress.add_task(f"{name}: execute", total=len(envelopes))
        report = pipeline.producer.send_many(envelopes, on_confirmed=lambda n: progress.advance(published, n))
        if report.failed:
            raise RuntimeError(f"{len(report.failed)} commands not confirmed, first: {report.failed[0]}")
        pipeline.wait_for([e.command_id for e in envelopes], on_progress=lambda n: progress.advance(executed, n))


def _statuses(pipeline: LocalPipeline, ids: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    with pipeline.store.engine.connect() as conn:
        for start in range(0, len(ids), 500):
            query = (sa.select(command_outcomes.c.status, sa.func.count())
                     .where(command_outcomes.c.command_id.in_(ids[start:start + 500]))
                     .group_by(command_outcomes.c.status))
            counts.update(dict(conn.execute(query).all()))
    return counts


def _event_counts(pipeline: LocalPipeline, ids: list[str]) -> Counter[str]:
    """Events by type appended by this run's commands."""
    counts: Counter[str] = Counter()
    mine = set(ids)
    with pipeline.store.engine.connect() as conn:
        for type_, meta in conn.execute(sa.select(events.c.type, events.c.metadata)):
            if meta.get("command_id") in mine:
                counts[type_] += 1
    return counts


def _print_summary(console: Console, load: DemoLoad, sent: list[CommandEnvelope], statuses: Counter[str],
                   event_counts: Counter[str], elapsed: float) -> None:
    table = Table("outcome", "commands", "of which on purpose", title="Outcomes by status")
    for status in ("succeeded", "rejected", "invalid", "dead"):
        table.add_row(status, str(statuses.get(status, 0)), str(load.expected.get(status, "")))
    table.add_row("[bold]total[/bold]", f"[bold]{sum(statuses.values())}[/bold] of {len(sent)} sent", "")
    console.print(table)
    evs = Table("event type", "events", title="Events appended")
    for type_, count in sorted(event_counts.items()):
        evs.add_row(type_, str(count))
    console.print(evs)
    console.print(f"{len(sent)} commands in {elapsed:.1f} s: [bold]{len(sent) / elapsed:,.0f} commands/s[/bold] "
                  f"end to end (publish, execute, record), {sum(event_counts.values())} events")


def _print_read_models(console: Console, reports: list, catch_up: float) -> None:  # type: ignore[type-arg]
    table = Table("read model", "documents", "missing", "extra", "different", title="Read models (cqrskit verify)")
    for r in reports:
        table.add_row(r.read_model, str(r.checked), str(len(r.missing)), str(len(r.extra)), str(len(r.different)))
    console.print(table)
    console.print(f"read models caught up {catch_up:.1f} s after the last command's outcome")


def _where(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


def clean_start(settings: Settings) -> str | None:
    """The embedded search server starts empty each time, so the write store must too. The
    default SQLite file of an earlier run is removed (returns the line that says so); any other
    write store that already holds events is a ``Problem`` with the fix."""
    if settings.elasticsearch_url != EMBEDDED_SEARCH:
        return None
    held = _events_held(settings.database_url)
    if not held:
        return None
    path = settings.sqlite_path
    if path is not None and "database_url" not in settings.model_fields_set:
        for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            leftover.unlink(missing_ok=True)
        return f"a clean start: removed {path} ({held} events of an earlier run; the embedded search server starts empty)"
    raise Problem(DATABASE, settings.database_url,
                  f"the write store holds {held} events of an earlier run and the embedded search server starts empty",
                  f"remove {path}" if path else "give the demo a fresh database")


def _events_held(url: str) -> int:
    from cqrskit.app.preflight import probe_engine, write_store_revision

    if write_store_revision(url) is None:
        return 0
    with probe_engine(url) as engine, engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()


def _warnings(log_path: Path) -> int:
    """Lines at warning level or above in the demo's (JSON) log."""
    levels = ('"level": "warning"', '"level": "error"', '"level": "critical"')
    with log_path.open() as lines:
        return sum(1 for line in lines if any(level in line for level in levels))
