"""Dramatiq's own command line (``python -m dramatiq``) with cqrskit's logging in its parent
process too, so that every line of a worker group is in one format (JSON in production): the
parent's lines ("booting up", signals) as well as the workers', which the children log through
``cqrskit.infra.logs`` (the factories in ``cqrskit.app.processes`` configure it). ``cqrskit
worker`` and ``cqrskit indexer`` exec this module with ``--skip-logging``."""

from __future__ import annotations

import os
import sys


def main() -> int:
    from dramatiq.cli import main as dramatiq_main

    from cqrskit.infra.logs import configure_logging
    from cqrskit.infra.settings import load_settings

    settings = load_settings()
    configure_logging(settings)
    sys.argv[0] = "dramatiq"
    try:
        return int(dramatiq_main() or 0)
    finally:
        remove_group_directory(settings)


def remove_group_directory(settings: object) -> None:
    """The metric files of this group's processes (this process is their Dramatiq parent) go
    when the group stops."""
    import shutil

    from cqrskit.workers.metrics import group_directory_of

    shutil.rmtree(group_directory_of(settings, os.getpid()), ignore_errors=True)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
