"""The read-side benchmark runs end to end at a tiny size and prints every row.

Speed is not asserted here (a shared CI machine says nothing about it): docs/benchmarks.md has
the figures of a full run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.read_side import ROWS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_read_side_smoke_run_prints_every_row(pg_admin: str, amqp_url: str) -> None:
    env_overrides = {"CQRSKIT_BENCH_PG": pg_admin, "CQRSKIT_BENCH_AMQP": amqp_url, "COLUMNS": "250"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.read_side", "--smoke"],
        cwd=ROOT,
        env={**os.environ, **env_overrides},
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for row in ROWS:
        assert row in result.stdout, f"row {row!r} missing from:\n{result.stdout[-3000:]}"
