"""Who may do what (G11), from the command line: ``cqrskit producers`` (the command types each
RabbitMQ user may publish, enforced by the workers with ``CQRSKIT_PRODUCER_GRANTS=true``) and
``cqrskit keys`` (the API keys of the gateway and the query API). Both write the write store."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cqrskit.app.terminal import shown
from cqrskit.infra.api_keys import ApiKeys
from cqrskit.infra.db import make_engine
from cqrskit.infra.grants import ProducerGrants
from cqrskit.infra.settings import Settings

console = Console()
err = Console(stderr=True)
producers_app = typer.Typer(help="Producers (RabbitMQ users) and the command types each may send.",
                            no_args_is_help=True)
keys_app = typer.Typer(help="API keys of the HTTP gateway and query API.", no_args_is_help=True)


def _grants(ctx: typer.Context) -> ProducerGrants:
    settings: Settings = ctx.obj
    return ProducerGrants(make_engine(settings.database_url, pool_size=1))


def _keys(ctx: typer.Context) -> ApiKeys:
    settings: Settings = ctx.obj
    return ApiKeys(make_engine(settings.database_url, pool_size=1))


@producers_app.command("grant")
def grant(
    ctx: typer.Context,
    producer: Annotated[str, typer.Argument(help="The producer's RabbitMQ user name.")],
    types: Annotated[list[str], typer.Argument(help="Command types it may send ('*': every type).")],
    on_behalf: Annotated[bool, typer.Option(help="It may vouch for other issuers (the gateway, for its API keys).")
                         ] = False,
) -> None:
    """Allow PRODUCER to send TYPES (idempotent).

    Example: cqrskit producers grant billing PayOrder CancelOrder"""
    try:
        found = _grants(ctx).grant(producer, types, on_behalf=True if on_behalf else None)
    except ValueError as exc:
        err.print(f"[red]{shown(str(exc))}[/red]")
        raise typer.Exit(2) from None
    console.print(f"{shown(found.name)} may send: {shown(', '.join(sorted(found.command_types)))}")


@producers_app.command("revoke")
def revoke(
    ctx: typer.Context,
    producer: Annotated[str, typer.Argument(help="The producer's RabbitMQ user name.")],
    types: Annotated[list[str] | None, typer.Argument(help="Command types to take away (none: all, and the producer).")
                     ] = None,
) -> None:
    """Take TYPES from PRODUCER, or remove it altogether.

    Example: cqrskit producers revoke billing CancelOrder"""
    if not _grants(ctx).revoke(producer, types or []):
        err.print(f"no producer {shown(producer)!r}")
        raise typer.Exit(1)
    console.print(f"revoked {shown(', '.join(types)) if types else 'every grant'} of {shown(producer)}")


@producers_app.command("list")
def list_producers(ctx: typer.Context) -> None:
    """Every producer and the types it may send.

    Example: cqrskit producers list"""
    table = Table("producer", "may send", "on behalf of others", title="producers", title_justify="left")
    for p in _grants(ctx).all():
        table.add_row(shown(p.name), shown(", ".join(sorted(p.command_types))) or "-", "yes" if p.on_behalf else "")
    console.print(table)


@keys_app.command("create")
def create_key(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Who holds the key (recorded as issuer key:NAME).")],
    commands: Annotated[list[str], typer.Option("--commands", "-c", help="A command type it may send ('*': all).")
                        ] = [],  # noqa: B006 (typer's list default)
    read: Annotated[list[str], typer.Option("--read", "-r", help="A read model it may read ('*': all).")
                    ] = [],  # noqa: B006
) -> None:
    """Create an API key; its token is printed once and not stored.

    Example: cqrskit keys create frontend -c BookRoom -c CancelBooking -r bookings -r rooms"""
    try:
        key, token = _keys(ctx).create(name, commands, read)
    except ValueError as exc:
        err.print(f"[red]{shown(str(exc))}[/red]")
        raise typer.Exit(2) from None
    err.print(f"key {key.key_id} for {shown(name)} (shown once; send it as 'Authorization: Bearer <token>'):")
    print(token)


@keys_app.command("revoke")
def revoke_key(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="A key id, or a name (every live key of that name).")],
) -> None:
    """Revoke a key (it stops working within CQRSKIT_AUTH_TTL_SECONDS).

    Example: cqrskit keys revoke 3f2a9c0d1e4b5a6c"""
    count = _keys(ctx).revoke(key)
    if not count:
        err.print(f"no live key {shown(key)!r}")
        raise typer.Exit(1)
    console.print(f"revoked {count} key(s)")


@keys_app.command("list")
def list_keys(ctx: typer.Context) -> None:
    """Every key: id, name, scopes, created, revoked (never the secret).

    Example: cqrskit keys list"""
    table = Table("key id", "name", "commands", "read models", "created", "revoked", title="API keys",
                  title_justify="left")
    for k in _keys(ctx).all():
        table.add_row(k.key_id, shown(k.name), shown(", ".join(sorted(k.commands))) or "-",
                      shown(", ".join(sorted(k.read_models))) or "-", f"{k.created_at:%Y-%m-%d %H:%M}",
                      f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(producers_app, name="producers")
    app.add_typer(keys_app, name="keys")
