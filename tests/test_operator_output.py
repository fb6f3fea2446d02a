"""What operators read is never hostile and never secret (G11, issue finding 7): rich markup in a
dead letter is shown as text, and a password in a bad URL is masked."""

from __future__ import annotations

import json
import subprocess
import sys

import pika

from cqrskit.infra.settings import Settings
from tests.processes import PROJECT, commands_topology, worker_env  # noqa: F401


def test_dlq_list_shows_markup_in_a_command_as_text(commands_topology: Settings) -> None:
    """A command type and id made of rich markup: ``dlq list`` neither crashes nor renders a link."""
    settings = commands_topology
    hostile = {"command_id": "[link=https://evil.example]x[/link]", "type": "[bold red]Pay[/]Order[/nope]",
               "aggregate_id": "a", "payload": {}}
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    channel = connection.channel()
    channel.queue_declare(f"{settings.commands_queue}.XQ", passive=True)
    channel.basic_publish("", f"{settings.commands_queue}.XQ", json.dumps(hostile).encode())
    connection.close()
    done = subprocess.run([sys.executable, "-m", "cqrskit.app", "dlq", "list"], cwd=PROJECT, text=True,
                          capture_output=True, timeout=60, env=worker_env(settings, COLUMNS="250"))
    assert done.returncode == 0, done.stderr
    assert "[bold red]Pay[/]Order[/nope]" in done.stdout


def test_a_password_in_a_bad_url_is_never_echoed(amqp_settings: Settings) -> None:
    for variable, url in (("CQRSKIT_BROKER_URL", "http://ops:s3cr3t-pw@broker.example/"),
                          ("CQRSKIT_DATABASE_URL", "mysql://ops:s3cr3t-pw@db.example/x")):
        env = worker_env(amqp_settings, **{variable: url})
        done = subprocess.run([sys.executable, "-m", "cqrskit.app", "status"], cwd=PROJECT, text=True,
                              capture_output=True, timeout=60, env=env)
        assert done.returncode == 2
        assert "s3cr3t-pw" not in done.stdout + done.stderr
        assert done.stderr.startswith(f"{variable}=") and "***" in done.stderr and len(done.stderr.splitlines()) == 1


def test_producers_and_keys_from_the_cli(sqlite_url: str) -> None:
    """G11: grants and API keys are managed from the CLI; a key's token is shown once and works;
    names full of markup are shown as text; a bad name is one clear line."""
    from typer.testing import CliRunner

    from cqrskit.app.cli import app
    from cqrskit.infra.api_keys import ApiKeys
    from cqrskit.infra.db import make_engine

    runner = CliRunner()
    env = {"CQRSKIT_DATABASE_URL": sqlite_url, "COLUMNS": "200"}

    def run(*args: str) -> str:
        result = runner.invoke(app, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    run("producers", "grant", "billing", "PayOrder", "CancelOrder")
    run("producers", "grant", "gateway", "*", "--on-behalf")
    run("producers", "revoke", "billing", "CancelOrder")
    listed = run("producers", "list")
    assert "billing" in listed and "PayOrder" in listed and "CancelOrder" not in listed and "yes" in listed
    bad = runner.invoke(app, ["producers", "grant", "[red]x y", "PayOrder"], env=env)
    assert bad.exit_code == 2 and "not a valid producer name" in bad.output
    token = run("keys", "create", "web", "-c", "PlaceOrder", "-r", "orders").strip().splitlines()[-1]
    engine = make_engine(sqlite_url)
    key = ApiKeys(engine, ttl=0).authenticate(token)
    assert key is not None and key.may_send("PlaceOrder") and not key.may_send("PayOrder") and key.may_read("orders")
    assert token not in run("keys", "list") and "web" in run("keys", "list")
    run("keys", "revoke", key.key_id)
    assert ApiKeys(engine, ttl=0).authenticate(token) is None
    engine.dispose()
