"""A deterministic in-process pipeline for an app's own tests: ``Harness``.

    with Harness(app, "sqlite:///" + str(tmp_path / "w.db"), search_url) as pipeline:
        done = pipeline.send("BookRoom", "b1", {...})
        page = pipeline.search("bookings", consistent_with=done.token, text="ada")

The same executor, indexer and queries as the deployed processes (built by the same function,
``cqrskit.app.bootstrap.build_runtime``, from the same settings), without a broker, threads or
sleeps: ``send`` decides a command synchronously (``CommandExecutor``: validation, rules,
optimistic concurrency, outcome); ``drain`` hands every committed event to the indexer, as the
relay would, and refreshes the indices; a query given a consistency token drains until the read
model reflects it, and fails at once if the drained pipeline still does not (nothing is left
that could change the answer). Needs a search server: a URL, or ``"embedded"`` to start osmem
for the harness.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cqrskit.app import bootstrap
from cqrskit.app.declaration import App
from cqrskit.infra.event_wire import EventMessage
from cqrskit.infra.migrate import upgrade
from cqrskit.infra.outcomes import Outcome
from cqrskit.infra.settings import EMBEDDED_SEARCH, Settings
from cqrskit.infra.store import EventStore
from cqrskit.infra.tokens import ConsistencyToken
from cqrskit.infra.write_store.port import StoredEvent
from cqrskit.infra.write_store.reactions import Fired, ReactionStore
from cqrskit.producers.commands import new_command
from cqrskit.read_models.indexer import Indexer
from cqrskit.read_models.indices import alias, ensure
from cqrskit.read_models.queryable import Searchable
from cqrskit.read_models.search import EmbeddedSearch
from cqrskit.read_models.verify import VerifyReport, verify
from cqrskit.workers.execution import CommandExecutor

SECRET = "harness-secret"


@dataclass(frozen=True)
class Sent:
    """A command's terminal outcome, and the consistency token of a succeeded one."""

    outcome: Outcome
    token: str | None

    @property
    def status(self) -> str:
        return self.outcome.status.value


