"""``cqrskit process-managers``: the process type that runs the app's workflows."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from cqrskit.app.preflight import preflight

err = Console(stderr=True)


def process_managers(
    ctx: typer.Context,
    partition: Annotated[int, typer.Option("--partition", help="This process's partition of the instances.")] = 0,
    partitions: Annotated[int, typer.Option("--partitions", help="How many partitions the instances spread over "
                                                                 "(one process each; timers fire from any).")] = 1,
) -> None:
    """Run the app's process managers: react to events, fire due timers, publish the commands sent.

    Example: cqrskit process-managers --partition 0 --partitions 2
    """
    from cqrskit.app.bootstrap import run_process_managers

    try:
        if not ctx.obj.embedded_broker:
            preflight(ctx.obj, "process-managers")  # the write store migrated, the commands exchange declared
        run_process_managers(ctx.obj, partition, partitions)
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    app.command("process-managers")(process_managers)
