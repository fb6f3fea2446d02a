"""Inputs an attacker or a careless user controls, refused with one clear line (G10, G11: issue
19 finding 7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_cli import invoke


@pytest.mark.parametrize("name", ["json", "logging", "re", "sqlalchemy", "pika", "dramatiq"])
def test_cqrskit_new_refuses_a_name_that_would_shadow_the_standard_library_or_a_dependency(
    tmp_path: Path, name: str
) -> None:
    """G10, issue 19 finding 7: ``cqrskit new json`` (or logging, re, sqlalchemy, pika) wrote a
    package that shadows the standard library or a dependency for every process run from that
    directory; it is refused with one line and nothing is written."""
    result = invoke("new", name, "--directory", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert "choose another name" in result.output and len(result.output.strip().splitlines()) <= 2
    assert list(tmp_path.iterdir()) == []
    made = invoke("new", "myshop_x", "--directory", str(tmp_path))
    assert made.exit_code == 0 and (tmp_path / "myshop_x" / "app.py").exists(), made.output
