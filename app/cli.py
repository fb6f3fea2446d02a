"""The ``cqrskit`` command line. Every command has ``--help``; settings come from the
environment (``CQRSKIT_*``) and the global options override them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cqrskit.app.errors import CliGroup, unknown_variables
from cqrskit.app.preflight import preflight
from cqrskit.app.terminal import inert_json, shown, shown_lines
from cqrskit.infra import defaults
from cqrskit.infra.inert import inert
from cqrskit.infra.logs import configure_logging
from cqrskit.infra.tracing import TracingError, exporter_names
from cqrskit.infra.settings import DEFAULT_APP, LogFormat, Settings, load_settings

app = typer.Typer(help="cqrskit: message-queue driven CQRS workers.", no_args_is_help=True, add_completion=False,
                  cls=CliGroup)
console = Console()
err = Console(stderr=True, soft_wrap=True)  # one line per message, however narrow the terminal


@app.callback()
def main(
    ctx: typer.Context,
    database_url: Annotated[Optional[str], typer.Option(help="Write store URL (env CQRSKIT_DATABASE_URL).")] = None,
    broker_url: Annotated[Optional[str], typer.Option(help="amqp:// URL (a cluster: its nodes' URLs, comma-separated) or memory:// (env CQRSKIT_BROKER_URL).")] = None,
    elasticsearch_url: Annotated[Optional[str], typer.Option(help="Search URL (env CQRSKIT_ELASTICSEARCH_URL).")] = None,
    log_format: Annotated[Optional[LogFormat], typer.Option(help="auto, json or console.")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="DEBUG, INFO, WARNING...")] = None,
    app_: Annotated[Optional[str], typer.Option("--app", help="The app to run, module:attribute (env CQRSKIT_APP; "
                                                f"default: {DEFAULT_APP}).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
) -> None:
    from cqrskit.app.bootstrap import AppError, app_of

    for warning in unknown_variables():
        typer.echo(f"warning: {warning}", err=True)
    settings = load_settings(  # a mistake ends here with one line (cqrskit.app.errors.CliGroup)
        database_url=database_url, broker_url=broker_url, elasticsearch_url=elasticsearch_url,
        log_format=log_format, log_level=log_level, app=app_,
    )
    if ctx.invoked_subcommand not in ("schema", "new"):
        try:
            app_of(settings)  # resolved once, here; a bad CQRSKIT_APP is one line, not a traceback
        except AppError as exc:
            err.print(f"[red]app error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    try:
        exporter_names()  # a bad OTEL_TRACES_EXPORTER or _PROTOCOL is one line, before any process starts
    except TracingError as exc:
        err.print(f"[red]tracing:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    configure_logging(settings)
    ctx.obj = settings


@app.command()
def setup(
    ctx: typer.Context,
    privileges: Annotated[bool, typer.Option(help="Also provision the least-privilege PostgreSQL roles and "
                                                  "RabbitMQ users of docs/operations.md; print Elasticsearch roles.")
                          ] = False,
    prefix: Annotated[str, typer.Option(help="Prefix of the role and user names.")] = "cqrskit",
    producer: Annotated[list[str], typer.Option(help="A producer's RabbitMQ user to provision (repeatable).")
                        ] = [],  # noqa: B006 (typer's list default)
) -> None:
    """Migrate the write store, declare the broker topology and create the read models' indices
    (idempotent); with --privileges, the roles and users of every process type.

    Example: cqrskit setup --privileges --producer billing"""
    from cqrskit.app import bootstrap
    from cqrskit.app.privileges import provision
    from cqrskit.app.setup import setup_all

    settings: Settings = ctx.obj
    setup_all(settings, console.print)
    if privileges:
        made = provision(settings, [m.name for m in bootstrap.app_of(settings).read_models], prefix=prefix,
                         producers=producer,
                         say=lambda line: console.print(line, markup=False, highlight=False))
        for name, password in made.items():
            print(f"password of {name} (shown once): {password}")


@app.command()
def send(
    ctx: typer.Context,
    type: Annotated[Optional[str], typer.Argument(help="Command type, e.g. RegisterCustomer.")] = None,
    aggregate: Annotated[Optional[str], typer.Option("--aggregate", "-a", help="Aggregate id.")] = None,
    data: Annotated[str, typer.Option("--data", "-d", help="Payload as a JSON object.")] = "{}",
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="JSON Lines file of envelopes.")] = None,
    command_id: Annotated[Optional[str], typer.Option(help="Command id (default: a new UUID).")] = None,
    expected_version: Annotated[Optional[int], typer.Option(help="Reject unless the aggregate is at it.")] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the outcome (0: don't).")] = 0.0,
) -> None:
    """Publish one command (TYPE --aggregate ID --data JSON) or a file of envelopes (--file).

    Example: cqrskit send RegisterCustomer --aggregate c-1 --data '{"name": "Ada", "email": "ada@example.com"}' --wait 5
    """
    from cqrskit.app.sending import envelopes_from_file, one_envelope, send_envelopes

    settings: Settings = ctx.obj
    if not settings.embedded_broker:
        preflight(settings, "send-wait" if wait > 0 else "send")
    if file is not None:
        envelopes = envelopes_from_file(file, err)
    elif type and aggregate:
        envelopes = [one_envelope(type, aggregate, data, command_id, expected_version, err)]
    else:
        err.print("[red]give TYPE and --aggregate, or --file[/red] (see cqrskit send --help)")
        raise typer.Exit(2)
    confirmed, failed, outcomes = send_envelopes(settings, envelopes, wait=wait, console=console)
    for command_id_, reason in failed[:20]:
        err.print(f"[red]not confirmed[/red] {escape(str(command_id_))}: {escape(reason)}")
    if len(envelopes) == 1 and not failed:
        console.print(envelopes[0].command_id)
    console.print(f"{confirmed} of {len(envelopes)} commands confirmed by the broker")
    if outcomes:
        print_outcomes(outcomes)
    raise typer.Exit(1 if failed else 0)


@app.command()
def outcome(
    ctx: typer.Context,
    command_id: Annotated[str, typer.Argument(help="The command id.")],
    wait: Annotated[float, typer.Option(help="Seconds to wait for an outcome to appear.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show what became of a command: status, reason, aggregate version, event positions.

    Example: cqrskit outcome 3f2c0c6e-5d1a-4b8e-9a57-0c1d2e3f4a5b --json
    """
    from cqrskit.app import bootstrap

    preflight(ctx.obj, "outcome")
    deadline = time.monotonic() + wait
    with bootstrap.write_store(ctx.obj, pool_size=1) as store:
        found = store.outcome(command_id)
        while found is None and time.monotonic() < deadline:
            time.sleep(0.1)
            found = store.outcome(command_id)
    if found is None:
        err.print(f"no outcome for {shown(command_id)} (yet)")
        raise typer.Exit(3)
    if as_json:
        print(inert_json(found.model_dump(mode="json", exclude={"duplicate"})))
    else:
        print_outcomes([found])


