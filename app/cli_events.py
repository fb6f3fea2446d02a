"""``cqrskit event-schemas``: the JSON Schema of every event type's data, one file per version, for
the systems that consume the events exchange (docs/events.md, "Versions")."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err = Console(stderr=True, soft_wrap=True)


def event_schemas(
    ctx: typer.Context,
    check: Annotated[bool, typer.Option("--check", help="Fail (exit 1) if the folder differs from the code.")] = False,
    folder: Annotated[Optional[Path], typer.Option(  # noqa: UP007 - typer reads Optional
        "--dir", help="Where the schemas live (default docs/event-schemas/APP).")] = None,
) -> None:
    """Write (or --check) one JSON Schema per event type and version (<type>.v<N>.schema.json).
    Files of older versions are kept, never overwritten.

    Example: cqrskit event-schemas --check
    """
    from cqrskit.app.bootstrap import app_of
    from cqrskit.domain import evolution

    app = app_of(ctx.obj)
    folder = folder or Path("docs") / "event-schemas" / app.name
    if check:
        changes = evolution.schema_changes(app.registry, folder)
        for line in changes:
            err.print(f"[red]{escape(line)}[/red]", highlight=False)
        if not changes:
            console.print(f"{folder}: the event schemas match the code")
        raise typer.Exit(1 if changes else 0)
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, text in evolution.event_schemas(app.registry).items():
        path = folder / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written += 1
    console.print(f"{folder}: {written} schema(s) written")


def register(app: typer.Typer) -> None:
    app.command("event-schemas")(event_schemas)
