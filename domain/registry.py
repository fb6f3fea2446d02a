"""Which command and event types a domain has, and which handler decides each command.

A registry is an explicit object (no hidden module-global): each app builds its own, or merges
the registries of its modules (``merged``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from cqrskit.domain.model import Command, Event
from cqrskit.domain.ports import HandlerContext
from cqrskit.domain.reads import Read, Reads

C = TypeVar("C", bound=type[Command])
E = TypeVar("E", bound=type[Event])
Handler = Callable[[Any, str, HandlerContext], None]
"""A handler decides one command: ``handler(command, aggregate_id, context)``; it loads aggregates
through the context and records events on them, or raises RuleViolation."""
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class UnknownType(LookupError):
    """A command or event type that the registry does not know."""


class UpcastError(ValueError):
    """A stored event cannot be brought to the running code's shape: it was written by newer code,
    or an upcaster returned data its next version refuses. The message names the type and version."""


class Registry:
    def __init__(self) -> None:
        self.commands: dict[str, type[Command]] = {}
        self.events: dict[str, type[Event]] = {}
        self.handlers: dict[str, Handler] = {}
        self.reads: dict[str, Reads] = {}
        self.upcasters: dict[tuple[str, int], Upcaster] = {}
        self.internal: set[str] = set()  # command types only process managers send

    def event(self, cls: E) -> E:
        """Class decorator: register an event type under ``cls.type``. Only registered event types
        may be recorded (``Aggregate.record`` raises ``UnregisteredEvent`` for any other)."""
        if not isinstance(cls.schema_version, int) or cls.schema_version < 1:
            raise ValueError(f"event type {cls.type!r}: schema_version must be an int >= 1, "
                             f"got {cls.schema_version!r}")
        _register(self.events, cls.type, cls)
        type.__setattr__(cls, "__cqrskit_registered__", True)
        return cls

    def command(self, handler: Handler, *, reads: Reads | None = None, internal: bool = False) -> Callable[[C], C]:
        """Class decorator: register a command type and the handler that decides it. ``reads``
        (optional): what the handler will read, declared ahead (``cqrskit.domain.reads``).
        ``internal``: only the app's process managers send it; the gateway and the AMQP entry
        refuse it from producers (``invalid``, "internal command")."""

        def register(cls: C) -> C:
            _register(self.commands, cls.type, cls)
            self.handlers[cls.type] = handler
            if reads is not None:
                self.reads[cls.type] = reads
            if internal:
                self.internal.add(cls.type)
            return cls

        return register

    def upcaster(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register a function turning data of ``from_version`` into ``from_version + 1`` (a dict
        in, a dict out; pure: no clock, no I/O). Raises ValueError when that step of that type has
        an upcaster already. The whole chain is checked by ``problems`` when the app is resolved."""

        def register(fn: Upcaster) -> Upcaster:
            _register(self.upcasters, (event_type, from_version), fn, what="upcaster")
            return fn

        return register

    def problems(self) -> list[str]:
        """What is wrong with the upcaster chains, one line each (empty when nothing is): an
        upcaster for a type that is not registered, or from a version the type has reached already,
        and a gap (a type at ``schema_version`` N lacks the step from some version below N).
        ``cqrskit.app.bootstrap.load_app`` refuses an app with any (exit 2, before any process runs)."""
        found = []
        for event_type, version in sorted(self.upcasters):
            cls = self.events.get(event_type)
            if cls is None:
                found.append(f"upcaster from version {version} of {event_type!r}, which is not a registered "
                             f"event type (register it, or remove the upcaster)")
            elif not 1 <= version < cls.schema_version:
                found.append(f"upcaster from version {version} of {event_type!r}, but {cls.__name__}.schema_version "
                             f"is {cls.schema_version}: an upcaster steps from a version below it (bump "
                             f"schema_version to {version + 1}, or remove the upcaster)")
        for event_type, cls in sorted(self.events.items()):
            missing = [v for v in range(1, cls.schema_version) if (event_type, v) not in self.upcasters]
            if missing:
                steps = ", ".join(f"{v} -> {v + 1}" for v in missing)
                found.append(f"event type {event_type!r} is at schema_version {cls.schema_version} but has no "
                             f"upcaster for {steps} (stored events of those versions could not be read: "
                             f"@registry.upcaster({event_type!r}, {missing[0]}))")
        return found

    def command_type(self, name: str) -> type[Command]:
        try:
            return self.commands[name]
        except KeyError:
            raise UnknownType(f"unknown command type {name!r}") from None

    def handler(self, name: str) -> Handler:
        self.command_type(name)
        return self.handlers[name]

    def declared_reads(self, name: str, command: Any, aggregate_id: str) -> list[Read]:
        """What the handler of ``command`` declared it will read ([] when it declared nothing, or
        when its hint raised: a hint never decides anything)."""
        hint = self.reads.get(name)
        if hint is None:
            return []
        try:
            return list(hint(command, aggregate_id))
        except Exception:  # noqa: BLE001 - the handler will read what it reads, and decide
            return []

    def decode_event(self, name: str, schema_version: int, data: dict[str, Any]) -> Event:
        """An event from its stored form, upcast to the current schema version."""
        try:
            cls = self.events[name]
        except KeyError:
            raise UnknownType(f"unknown event type {name!r}") from None
        if schema_version > cls.schema_version:
            raise UpcastError(f"event {name!r} was stored at schema_version {schema_version}, but the running code "
                              f"knows {cls.schema_version} at most: run the code that wrote it (never roll an "
                              f"event's version back)")
        for version in range(schema_version, cls.schema_version):
            try:
                data = self.upcasters[(name, version)](data)
            except KeyError:
                raise UpcastError(f"event {name!r}: no upcaster from schema_version {version}") from None
        return cls.model_validate(data)


def merged(*parts: Registry) -> Registry:
    """One registry holding every type, handler and upcaster of ``parts`` (a domain kept in several
    modules, each with its own registry). Raises ValueError when two parts register different
    classes under one type name."""
    registry = Registry()
    for part in parts:
        for cls in part.events.values():
            registry.event(cls)
        for name, cls in part.commands.items():
            registry.command(part.handlers[name], reads=part.reads.get(name), internal=name in part.internal)(cls)
        for (event_type, version), fn in part.upcasters.items():
            registry.upcaster(event_type, version)(fn)
    return registry


def _register(table: dict[Any, Any], name: Any, cls: Any, what: str = "type") -> None:
    if name in table and table[name] is not cls:
        raise ValueError(f"{what} {name!r} registered twice ({table[name]!r}, {cls!r})")
    table[name] = cls
