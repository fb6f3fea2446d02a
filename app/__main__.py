"""``python -m cqrskit.app``: the same as the ``cqrskit`` command."""

from cqrskit.app.cli import app

app()
