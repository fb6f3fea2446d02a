"""The CLI as a user meets it: --help everywhere, setup idempotent, send/outcome on the
embedded default and on real RabbitMQ + PostgreSQL, clear errors for bad input (G10)."""

from __future__ import annotations

import json
from pathlib import Path

import pika
import pytest
from typer.testing import CliRunner

from cqrskit.app.cli import app
from cqrskit.infra.settings import Settings
from cqrskit.producers.commands import new_command

runner = CliRunner()
COMMANDS = ["setup", "send", "outcome", "worker", "demo", "schema"]


def invoke(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def service_env(settings: Settings) -> dict[str, str]:
    return {
        "CQRSKIT_DATABASE_URL": settings.database_url,
        "CQRSKIT_BROKER_URL": settings.broker_url,
        "CQRSKIT_COMMANDS_EXCHANGE": settings.commands_exchange,
        "CQRSKIT_COMMANDS_QUEUE": settings.commands_queue,
    }


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command: str | None) -> None:
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_send_and_outcome_on_the_embedded_default(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'w.db'}"
    result = invoke("--database-url", db, "send", "RegisterCustomer", "--aggregate", "c1",
                    "--data", '{"name": "Ada", "email": "ada@example.com"}', "--command-id", "cli-1")
    assert result.exit_code == 0, result.output
    assert "1 of 1 commands confirmed" in result.output and "succeeded" in result.output
    shown = invoke("--database-url", db, "outcome", "cli-1", "--json")
    outcome = json.loads(shown.output)
    assert (outcome["status"], outcome["aggregate_version"], len(outcome["positions"])) == ("succeeded", 1, 1)


def test_unknown_outcome_says_so(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'w.db'}"
    invoke("--database-url", db, "setup")
    result = invoke("--database-url", db, "outcome", "nobody")
    assert result.exit_code == 3 and "no outcome for nobody" in result.output


@pytest.mark.parametrize(("data", "message"), [
    ("{not json", "bad command"),
    ("[1, 2]", "must be a JSON object"),
])
def test_bad_data_is_refused_before_sending(tmp_path: Path, data: str, message: str) -> None:
    result = invoke("--database-url", f"sqlite:///{tmp_path / 'w.db'}", "send", "RenameCustomer", "-a", "c1", "-d", data)
    assert result.exit_code == 2 and message in result.output


def test_bad_configuration_is_a_clear_error() -> None:
    result = invoke("--broker-url", "redis://localhost", "setup")
    assert result.exit_code == 2 and "broker_url must be amqp://" in result.output


def test_file_with_a_bad_line_sends_nothing(tmp_path: Path) -> None:
    file = tmp_path / "commands.jsonl"
    good = new_command("RenameCustomer", "c1", {"name": "A"}).to_json().decode()
    file.write_text(f"{good}\n{{\"command_id\": \"x\"}}\n")
    result = invoke("--database-url", f"sqlite:///{tmp_path / 'w.db'}", "send", "--file", str(file))
    assert result.exit_code == 2 and "line 2" in result.output and "nothing sent" in result.output


def test_setup_is_idempotent_and_send_file_is_confirmed_by_rabbitmq(amqp_settings: Settings, tmp_path: Path) -> None:
    env = service_env(amqp_settings)
    for _ in range(2):
        result = invoke("setup", env=env)
        assert result.exit_code == 0, result.output
        assert "write store at revision 0006" in result.output
    file = tmp_path / "commands.jsonl"
    envelopes = [new_command("RenameCustomer", f"c{i}", {"name": f"N{i}"}) for i in range(300)]
    file.write_text("".join(e.to_json().decode() + "\n" for e in envelopes))
    result = invoke("send", "--file", str(file), env=env)
    assert result.exit_code == 0, result.output
    assert "300 of 300 commands confirmed" in result.output
    connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
    declared = connection.channel().queue_declare(amqp_settings.commands_queue, passive=True)
    connection.close()
    assert declared.method.message_count == 300
