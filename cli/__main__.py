"""``python -m cqrskit.cli``: the same as the ``cqrskit`` command."""

from cqrskit.cli.main import app

app()