class Harness:
    """Context manager: migrates the write store, creates the app's indices under a fresh
    prefix, and runs the pipeline step by step (see the module docstring)."""

    def __init__(self, app: App, database_url: str, search_url: str = EMBEDDED_SEARCH,
                 prefix: str | None = None, now: datetime | None = None) -> None:
        self.app = app
        self.settings = Settings(database_url=database_url, elasticsearch_url=search_url,
                                 index_prefix=prefix or f"h{uuid.uuid4().hex[:10]}", token_secret=SECRET)
        self.position = 0
        self.reacted = 0  # the position the process managers have reacted up to
        self.now = now or datetime.now(UTC)  # the process managers' clock: moved by ``advance`` only
        self.fired: list[Fired] = []

    def __enter__(self) -> Harness:
        self._search = EmbeddedSearch(self.settings).__enter__()
        self.runtime = bootstrap.build_runtime(self.settings, self.app, pool_size=2, search_url=self._search.url)
        self.es, self.engine = self.runtime.search, self.runtime.engine
        upgrade(self.engine)
        self.store: EventStore = self.runtime.store
        self.executor: CommandExecutor = self.runtime.executor  # the deployed worker's, from the same builder
        self.indexer: Indexer = self.runtime.indexer
        self.reactions: ReactionStore = self.runtime.reactions  # the process managers' write-store side
        for model in self.app.read_models:
            ensure(self.es, self.engine, self.prefix, model)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            names = list(self.es.indices.get(index=f"{self.prefix}-*"))
            if names:
                self.es.indices.delete(index=",".join(names), ignore_unavailable=True)
        finally:
            self.runtime.close()
            self._search.__exit__()

    @property
    def prefix(self) -> str:
        return self.settings.index_prefix

    # -- the command side ------------------------------------------------------------------------
    def send(self, type: str, aggregate_id: str, payload: dict[str, Any], **envelope: Any) -> Sent:
        """Decide one command now; its outcome (any status) and, when it succeeded, its token. The
        process managers then react to its events at the Harness's clock (``react``)."""
        command = new_command(type, aggregate_id, payload, **envelope)
        outcome = self.executor.execute(command.to_json())
        self.react()
        token = None
        if outcome.status.value == "succeeded":
            token = ConsistencyToken(self.store.stream_versions(outcome.positions)).encode(SECRET)
        return Sent(outcome, token)

    def events(self, sent: Sent) -> list[StoredEvent]:
        """The events a command recorded, in order ([] unless it succeeded)."""
        positions = sent.outcome.positions or []
        if not positions:
            return []
        return [e for e in self.store.read_all(min(positions) - 1, len(positions) * 4 + 100) if e.position in positions]

    # -- the process managers ------------------------------------------------------------------
    def advance(self, delay: timedelta | float) -> list[Fired]:
        """Move the process managers' clock forward (seconds, or a timedelta) and run them: the
        timers then due fire, their commands are decided. No sleep. Returns the timers fired."""
        self.now += delay if isinstance(delay, timedelta) else timedelta(seconds=delay)
        before = len(self.fired)
        self.react()
        return self.fired[before:]

    def react(self) -> int:
        """Run the process managers until they are quiet: each new event to the managers that
        handle it, the timers due at ``now`` fired, the commands sent decided (their events
        are reacted to in turn). Returns how many commands the managers sent."""
        sent = 0
        while True:
            for event in self._unreacted():
                for manager in self.reactions.handles(event.type):
                    self.reactions.react(manager, event, self.now)
            self.fired += self.reactions.fire_due(self.now)
            with self.reactions.take_unpublished() as commands:
                taken = list(commands)
            for command in taken:
                self.executor.execute(command.envelope.to_json())
            sent += len(taken)
            if not taken and self.reacted >= self.store.last_position():
                return sent

    def _unreacted(self) -> list[StoredEvent]:
        found = []
        while events := self.store.read_all(self.reacted, 500):
            found += events
            self.reacted = events[-1].position
        return found

    # -- the read side ---------------------------------------------------------------------------
    def drain(self, batch: int = 500) -> int:
        """Run the process managers (``react``), then index every event committed since the last
        drain and make the documents searchable. Returns how many events were indexed."""
        self.react()
        indexed = 0
        while events := self.store.read_all(self.position, batch):
            self.indexer.index_events([EventMessage.from_stored(e).model_dump(mode="json") for e in events])
            self.position = events[-1].position
            indexed += len(events)
        self.es.indices.refresh(index=",".join(alias(self.prefix, m.name) for m in self.app.read_models))
        return indexed

    def searchable(self, model: str) -> Searchable:
        found = self.app.searchable.get(model)
        if found is None:
            raise KeyError(f"the app {self.app.name!r} has no searchable read model {model!r}")
        return found

    def until_reflected(self, model: str, token: str) -> None:
        """Drain until ``model`` reflects ``token``. Raises AssertionError if the drained pipeline
        does not: no later event could make it."""
        reflection = self.searchable(model).reflection(ConsistencyToken.decode(token, SECRET), timeout=0)
        while not reflection.check(self.es, self.prefix):
            if self.drain() == 0:
                raise AssertionError(f"{model} does not reflect the token once drained: "
                                     f"{', '.join(map(str, reflection.pending))}")

    def search(self, model: str, consistent_with: str | None = None, **params: Any) -> Any:
        """A page of ``model``'s declared search (``params``: its query parameters)."""
        target = self.searchable(model)
        self.until_reflected(model, consistent_with) if consistent_with else self.drain()
        return target.search(self.es, self.prefix, target.query_model.model_validate(params))

    def get(self, model: str, doc_id: str, consistent_with: str | None = None) -> Any:
        """One document of ``model`` as its view, or None."""
        self.until_reflected(model, consistent_with) if consistent_with else self.drain()
        return self.searchable(model).get(self.es, self.prefix, doc_id)

    def query(self, path: str, consistent_with: str | None = None, **params: Any) -> Any:
        """One of the app's query functions (the escape hatch), by its path."""
        function = next((f for f in self.app.queries if f.path.strip("/") == path.strip("/")), None)
        if function is None:
            raise KeyError(f"the app {self.app.name!r} has no query {path!r}")
        self.until_reflected(function.read_model, consistent_with) if consistent_with else self.drain()
        return function.run(self.es, self.prefix, function.params.model_validate(params))

    def verify(self) -> list[VerifyReport]:
        """Every read model compared with a fresh projection of the write store (G6)."""
        self.drain()
        return [verify(self.engine, self.app.registry, self.es, self.prefix, m) for m in self.app.read_models]
