"""The public API: everything an app writes against, in one module (``from cqrskit.app.api
import ...``). The example apps, docs/extending.md's tutorial and ``cqrskit new``'s skeleton
import only from here; tests/test_public_api.py lists the surface (``__all__``), so a name
leaves it only on purpose.

- the app: ``App``, what ``cqrskit demo`` sends (``DemoLoad``);
- the domain: ``Aggregate``, ``Command``, ``Event``, ``RuleViolation``, ``Registry`` and
  ``merged``, ``HandlerContext`` (what a handler may ask of the store), ``ConcurrencyConflict``;
  what a handler will read, declared ahead (``StreamRead``, ``ClaimRead``, ``FromTarget``,
  ``Read``); a domain that evolves (``UnregisteredEvent``, ``UpcastError``,
  ``check_golden_events``: docs/evolving.md);
- the read side: ``ReadModel`` (the protocol: every attribute cqrskit reads), ``Document``,
  ``STREAMS`` and ``streams_of``, ``positions_by_stream``, ``text_keyword``, ``iso``,
  ``WriteStoreSource``; the query declarations (``Queries``, ``Term``, ``Range``, ``Flag``,
  ``Facet``, ``Metric``, ``View``, ``HELD``/``FRESH``, the parameter types) and the escape hatch
  (``QueryFunction``, ``QueryModel``, ``Searchable``/``searchable``, ``alias``, ``bool_query``,
  ``Awaited``, ``QueryError``);
- commands from outside: ``CommandEnvelope``, ``new_command``, ``CommandProducer``,
  ``ConsistencyToken``;
- workflows: ``ProcessManager`` and ``Reaction`` (events in, commands and timers out:
  docs/process-managers.md);
- testing: ``Scenario`` and ``InMemoryStore`` (handlers, no database), ``ProcessScenario`` (a
  process manager, no database), ``Harness`` and ``Sent`` (the whole pipeline in process).
"""

from __future__ import annotations

from cqrskit.app.declaration import App, DemoLoad
from cqrskit.app.testing import Harness, Sent
from cqrskit.domain.evolution import check_golden_events
from cqrskit.domain.model import Aggregate, Command, Event, RuleViolation, UnregisteredEvent
from cqrskit.domain.ports import ConcurrencyConflict, HandlerContext
from cqrskit.domain.process import ProcessManager, ProcessScenario, Reaction
from cqrskit.domain.reads import ClaimRead, FromTarget, Read, StreamRead
from cqrskit.domain.registry import Registry, UpcastError, merged
from cqrskit.domain.testing import InMemoryStore, Scenario
from cqrskit.infra.envelope import CommandEnvelope
from cqrskit.infra.tokens import ConsistencyToken
from cqrskit.producers.commands import CommandProducer, new_command
from cqrskit.read_models.model import STREAMS, Document, ReadModel, iso, positions_by_stream, streams_of, text_keyword
from cqrskit.read_models.queryable import (
    FRESH, HELD, Awaited, Cents, Facet, Flag, Metric, Queries, QueryError, QueryFunction, QueryModel, Range,
    Searchable, Term, View, When, alias, bool_query, bounded_int, searchable)
from cqrskit.read_models.source import WriteStoreSource

__all__ = [
    # the app
    "App", "DemoLoad",
    # the domain
    "Aggregate", "ClaimRead", "Command", "ConcurrencyConflict", "Event", "FromTarget", "HandlerContext", "Read",
    "Registry", "RuleViolation", "StreamRead", "merged",
    # a domain that evolves (docs/evolving.md)
    "UnregisteredEvent", "UpcastError", "check_golden_events",
    # the read side
    "FRESH", "HELD", "STREAMS", "Awaited", "Cents", "Document", "Facet", "Flag", "Metric", "Queries", "QueryError",
    "QueryFunction", "QueryModel", "Range", "ReadModel", "Searchable", "Term", "View", "When", "WriteStoreSource",
    "alias", "bool_query", "bounded_int", "iso", "positions_by_stream", "searchable", "streams_of", "text_keyword",
    # commands from outside
    "CommandEnvelope", "CommandProducer", "ConsistencyToken", "new_command",
    # workflows (docs/process-managers.md)
    "ProcessManager", "Reaction",
    # testing
    "Harness", "InMemoryStore", "ProcessScenario", "Scenario", "Sent",
]
