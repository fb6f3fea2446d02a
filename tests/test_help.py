"""Every command's --help as a user reads it: one example, no internal jargon (guarantee numbers
such as "(G7)"), no markup of docstrings (RST double backticks) and no bare type placeholders."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from cqrskit.app.cli import app

runner = CliRunner()


def command_paths() -> list[list[str]]:
    group = typer.main.get_command(app)
    paths = []
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        sub = getattr(command, "commands", None)
        if sub:
            paths += [[name, child] for child in sub]
        else:
            paths.append([name])
    return paths


@pytest.mark.parametrize("path", command_paths(), ids=" ".join)
def test_every_command_has_an_example_and_no_jargon(path: list[str]) -> None:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    text = result.output
    assert result.exit_code == 0, text
    assert "Example: cqrskit " in text, text
    assert not re.search(r"\(G\d+", text), text
    assert "``" not in text and "<bool>" not in text and "BOOLEAN" not in text, text


@pytest.mark.parametrize("path", [[], ["parked"], ["dlq"]], ids=lambda p: " ".join(p) or "cqrskit")
def test_groups_list_their_commands_without_jargon(path: list[str]) -> None:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0 and "Commands" in result.output, result.output
    assert not re.search(r"\(G\d+", result.output) and "``" not in result.output, result.output
