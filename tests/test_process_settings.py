"""Settings are read once, in the composition root, and every one of them reaches the processes
it starts (issue: ``cqrskit --log-level DEBUG worker`` logged at INFO, because the Dramatiq
children received three settings, not all of them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cqrskit.app.setup import setup_all
from cqrskit.infra.settings import Settings


def test_every_setting_round_trips_through_the_environment() -> None:
    settings = Settings(broker_url="amqp://u:p@rabbit:5672/%2F", max_command_bytes=1234, log_level="DEBUG",
                        commands_exchange="x.y", conflict_retries=3, metrics_port=9100, queue_type="classic")
    env = settings.environment()
    assert set(env) == {f"CQRSKIT_{name.upper()}" for name, value in settings.model_dump().items()
                        if value is not None}
    assert Settings(**{k.removeprefix("CQRSKIT_").lower(): v for k, v in env.items()}) == settings


@pytest.mark.timeout(120)
def test_a_global_flag_reaches_the_dramatiq_worker_processes(amqp_settings: Settings) -> None:
    """G12: ``--log-level DEBUG`` given to ``cqrskit`` is the level of the worker children.
    (The worker checks that setup ran before it starts: set up first.)"""
    setup_all(amqp_settings, say=lambda _line: None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    env.update({k: v for k, v in amqp_settings.environment().items() if k != "CQRSKIT_LOG_LEVEL"})
    process = subprocess.Popen(
        [sys.executable, "-m", "cqrskit.app", "--log-level", "DEBUG", "--log-format", "json", "worker", "-p", "1",
         "-t", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[dict] = []  # type: ignore[type-arg]
    try:
        deadline = time.monotonic() + 60
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            try:
                record = json.loads(line)
            except ValueError:
                continue
            seen.append(record)
            if record.get("level") == "debug" and record.get("logger", "").startswith("dramatiq.worker"):
                break
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    debug = [r for r in seen if r.get("level") == "debug" and r.get("logger", "").startswith("dramatiq.worker")]
    assert debug, f"no debug line from a worker process; saw {[(r.get('level'), r.get('logger')) for r in seen][:20]}"
