"""The read side's commands: relay, indexer, verify, rebuild, parked."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cqrskit.app.preflight import preflight
from cqrskit.app.terminal import shown
from cqrskit.infra import defaults
from cqrskit.infra.inert import inert_lines
from cqrskit.infra.settings import EMBEDDED_SEARCH, LogFormat, Settings

console = Console()
err = Console(stderr=True, soft_wrap=True)  # one line per message, however narrow the terminal
parked_app = typer.Typer(help="Documents the indexer could not write: list, show, retry, drop.",
                         no_args_is_help=True)


@contextmanager
def read_side(settings: Settings, process: str = "read-side") -> Iterator:  # type: ignore[type-arg]
    """The runtime (engine, search client, indexer) of a command run against real services, once
    the preflight of ``process`` passed."""
    from cqrskit.app import bootstrap

    if settings.elasticsearch_url == EMBEDDED_SEARCH:
        err.print("[red]this command needs a search server:[/red] set CQRSKIT_ELASTICSEARCH_URL=http://... "
                  "(the embedded one lives inside `cqrskit demo`)")
        raise typer.Exit(2)
    preflight(settings, process)
    runtime = bootstrap.runtime(settings)
    try:
        yield runtime
    finally:
        runtime.close()


def _model(settings: Settings, name: str):  # type: ignore[no-untyped-def]
    from cqrskit.app.bootstrap import app_of

    app = app_of(settings)
    model = app.read_model(name)
    if model is not None:
        return model
    err.print(f"[red]unknown read model {name!r}[/red] of the app {app.name!r}; known: "
              f"{', '.join(m.name for m in app.read_models) or 'none'}")
    raise typer.Exit(2)


def relay(ctx: typer.Context) -> None:
    """Run the event relay (one active at a time; others wait as standbys) until interrupted.

    Example: cqrskit relay
    """
    from cqrskit.app.bootstrap import run_relay

    try:
        if not ctx.obj.embedded_broker:
            preflight(ctx.obj, "relay")
        run_relay(ctx.obj)
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def indexer(
    ctx: typer.Context,
    processes: Annotated[int, typer.Option("--processes", "-p", help="Indexer processes.")] = 1,
    threads: Annotated[int, typer.Option("--threads", "-t", help="Threads per process (they share coalesced windows).")] = defaults.INDEXER_THREADS,
    partition: Annotated[Optional[list[int]], typer.Option(
        "--partition", help="Consume only this partition's queue (repeatable; default: every partition, "
                            "of CQRSKIT_INDEXER_PARTITIONS).")] = None,
) -> None:
    """Run indexer workers on the indexer queues (Dramatiq), until interrupted.

    Example: cqrskit indexer --processes 1 --threads 8 --partition 0
    """
    from cqrskit.infra.topology import indexer_queues

    settings: Settings = ctx.obj
    if settings.embedded_broker or settings.elasticsearch_url == EMBEDDED_SEARCH:
        err.print("[red]the indexer needs a real broker and search server:[/red] set CQRSKIT_BROKER_URL and "
                  "CQRSKIT_ELASTICSEARCH_URL")
        raise typer.Exit(2)
    if partition and not all(0 <= p < settings.indexer_partitions for p in partition):
        err.print(f"[red]--partition: there are {settings.indexer_partitions} partitions (0 to "
                  f"{settings.indexer_partitions - 1}), set by CQRSKIT_INDEXER_PARTITIONS[/red]")
        raise typer.Exit(2)
    preflight(settings, "indexer")
    queues = indexer_queues(settings, partition or None)
    exec_dramatiq(settings, "cqrskit.app.processes:indexer_worker", queues[0], processes, threads, queues[2:])


def exec_dramatiq(settings: Settings, factory: str, queue: str, processes: int, threads: int,
                  more_queues: list[str] | None = None) -> None:
    """Become Dramatiq's CLI on ``factory`` (``module:callable``), consuming ``queue`` and its delay
    queue (and ``more_queues``), with every effective setting (flags included) handed over through
    the environment."""
    from cqrskit.app.processes import THREADS

    os.environ.update(settings.environment())
    os.environ[THREADS] = str(threads)
    if settings.log_format == LogFormat.auto:  # the children log through a pipe: decide for them
        os.environ["CQRSKIT_LOG_FORMAT"] = (LogFormat.console if sys.stderr.isatty() else LogFormat.json).value
    args = ["cqrskit.app.dramatiq_main", factory, "--processes", str(processes), "--threads", str(threads),
            "--queues", queue, f"{queue}.DQ", *(more_queues or []), "--skip-logging"]
    os.execvp(sys.executable, [sys.executable, "-m", *args])


def verify(
    ctx: typer.Context,
    read_model: Annotated[Optional[str], typer.Argument(help="A read model of the app (default: all).")] = None,
    show: Annotated[int, typer.Option(help="How many differing ids to list per kind.")] = 10,
    snapshots: Annotated[int, typer.Option(help="Aggregates per stream type whose snapshot is compared with "
                                                "a fold of their events (0: none).")] = 200,
) -> None:
    """Compare every document with a fresh projection from the write store, and a sample of
    aggregate snapshots with their events; exit 1 when anything differs.

    Example: cqrskit verify --show 5 --snapshots 1000
    """
    from cqrskit.infra.write_store.snapshots import check_snapshots
    from cqrskit.read_models.verify import verify as run_verify

    models = [_model(ctx.obj, read_model)] if read_model else None
    with read_side(ctx.obj) as rt:
        reports = [run_verify(rt.engine, rt.registry, rt.search, ctx.obj.index_prefix, m)
                   for m in models or rt.read_models]
        stale = check_snapshots(rt.engine, rt.registry, snapshots) if snapshots > 0 else []
    table = Table("read model", "documents", "missing", "extra", "different", "examples")
    for r in reports:
        examples = [*(f"missing {i}" for i in r.missing[:show]), *(f"extra {i}" for i in r.extra[:show]),
                    *(f"{i}: {', '.join(f)}" for i, f in list(r.different.items())[:show])]
        table.add_row(r.read_model, str(r.checked), str(len(r.missing)), str(len(r.extra)), str(len(r.different)),
                      "\n".join(examples))
    console.print(table)
    _print_snapshots(stale, show)
    raise typer.Exit(0 if all(r.ok for r in [*reports, *stale]) else 1)


def _print_snapshots(reports: list, show: int) -> None:  # type: ignore[type-arg]
    """The snapshots' check: a snapshot that differs from its events' fold means ``apply`` changed
    meaning without a ``state_version`` bump (docs/evolving.md)."""
    if not reports:
        return
    table = Table("stream type", "snapshots compared", "different", "examples")
    for r in reports:
        examples = [f"{escape(i)}: {', '.join(map(escape, f))}" for i, f in list(r.different.items())[:show]]
        table.add_row(escape(r.stream_type), str(r.checked), str(len(r.different)), "\n".join(examples))
    console.print(table)
    if not all(r.ok for r in reports):
        err.print("[red]snapshots differ from their events: bump state_version of those aggregates[/red]")


def rebuild(
    ctx: typer.Context,
    read_model: Annotated[Optional[str], typer.Argument(  # noqa: UP007 - typer reads Optional
        help="A read model of the app (cqrskit status lists them); none: list the drifted ones.")] = None,
    drifted: Annotated[bool, typer.Option("--drifted", help="Rebuild every read model whose live index differs "
                                                            "from its declaration (mapping, projection_version).")] = False,
) -> None:
    """Build a new index from the write store while live indexing goes on, then swap the alias.
    Without a name, list the read models whose mapping or projection_version changed since their
    index was built, with the command that fixes each.

    Example: cqrskit rebuild bookings
    """
    from cqrskit.read_models.indices import mapping_drift, projection_drift

    if read_model is not None and drifted:
        raise typer.BadParameter("give a read model or --drifted, not both")
    with read_side(ctx.obj, "rebuild") as rt:
        if read_model is not None:
            return _rebuild_one(ctx.obj, rt, _model(ctx.obj, read_model))
        drift = {m.name: mapping_drift(rt.search, ctx.obj.index_prefix, m)
                 + projection_drift(rt.search, ctx.obj.index_prefix, m) for m in rt.read_models}
        if drifted:
            for model in rt.read_models:
                if drift[model.name]:
                    _rebuild_one(ctx.obj, rt, model)
            return None
    table = Table("read model", "live index", "fix")
    for name, found in drift.items():
        table.add_row(escape(name), escape("; ".join(found)) or "as declared",
                      f"cqrskit rebuild {escape(name)}" if found else "")
    console.print(table)
    if any(drift.values()):
        console.print("cqrskit rebuild --drifted rebuilds each of them")
    return None


def _rebuild_one(settings: Settings, rt, model) -> None:  # type: ignore[no-untyped-def]
    from cqrskit.read_models.rebuild import rebuild as run_rebuild
    from cqrskit.read_models.search import replicas_of

    columns = (TextColumn(f"rebuilding {model.name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("rebuild", total=None)
        report = run_rebuild(rt.engine, rt.registry, rt.search, settings.index_prefix, model,
                             replicas=replicas_of(settings), on_total=lambda n: progress.update(task, total=n),
                             on_progress=lambda n: progress.advance(task, n))
    console.print(f"{report.read_model}: {report.documents} documents into {report.index} in {report.seconds:.1f} s; "
                  f"alias swapped, replaced {', '.join(report.replaced) or 'nothing'}"
                  + (f"; [red]{report.parked} parked[/red]" if report.parked else ""))


@parked_app.command("list")
def parked_list(ctx: typer.Context, limit: Annotated[int, typer.Option(help="At most this many.")] = 100) -> None:
    """List parked documents with their errors.

    Example: cqrskit parked list --limit 20
    """
    from cqrskit.read_models.parking import list_parked

    with read_side(ctx.obj) as rt:
        rows = list_parked(rt.engine, limit)
    table = Table("id", "read model", "document", "attempts", "parked at", "error")
    for row in rows:
        table.add_row(str(row["id"]), shown(row["read_model"]), shown(row["doc_id"]), str(row["attempts"]),
                      row["parked_at"].isoformat(timespec="seconds"), shown((row["error"].splitlines() or [""])[0][:120]))
    console.print(table if rows else "nothing parked")


@parked_app.command("show")
def parked_show(ctx: typer.Context, parked_id: Annotated[int, typer.Argument(help="The parked entry's id.")]) -> None:
    """Show one parked document: its full error and the event positions that touched it.

    Example: cqrskit parked show 3
    """
    from cqrskit.read_models.parking import get_parked

    with read_side(ctx.obj) as rt:
        rows = get_parked(rt.engine, [parked_id])
    if not rows:
        err.print(f"no parked entry {parked_id}")
        raise typer.Exit(3)
    row = rows[0]
    console.print(f"[bold]{shown(row['read_model'])} {shown(row['doc_id'])}[/bold] (attempts {row['attempts']}, "
                  f"parked at {row['parked_at']:%Y-%m-%d %H:%M:%S}, positions {row['positions']})")
    console.print(inert_lines(row["error"]), markup=False)


@parked_app.command("retry")
def parked_retry(
    ctx: typer.Context,
    ids: Annotated[Optional[list[int]], typer.Argument(help="Parked entry ids.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Retry every parked document.")] = False,
) -> None:
    """Compute the parked documents again and write them; entries that now succeed are removed.

    Example: cqrskit parked retry --all
    """
    from cqrskit.read_models.parking import get_parked

    if not ids and not all_:
        err.print("give parked ids, or --all")
        raise typer.Exit(2)
    with read_side(ctx.obj) as rt:
        rows = get_parked(rt.engine, None if all_ else ids)
        by_model: dict[str, list[str]] = {}
        for row in rows:
            by_model.setdefault(row["read_model"], []).append(row["doc_id"])
        still = sum(len(rt.indexer.reindex(model, doc_ids).parked) for model, doc_ids in by_model.items())
    console.print(f"retried {len(rows)}: {len(rows) - still} written, {still} parked again")
    raise typer.Exit(1 if still else 0)


@parked_app.command("drop")
def parked_drop(
    ctx: typer.Context,
    ids: Annotated[Optional[list[int]], typer.Argument(help="Parked entry ids.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Drop every parked entry.")] = False,
) -> None:
    """Forget parked entries (the documents stay as they are in the index).

    Example: cqrskit parked drop 3 4
    """
    from cqrskit.read_models.parking import drop_parked

    if not ids and not all_:
        err.print("give parked ids, or --all")
        raise typer.Exit(2)
    with read_side(ctx.obj) as rt:
        dropped = drop_parked(rt.engine, None if all_ else ids)
    console.print(f"dropped {dropped}")


def register(app: typer.Typer) -> None:
    for command in (relay, indexer, verify, rebuild):
        app.command()(command)
    app.add_typer(parked_app, name="parked")
