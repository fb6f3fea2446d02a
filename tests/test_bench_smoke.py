"""Each benchmark with a CI smoke runs end to end at a tiny size and prints every row.

Speed is not asserted here (a shared CI machine says nothing about it): docs/benchmarks.md has
the figures of full runs."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("bench", ["command_side", "read_side", "pipeline", "cost"])
def test_smoke_run_prints_every_row(bench: str, pg_admin: str, amqp_url: str) -> None:
    rows = importlib.import_module(f"bench.{bench}").ROWS
    env_overrides = {"CQRSKIT_BENCH_PG": pg_admin, "CQRSKIT_BENCH_AMQP": amqp_url, "COLUMNS": "250"}
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{bench}", "--smoke"],
        cwd=ROOT,
        env={**os.environ, **env_overrides},
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for row in rows:
        assert row in result.stdout, f"row {row!r} missing from:\n{result.stdout[-3000:]}"
