"""A worker group whose broker is down, as ``cqrskit worker`` runs it (Dramatiq's command line
with cqrskit's logging, ``cqrskit.app.dramatiq_main``): one JSON line per failed attempt with a
growing delay (1 s, 2 s, 4 s...), no pika tracebacks and no plain-text lines from Dramatiq's
parent; SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(120)
def test_a_worker_whose_broker_is_down_logs_one_json_line_per_attempt(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    env.update(CQRSKIT_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}", CQRSKIT_LOG_FORMAT="json",
               CQRSKIT_BROKER_URL=f"amqp://guest:secret@127.0.0.1:{closed_port()}/%2F")
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "cqrskit.app.dramatiq_main", "cqrskit.app.processes:command_worker",
                                   "--processes", "1", "--threads", "1", "--queues", "commands", "commands.DQ",
                                   "--skip-logging"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 90
            while log.read_text().count('"broker_unreachable"') < 3 and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON, the parent's included
    attempts = [r for r in records if r["event"] == "broker_unreachable"]
    assert [(a["attempt"], a["retry_in_seconds"]) for a in attempts[:3]] == [(1, 1.0), (2, 2.0), (3, 4.0)], lines
    assert all(a["endpoint"].startswith("amqp://guest@127.0.0.1:") and "secret" not in a["endpoint"] for a in attempts)
    assert not [r for r in records if r.get("logger", "").startswith("pika") or "exception" in r], lines
    assert not [r for r in records if "connection error" in r["event"] or "Restarting consumer" in r["event"]], lines
    assert any(r.get("logger") == "dramatiq.MainProcess" for r in records), lines