@app.command()
def worker(
    ctx: typer.Context,
    processes: Annotated[int, typer.Option("--processes", "-p", help="Worker processes.")] = 1,
    threads: Annotated[int, typer.Option("--threads", "-t", help="Threads per process: the commands they hold at once are decided and committed together.")] = defaults.COMMAND_THREADS,
) -> None:
    """Run command workers on the commands queue (Dramatiq), until interrupted.

    Example: cqrskit worker --processes 2 --threads 64
    """
    from cqrskit.app.cli_read import exec_dramatiq

    settings: Settings = ctx.obj
    if settings.embedded_broker:
        err.print("[red]the command worker needs a real broker:[/red] set CQRSKIT_BROKER_URL=amqp://...")
        raise typer.Exit(2)
    preflight(settings, "worker")
    exec_dramatiq(settings, "cqrskit.app.processes:command_worker", settings.commands_queue, processes, threads)


@app.command()
def demo(
    ctx: typer.Context,
    size: Annotated[int, typer.Option(help="Roughly how many commands to send.")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed of the load.")] = 7,
) -> None:
    """Run the whole pipeline on the embedded default (or the configured services) under the app's demo load.

    Each run on the embedded default starts clean; the logs go to var/cqrskit-demo.log.

    Example: cqrskit demo --size 5000
    """
    from cqrskit.app.demo import run_demo

    raise typer.Exit(run_demo(ctx.obj, size=size, seed=seed, console=console))


@app.command()
def schema(
    check: Annotated[bool, typer.Option(help="Fail if the file differs from the models.")] = False,
    path: Annotated[Path, typer.Option(help="Where the schema lives.")] = Path("docs/command-envelope.schema.json"),
) -> None:
    """Write (or --check) the JSON Schema of the command envelope.

    Example: cqrskit schema --check
    """
    from cqrskit.infra.envelope import envelope_json_schema_text

    text = envelope_json_schema_text()
    if check:
        same = path.exists() and path.read_text() == text
        console.print("schema up to date" if same else f"[red]{path} differs from the models[/red]")
        raise typer.Exit(0 if same else 1)
    path.write_text(text)
    console.print(f"wrote {path}")


@app.command()
def gateway(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
    insecure: Annotated[bool, typer.Option(help="Local use: no API keys, development token secret.")] = False,
) -> None:
    """Serve the HTTP command gateway (POST /commands, GET /commands/{id}). Every request needs an
    API key (cqrskit keys create) unless --insecure.

    Example: cqrskit gateway --host 0.0.0.0 --port 8000 --workers 2
    """
    from cqrskit.app import bootstrap
    from cqrskit.app.security import Insecure
    from cqrskit.producers.gateway import run_gateway

    settings = _http_settings(ctx.obj, insecure)
    if settings.embedded_broker:
        err.print("[red]the gateway publishes to RabbitMQ:[/red] set CQRSKIT_BROKER_URL=amqp://...")
        raise typer.Exit(2)
    try:
        app_ = bootstrap.gateway_app(settings)
    except (Insecure, ValueError) as exc:
        err.print(f"[red]{escape(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    preflight(settings, "gateway")
    run_gateway(settings, bootstrap.app_of(settings).registry, host, port, workers,
                factory="cqrskit.app.processes:gateway_app", app=app_)


@app.command()
def query(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8001,
    insecure: Annotated[bool, typer.Option(help="Local use: no API keys, development token secret.")] = False,
) -> None:
    """Serve the HTTP query API over the read models; reads the search indices only. Every request
    needs an API key (cqrskit keys create) unless --insecure.

    Example: cqrskit query --host 0.0.0.0 --port 8001
    """
    from cqrskit.app import bootstrap
    from cqrskit.app.security import Insecure
    from cqrskit.read_models.api import run_query_api

    settings = _http_settings(ctx.obj, insecure)
    app_ = bootstrap.app_of(settings)
    try:
        served = bootstrap.query_app(settings)
    except (Insecure, ValueError) as exc:
        err.print(f"[red]{escape(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    preflight(settings, "query")
    try:
        run_query_api(settings, app_.read_models, app_.queries, host, port, app=served)
    except ValueError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None


def _http_settings(settings: Settings, insecure: bool) -> Settings:
    return settings.model_copy(update={"insecure": True}) if insecure else settings


@app.command()
def new(
    name: Annotated[str, typer.Argument(help="The new app's package name (e.g. todo).")],
    directory: Annotated[Path, typer.Option(help="The project directory to write into.")] = Path("."),
) -> None:
    """Write a working app skeleton: domain, read model, App, tests, Procfile and .env (never overwrites).
    Example: cqrskit new todo && python -m pytest tests && honcho start"""
    from cqrskit.app.scaffold import write

    try:
        written = write(name, directory)
    except (ValueError, FileExistsError) as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    for path in written:
        console.print(f"wrote {path}")
    console.print(f"next: python -m pytest tests; cqrskit --app {name}.app:app setup; honcho start "
                  f"(docs/extending.md)")


def print_outcomes(outcomes: list) -> None:  # type: ignore[type-arg]
    table = Table("command id", "type", "aggregate", "status", "version", "positions", "reason")
    colours = {"succeeded": "green", "rejected": "yellow", "invalid": "magenta", "dead": "red"}
    for o in outcomes:
        status = o.status.value
        table.add_row(
            shown(o.command_id), shown(o.type), shown(o.aggregate_id), f"[{colours[status]}]{status}[/]",
            "" if o.aggregate_version is None else str(o.aggregate_version),
            ",".join(map(str, o.positions)), shown_lines((o.reason or "") + _errors_text(o.errors)),
        )
    console.print(table)


def _errors_text(errors: list | None) -> str:  # type: ignore[type-arg]
    return "".join(f"\n  {inert(e['loc'])}: {inert(e['msg'])}" for e in (errors or [])[:10])


from cqrskit.app.cli_dev import register as register_dev  # noqa: E402
from cqrskit.app.cli_events import register as register_events  # noqa: E402
from cqrskit.app.cli_ops import register as register_ops  # noqa: E402
from cqrskit.app.cli_read import register  # noqa: E402
from cqrskit.app.cli_search import register as register_search  # noqa: E402
from cqrskit.app.cli_security import register as register_security  # noqa: E402

register(app)
register_search(app)
register_ops(app)
register_dev(app)
register_events(app)
register_security(app)
from cqrskit.app.cli_flow import register as register_flow; register_flow(app)  # noqa: E402, E702
