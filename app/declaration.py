"""What an app is: the one object a user declares in their own module and names once
(``CQRSKIT_APP=pkg.module:app`` or ``cqrskit --app pkg.module:app``); every CLI verb and every
Procfile process then runs it.

    from cqrskit.app import App
    app = App("hotel", registry, read_models=(BookingsModel(), RoomsModel()))

Declaring an app imports and connects to nothing: it bundles the domain (the registry: commands,
events, handlers, upcasters), the read models (mapping, fan-out, build, and their declared
queries), the queries the declarations cannot express (``QueryFunction``) and, optionally, the
load that ``cqrskit demo`` sends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cqrskit.domain.process import ProcessManager
from cqrskit.domain.registry import Registry
from cqrskit.read_models.model import ReadModel

if TYPE_CHECKING:
    from rich.console import Console

    from cqrskit.infra.envelope import CommandEnvelope
    from cqrskit.read_models.queryable import QueryFunction, Searchable


class DemoLoad(Protocol):
    """What ``cqrskit demo`` sends: phases of commands (each phase waits for the outcomes of the
    previous one) and how many outcomes of each status are expected on purpose."""

    expected: dict[str, int]

    def phases(self) -> Iterable[tuple[str, list[CommandEnvelope]]]: ...


Showcase = Callable[[Any, str, "Console"], None]  # (search client, index prefix, console): print queries


@dataclass(frozen=True)
class App:
    """One app: ``name``, its ``registry``, its ``read_models`` and its extra ``queries``.
    ``demo(size, seed)`` makes the load of ``cqrskit demo``; ``showcase`` prints a few queries
    after it. Raises ValueError when two read models share a name."""

    name: str
    registry: Registry
    read_models: Sequence[ReadModel] = ()
    queries: Sequence[QueryFunction] = ()
    demo: Callable[[int, int], DemoLoad] | None = None
    showcase: Showcase | None = None
    description: str = ""
    process_managers: Sequence[ProcessManager] = ()  # workflows: events in, commands and timers out

    def __post_init__(self) -> None:
        names = [m.name for m in self.read_models]
        if len(set(names)) != len(names):
            raise ValueError(f"app {self.name!r}: two read models share a name ({names})")
        managers = [m.name for m in self.process_managers]
        if len(set(managers)) != len(managers):
            raise ValueError(f"app {self.name!r}: two process managers share a name ({managers})")
        for manager in self.process_managers:
            unknown = sorted(set(manager.handlers) - set(self.registry.events))
            if unknown:
                raise ValueError(f"app {self.name!r}: process manager {manager.name!r} handles {unknown}, "
                                 f"which the registry does not know")
        object.__setattr__(self, "process_managers", tuple(self.process_managers))
        object.__setattr__(self, "read_models", tuple(self.read_models))
        object.__setattr__(self, "queries", tuple(self.queries))

    def read_model(self, name: str) -> ReadModel | None:
        return next((m for m in self.read_models if m.name == name), None)

    @property
    def searchable(self) -> dict[str, Searchable]:
        """The read models that declare queries, by name, with their queries derived."""
        from cqrskit.read_models.queryable import searchable

        found = {m.name: searchable(m) for m in self.read_models}
        return {name: s for name, s in found.items() if s is not None}
