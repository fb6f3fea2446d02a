"""What a command's handler will read, declared ahead: an optional hint to the write store.

A handler reads one round trip at a time while it decides (load this stream, then who holds
that claim, then the aggregate holding it...). When a command type declares its reads
(``registry.command(handler, reads=...)``), a worker that decides many commands in one
transaction reads what every command of the batch declared in its opening round trip, and each
handler then finds its reads already made. A hint never changes a decision:

- the handler still loads what it loads; a read it did not declare is made when it is made;
- a declared read the handler does not make costs a row read and a lock, nothing else;
- a hint function that raises is ignored (the command is decided without hints).

Example (a transfer reads the account it pays into, found by its IBAN claim)::

    def transfer_reads(command: Transfer, account_id: str) -> list[Read]:
        return [ClaimRead(IBAN_SCOPE, command.to_iban, owner=Account)]

    @registry.command(transfer, reads=transfer_reads)
    class Transfer(Command): ...

What a handler reads may follow from the state of the aggregate the command addresses (closing
an account blocks each card the account holds). ``FromTarget`` declares those: the batch asks
for them once it has read its commands' aggregates, in its second round trip, instead of one
round trip per card while the handler decides::

    @registry.command(close_account, reads=lambda command, account_id: [
        FromTarget(lambda account: [StreamRead(Card, card_id) for card_id in account.state.cards])])
    class CloseAccount(Command): ...

The example apps of the repository declare theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cqrskit.domain.model import Aggregate


@dataclass(frozen=True)
class StreamRead:
    """The handler loads ``aggregate`` ``aggregate_id`` (``ctx.load``)."""

    aggregate: type[Aggregate[Any]]
    aggregate_id: str


@dataclass(frozen=True)
class ClaimRead:
    """The handler asks who holds ``key`` in ``scope`` (``ctx.owner_of``, ``claim``, ``release``);
    ``owner``: it then loads the aggregate of that type whose id is the holder."""

    scope: str
    key: str
    owner: type[Aggregate[Any]] | None = None


@dataclass(frozen=True)
class FromTarget:
    """Reads that follow from the command's own aggregate as loaded: ``reads(aggregate)`` returns
    ``StreamRead`` and ``ClaimRead`` hints (anything else it returns, or raises, is ignored)."""

    reads: Callable[[Any], Iterable[StreamRead | ClaimRead]]


Read = StreamRead | ClaimRead | FromTarget
Reads = Callable[[Any, str], Iterable[Read]]
"""``reads(command, aggregate_id)``: what the handler of ``command`` will read."""
