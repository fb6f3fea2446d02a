"""The indexer process for Dramatiq's CLI: ``dramatiq workers.indexer_app``.

Builds the broker and declares the indexer actor; connects to nothing until the worker starts.
"""

from __future__ import annotations

from infra.logs import configure_logging
from infra.settings import load_settings
from workers.wiring import build_indexer_worker

settings = load_settings()
configure_logging(settings)
broker, runtime = build_indexer_worker(settings)
