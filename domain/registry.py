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


class Registry:
    def __init__(self) -> None:
        self.commands: dict[str, type[Command]] = {}
        self.events: dict[str, type[Event]] = {}
        self.handlers: dict[str, Handler] = {}
        self.reads: dict[str, Reads] = {}
        self.upcasters: dict[tuple[str, int], Upcaster] = {}

    def event(self, cls: E) -> E:
        """Class decorator: register an event type under ``cls.type``."""
        _register(self.events, cls.type, cls)
        return cls

    def command(self, handler: Handler, *, reads: Reads | None = None) -> Callable[[C], C]:
        """Class decorator: register a command type and the handler that decides it. ``reads``
        (optional): what the handler will read, declared ahead (``cqrskit.domain.reads``)."""

        def register(cls: C) -> C:
            _register(self.commands, cls.type, cls)
            self.handlers[cls.type] = handler
            if reads is not None:
                self.reads[cls.type] = reads
            return cls

        return register

    def upcaster(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register a function turning data of ``from_version`` into ``from_version + 1``."""

        def register(fn: Upcaster) -> Upcaster:
            self.upcasters[(event_type, from_version)] = fn
            return fn

        return register

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
        for version in range(schema_version, cls.schema_version):
            data = self.upcasters[(name, version)](data)
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
            registry.command(part.handlers[name], reads=part.reads.get(name))(cls)
        registry.upcasters.update(part.upcasters)
    return registry


def _register(table: dict[str, Any], name: str, cls: Any) -> None:
    if name in table and table[name] is not cls:
        raise ValueError(f"type {name!r} registered twice ({table[name]!r}, {cls!r})")
    table[name] = cls
