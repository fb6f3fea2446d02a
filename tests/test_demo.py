"""The README's first command, as a newcomer runs it: `cqrskit demo` on the embedded default
(SQLite, in-process broker, embedded osmem) at its default size. Its output is checked: every
command reached its expected outcome (G3) and every read model equals the write store (G6)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_on_the_embedded_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    env["COLUMNS"] = "160"
    done = subprocess.run([sys.executable, "-m", "cqrskit.app", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=280)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    counts = {status: int(n) for status, n in re.findall(r"│ (succeeded|rejected|invalid|dead)\s+│ (\d+)", out)}
    total = re.search(r"total\s+│ (\d+) of (\d+) sent", out)
    assert total and total.group(1) == total.group(2), out[-2000:]
    assert counts["dead"] == 0 and counts["invalid"] == 3 and counts["rejected"] >= 5 and counts["succeeded"] > 2000
    assert sum(counts.values()) == int(total.group(1))
    models = dict(re.findall(r"│ (orders|products|customers)\s+│ (\d+)\s+│ 0\s+│ 0\s+│ 0\s+│", out))
    assert set(models) == {"orders", "products", "customers"}, out[-2000:]
    assert "every read model equals a fresh projection of the write store" in out
    assert (tmp_path / "var" / "cqrskit.db").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_against_real_services(tmp_path: Path, amqp_settings) -> None:  # type: ignore[no-untyped-def]
    """The same demo with --database-url/--broker-url: PostgreSQL and RabbitMQ (the search server
    stays the embedded one); the relay's and the workers' brokers share one process."""
    s = amqp_settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    env.update(COLUMNS="160", CQRSKIT_COMMANDS_EXCHANGE=s.commands_exchange, CQRSKIT_COMMANDS_QUEUE=s.commands_queue,
               CQRSKIT_EVENTS_EXCHANGE=s.events_exchange, CQRSKIT_INDEXER_QUEUE=s.indexer_queue)
    done = subprocess.run([sys.executable, "-m", "cqrskit.app", "--database-url", s.database_url, "--broker-url",
                           s.broker_url, "demo", "--size", "300"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every read model equals a fresh projection of the write store" in done.stdout
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


@pytest.mark.timeout(300)
def test_the_hotel_demo_runs_with_the_app_named_once(tmp_path: Path) -> None:
    """`cqrskit --app cqrskit.examples.hotel:app demo`: the same pipeline, another app (G3, G6)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    env["COLUMNS"] = "160"
    done = subprocess.run([sys.executable, "-m", "cqrskit.app", "--app", "cqrskit.examples.hotel:app", "demo",
                           "--size", "200"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    counts = {status: int(n) for status, n in re.findall(r"│ (succeeded|rejected|invalid|dead)\s+│ (\d+)", out)}
    assert counts["dead"] == 0 and counts["invalid"] == 2 and counts["rejected"] >= 1 and counts["succeeded"] > 50
    models = dict(re.findall(r"│ (bookings|rooms)\s+│ (\d+)\s+│ 0\s+│ 0\s+│ 0\s+│", out))
    assert set(models) == {"bookings", "rooms"}, out[-2000:]
    assert "Busiest rooms" in out and "every read model equals a fresh projection of the write store" in out


def test_an_app_without_a_demo_load_says_so(tmp_path: Path) -> None:
    (tmp_path / "bare.py").write_text("from cqrskit.app import App\nfrom cqrskit.domain.registry import Registry\n"
                                      "app = App('bare', Registry())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    done = subprocess.run([sys.executable, "-m", "cqrskit.app", "--app", "bare:app", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "declares no demo load" in done.stdout, done.stdout + done.stderr


def _demo(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    env["COLUMNS"] = "160"
    return subprocess.run([sys.executable, "-m", "cqrskit.app", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=280)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_demo_passes_twice_in_one_folder(tmp_path: Path) -> None:
    """The embedded search server starts empty each time: the second run starts from a clean
    write store too, says so in one line, and its output ends with the verdict (the logs, the
    search server's own lines among them, are in var/cqrskit-demo.log)."""
    first = _demo(tmp_path, "demo", "--size", "300")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _demo(tmp_path, "demo", "--size", "300")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "a clean start: removed var/cqrskit.db" in " ".join(second.stdout.split())
    assert second.stdout.strip().splitlines()[-1] == "every read model equals a fresh projection of the write store"
    assert second.stderr == "" and "osmem" not in second.stdout
    assert (tmp_path / "var" / "cqrskit-demo.log").stat().st_size > 0
    # a write store the user chose is never removed: the leftover is named, with the fix
    kept = _demo(tmp_path, "--database-url", "sqlite:///./var/cqrskit.db", "demo", "--size", "300")
    lines = (kept.stdout + kept.stderr).strip().splitlines()
    assert kept.returncode == 2 and "earlier run" in lines[-1] and "remove var/cqrskit.db" in lines[-1], lines
    assert (tmp_path / "var" / "cqrskit.db").exists()
