"""The resources of one worker process, made at start-up and released at shutdown."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from elasticsearch import Elasticsearch
from sqlalchemy import Engine

from cqrskit.domain.process import ProcessManager
from cqrskit.domain.registry import Registry
from cqrskit.infra.db import make_engine
from cqrskit.infra.grants import ProducerGrants
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import EventStore, Waits
from cqrskit.infra.write_store.reactions import ReactionStore
from cqrskit.read_models.indexer import Indexer
from cqrskit.read_models.model import ReadModel
from cqrskit.read_models.search import make_client
from cqrskit.workers.admission import Gate
from cqrskit.workers.execution import CommandExecutor


@dataclass
class Runtime:
    """Lazily made engine, event store, command executor and indexer for ``settings``, running
    the domain of ``registry`` and the read models ``read_models`` (both chosen by the caller:
    the composition root)."""

    settings: Settings
    registry: Registry
    read_models: Sequence[ReadModel]
    pool_size: int = 8
    search_url: str | None = None  # where the embedded search server listens, when there is one
    process_managers: Sequence[ProcessManager] = ()

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.database_url, pool_size=self.pool_size)

    @cached_property
    def store(self) -> EventStore:
        waits = Waits(lock=self.settings.lock_timeout, idle=self.settings.idle_transaction_timeout)
        return EventStore(self.engine, self.registry, waits=waits)

    @cached_property
    def executor(self) -> CommandExecutor:
        return CommandExecutor(
            self.store,
            self.registry,
            max_bytes=self.settings.max_command_bytes,
            conflict_retries=self.settings.conflict_retries,
            max_batch=self.settings.group_commit_max,
            leaders=self.settings.group_commit_leaders,
            linger=self.settings.group_commit_linger_ms / 1000,
            adaptive_linger=self.settings.group_commit_adaptive_linger_ms / 1000,
            gate=Gate(ProducerGrants(self.engine, ttl=self.settings.grants_ttl_seconds),
                      enforce=self.settings.producer_grants),
            sent_internally=self.reactions.sent_internally,  # internal commands: only from the outbox
        )

    @cached_property
    def reactions(self) -> ReactionStore:
        """The process managers' side of the write store (state, handled events, outbox, timers)."""
        return ReactionStore(self.engine, self.registry, self.process_managers)

    @cached_property
    def search(self) -> Elasticsearch:
        return make_client(self.search_url or self.settings.elasticsearch_url, settings=self.settings)

    @cached_property
    def indexer(self) -> Indexer:
        return Indexer(self.engine, self.registry, self.search, self.settings.index_prefix, self.read_models)

    def close(self) -> None:
        if "search" in self.__dict__:
            self.search.close()
        if "engine" in self.__dict__:
            self.engine.dispose()
