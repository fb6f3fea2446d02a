"""What ``cqrskit send`` does: read envelopes, publish them with a progress bar, optionally
wait for their outcomes. Bad input is reported line by line and nothing is sent."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cqrskit.infra.envelope import CommandEnvelope
from cqrskit.infra.outcomes import Outcome
from cqrskit.infra.settings import Settings
from cqrskit.infra.write_store.port import WriteStore
from cqrskit.producers.commands import CommandProducer, new_command


def one_envelope(type: str, aggregate: str, data: str, command_id: str | None, expected: int | None,
                 err: Console) -> CommandEnvelope:
    try:
        payload = json.loads(data)
        if not isinstance(payload, dict):
            raise ValueError("the payload must be a JSON object")
        return new_command(type, aggregate, payload, command_id=command_id, expected_version=expected, issuer="cli")
    except (ValueError, ValidationError) as exc:
        err.print(f"[red]bad command:[/red] {exc}")
        raise typer.Exit(2) from None


def envelopes_from_file(path: Path, err: Console) -> list[CommandEnvelope]:
    """Every line a JSON envelope; all lines are checked before anything is sent."""
    envelopes, problems = [], []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                envelopes.append(CommandEnvelope.model_validate_json(line))
            except ValidationError as exc:
                problems.append(f"line {number}: {exc.errors(include_url=False)[0]['msg']} "
                                f"at {'.'.join(map(str, exc.errors()[0]['loc']))}")
    if problems:
        for problem in problems[:20]:
            err.print(f"[red]{problem}[/red]")
        err.print(f"{len(problems)} bad lines in {path}; nothing sent")
        raise typer.Exit(2)
    return envelopes


def send_envelopes(settings: Settings, envelopes: list[CommandEnvelope], *, wait: float,
                   console: Console) -> tuple[int, list[tuple[str | None, str]], list[Outcome]]:
    """Publish; returns (confirmed, failures, outcomes found within ``wait`` seconds)."""
    if settings.embedded_broker:  # the broker lives in this process: so must the worker
        from cqrskit.app.local import LocalPipeline

        with LocalPipeline(settings) as pipeline:
            report = _publish(pipeline.producer, envelopes, console)
            pipeline.wait_for([e.command_id for e in envelopes])
            return report.confirmed, report.failed, _outcomes(pipeline.store, envelopes, 0)
    with CommandProducer.from_settings(settings) as producer:
        report = _publish(producer, envelopes, console)
    if wait <= 0:
        return report.confirmed, report.failed, []
    from cqrskit.app import bootstrap

    with bootstrap.write_store(settings) as store:
        return report.confirmed, report.failed, _outcomes(store, envelopes, wait)


def _publish(producer: CommandProducer, envelopes: list[CommandEnvelope], console: Console):  # type: ignore[no-untyped-def]
    if len(envelopes) == 1:
        return producer.send_many(envelopes)
    columns = (TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("publish", total=len(envelopes))
        return producer.send_many(envelopes, on_confirmed=lambda n: progress.advance(task, n))


def _outcomes(store: WriteStore, envelopes: list[CommandEnvelope], wait: float) -> list[Outcome]:
    if len(envelopes) > 50:
        return []
    deadline = time.monotonic() + wait
    found: dict[str, Outcome] = {}
    while True:
        for envelope in envelopes:
            if envelope.command_id not in found and (o := store.outcome(envelope.command_id)):
                found[envelope.command_id] = o
        if len(found) == len(envelopes) or time.monotonic() >= deadline:
            return list(found.values())
        time.sleep(0.1)
