"""The resources of one worker process, made at start-up and released at shutdown."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from elasticsearch import Elasticsearch
from sqlalchemy import Engine

from domain.registry import Registry
from infra.db import make_engine
from infra.settings import Settings
from infra.store import EventStore
from read_models.indexer import Indexer
from read_models.search import make_client
from read_models.shop import SHOP_READ_MODELS
from workers.execution import CommandExecutor


def default_registry() -> Registry:
    from domain.shop import registry

    return registry


@dataclass
class Runtime:
    """Lazily made engine, event store and command executor for ``settings``."""

    settings: Settings
    registry: Registry = field(default_factory=default_registry)
    pool_size: int = 8
    search_url: str | None = None  # where the embedded search server listens, when there is one

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.database_url, pool_size=self.pool_size)

    @cached_property
    def store(self) -> EventStore:
        return EventStore(self.engine, self.registry)

    @cached_property
    def executor(self) -> CommandExecutor:
        return CommandExecutor(
            self.store,
            self.registry,
            max_bytes=self.settings.max_command_bytes,
            conflict_retries=self.settings.conflict_retries,
        )

    @cached_property
    def search(self) -> Elasticsearch:
        return make_client(self.search_url or self.settings.elasticsearch_url)

    @cached_property
    def indexer(self) -> Indexer:
        return Indexer(self.engine, self.registry, self.search, self.settings.index_prefix, SHOP_READ_MODELS)

    def close(self) -> None:
        if "search" in self.__dict__:
            self.search.close()
        if "engine" in self.__dict__:
            self.engine.dispose()
