"""Dramatiq's own command line (``python -m dramatiq``) with cqrskit's logging in its parent
process too, so that every line of a worker group is in one format (JSON in production): the
parent's lines ("booting up", signals) as well as the workers', which the children log through
``cqrskit.infra.logs`` (the factories in ``cqrskit.app.processes`` configure it). ``cqrskit
worker`` and ``cqrskit indexer`` exec this module with ``--skip-logging``."""

from __future__ import annotations

import sys


def main() -> int:
    from dramatiq.cli import main as dramatiq_main

    from cqrskit.infra.logs import configure_logging
    from cqrskit.infra.settings import load_settings

    configure_logging(load_settings())
    sys.argv[0] = "dramatiq"
    return int(dramatiq_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
