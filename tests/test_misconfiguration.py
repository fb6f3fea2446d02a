"""Every mistake a newcomer or an operator makes gets one clear line: the setting, its value with
the password masked, and the fix; an exit status other than 0; no traceback unless --debug.

The table below is walked as a user meets it: the real ``cqrskit`` command in a subprocess, the
environment holding only the case's variables, services on this machine (closed ports and
databases that do not exist on 127.0.0.1)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import make_url

from cqrskit.app.errors import mask, unknown_variables

SECRET = "s3cr3t-pw"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cqrskit(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    clean.update(COLUMNS="200", **env)
    return subprocess.run([sys.executable, "-m", "cqrskit.app", *args], env=clean, cwd=cwd,
                          capture_output=True, text=True, timeout=90)


@pytest.fixture
def empty_database(pg_admin: str) -> Iterator[str]:
    """A PostgreSQL database that exists and was never set up."""
    name = f"cqrskit_e_{uuid.uuid4().hex[:10]}"
    admin = make_url(pg_admin).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(pg_admin).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _cases(pg_admin: str, amqp_url: str, empty_db: str) -> list[tuple[str, dict[str, str], list[str], str, str]]:
    """(case, environment, arguments, the setting named, words of the explanation)."""
    tag = uuid.uuid4().hex[:8]
    missing_db = make_url(pg_admin).set(database=f"cqrskit_missing_{tag}").render_as_string(hide_password=False)
    closed_pg = make_url(pg_admin).set(port=closed_port()).render_as_string(hide_password=False)
    amqp = make_url(amqp_url)
    wrong_password = f"amqp://{amqp.username}:{SECRET}@{amqp.host}:{amqp.port or 5672}/%2F"
    closed_amqp = f"amqp://guest:{SECRET}@127.0.0.1:{closed_port()}/%2F"
    no_vhost = f"amqp://{amqp.username}:{amqp.password}@{amqp.host}:{amqp.port or 5672}/no-such-vhost-{tag}"
    sqlite = "sqlite:///./w.db"
    own = {"CQRSKIT_COMMANDS_EXCHANGE": f"t.{tag}.commands", "CQRSKIT_COMMANDS_QUEUE": f"t.{tag}.commands",
           "CQRSKIT_EVENTS_EXCHANGE": f"t.{tag}.events", "CQRSKIT_INDEXER_QUEUE": f"t.{tag}.indexer"}
    return [
        ("database missing", {"CQRSKIT_DATABASE_URL": missing_db}, ["setup"], "CQRSKIT_DATABASE_URL", "does not exist"),
        ("PostgreSQL port closed", {"CQRSKIT_DATABASE_URL": closed_pg}, ["setup"], "CQRSKIT_DATABASE_URL", "nothing answers"),
        ("RabbitMQ port closed", {"CQRSKIT_DATABASE_URL": sqlite, "CQRSKIT_BROKER_URL": closed_amqp}, ["setup"],
         "CQRSKIT_BROKER_URL", "nothing answers"),
        ("wrong password", {"CQRSKIT_DATABASE_URL": sqlite, "CQRSKIT_BROKER_URL": wrong_password}, ["setup"],
         "CQRSKIT_BROKER_URL", "refused the user or the password"),
        ("virtual host missing", {"CQRSKIT_DATABASE_URL": sqlite, "CQRSKIT_BROKER_URL": no_vhost}, ["setup"],
         "CQRSKIT_BROKER_URL", "virtual host"),
        ("search unreachable", {"CQRSKIT_DATABASE_URL": sqlite,
                                "CQRSKIT_ELASTICSEARCH_URL": f"http://127.0.0.1:{closed_port()}"}, ["setup"],
         "CQRSKIT_ELASTICSEARCH_URL", "cqrskit search-server"),
        ("log level", {"CQRSKIT_LOG_LEVEL": "verbose"}, ["status"], "CQRSKIT_LOG_LEVEL", "must be one of"),
        ("broker scheme", {"CQRSKIT_BROKER_URL": "redis://localhost"}, ["setup"], "CQRSKIT_BROKER_URL", "amqp://"),
        ("metrics port", {"CQRSKIT_METRICS_PORT": "http"}, ["setup"], "CQRSKIT_METRICS_PORT", "integer"),
        ("worker before setup", {"CQRSKIT_DATABASE_URL": empty_db, "CQRSKIT_BROKER_URL": amqp_url, **own}, ["worker"],
         "CQRSKIT_DATABASE_URL", "run cqrskit setup"),
        ("relay before setup", {"CQRSKIT_DATABASE_URL": empty_db, "CQRSKIT_BROKER_URL": amqp_url, **own}, ["relay"],
         "CQRSKIT_DATABASE_URL", "run cqrskit setup"),
        ("send before setup", {"CQRSKIT_DATABASE_URL": empty_db, "CQRSKIT_BROKER_URL": amqp_url, **own},
         ["send", "RegisterCustomer", "-a", "c-1"], "CQRSKIT_BROKER_URL", "run cqrskit setup"),
        ("outcome before setup", {"CQRSKIT_DATABASE_URL": empty_db}, ["outcome", "x"], "CQRSKIT_DATABASE_URL",
         "run cqrskit setup"),
    ]


def test_every_misconfiguration_is_one_clear_line(pg_admin: str, amqp_url: str, empty_database: str,
                                                   tmp_path: Path) -> None:
    failures = []
    cases = _cases(pg_admin, amqp_url, empty_database)
    with ThreadPoolExecutor(4) as pool:  # each case is a fresh interpreter: run a few at once
        runs = list(pool.map(lambda c: cqrskit(*c[2], env=c[1], cwd=tmp_path), cases))
    for (case, _env, _args, setting, words), done in zip(cases, runs):
        out = (done.stdout + done.stderr).strip()
        lines = out.splitlines()
        problems = [
            done.returncode == 0 and "exit status 0",
            len(lines) > 3 and f"{len(lines)} lines",
            setting not in out and f"{setting} not named",
            words not in out and f"{words!r} not said",
            "Traceback" in out and "a traceback",
            SECRET in out and "the password shown",
        ]
        if any(problems):
            failures.append(f"{case}: {', '.join(p for p in problems if p)}\n{out[-1500:]}")
    assert not failures, "\n\n".join(failures)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    env = {"CQRSKIT_DATABASE_URL": "sqlite:///./w.db", "CQRSKIT_ELASTICSEARCH_URL": f"http://127.0.0.1:{closed_port()}"}
    done = cqrskit("--debug", "setup", env=env, cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" in done.stderr + done.stdout


def test_a_misspelled_variable_is_named_with_the_nearest_setting(tmp_path: Path) -> None:
    assert unknown_variables({"CQRSKIT_DATABSE_URL": "x", "CQRSKIT_BROKER_URL": "y", "HOME": "/"}) == [
        "CQRSKIT_DATABSE_URL is not a cqrskit setting and is ignored; did you mean CQRSKIT_DATABASE_URL?"]
    done = cqrskit("schema", "--check", "--path", str(tmp_path / "none.json"),
                   env={"CQRSKIT_DATABSE_URL": "sqlite:///x.db"}, cwd=tmp_path)
    assert "did you mean CQRSKIT_DATABASE_URL?" in done.stderr


def test_passwords_are_masked() -> None:
    assert mask("amqp://guest:pw@host:5672/%2F") == "amqp://guest:***@host:5672/%2F"
    assert mask("postgresql+psycopg://app:p%40ss@db/x") == "postgresql+psycopg://app:***@db/x"
    assert mask("http://search:9200") == "http://search:9200"
