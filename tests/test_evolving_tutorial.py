"""docs/evolving.md, run: its Python blocks execute in order in one namespace, as a reader would
paste them, and their assertions hold (issue 22: each kind of domain change, and the checks that
keep old data readable: G3, G6, G10)."""

from __future__ import annotations

import re

from tests.processes import PROJECT

DOC = PROJECT / "docs" / "evolving.md"
BLOCK = re.compile(r"^```python\n(.*?)\n```$", re.MULTILINE | re.DOTALL)


def test_every_block_of_the_tutorial_runs_in_order() -> None:
    blocks = BLOCK.findall(DOC.read_text())
    assert len(blocks) >= 6, "the tutorial lost its steps"
    namespace: dict[str, object] = {"__name__": "evolving_tutorial"}
    for number, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"{DOC.name} block {number}", "exec"), namespace)  # noqa: S102 - our own docs
        except Exception as exc:
            raise AssertionError(f"docs/evolving.md block {number} failed: {exc!r}\n{block}") from exc
    namespace["engine"].dispose()  # type: ignore[attr-defined]


def test_the_commands_it_names_exist_with_the_options_it_gives() -> None:
    from typer.testing import CliRunner

    from cqrskit.app.cli import app

    named = re.findall(r"`cqrskit ([a-z]+(?: [a-z]+)?)((?: --[a-z-]+)*)(?: [A-Za-z]+)?`", DOC.read_text())
    assert {verb for verb, _ in named} >= {"rebuild", "parked retry", "setup", "status"}, named
    for verb, options in named:
        shown = CliRunner().invoke(app, [*verb.split(), "--help"])
        assert shown.exit_code == 0, (verb, shown.output)
        for option in options.split():
            assert option in shown.output, (verb, option)
