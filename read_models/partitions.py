"""Indexer partitions: every document has one home partition, so indexer processes that consume
different partitions never compute the same document.

The relay feeds every batch to every partition's queue (one message per partition and batch, in
one confirm round); an indexer projects, of the documents a batch touches, only those whose home
is the partition the batch came from. Finding the touched documents (the fan-out) is repeated by
each partition; computing and writing them, the work that costs, is not.

The home of a document is a jump consistent hash (Lamping and Veach, 2014) of its stream id,
``<stream type>:<document id>``: the same in every process and host, and when the count grows from
N to N + 1 partitions only one document in N + 1 changes home.

Partitioning decides who does the work, never what is written: whoever computes a document writes
it with its external version (G6). Two processes that compute the same document (while the
partition count changes, say) only repeat work; a partition nobody consumes only waits, its
batches kept in its queue.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Partition:
    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"partition {self.index} of {self.count} does not exist")

    def owns(self, stream_id: str) -> bool:
        """Whether the document of ``stream_id`` has its home here."""
        return self.count == 1 or home(stream_id, self.count) == self.index


def home(stream_id: str, count: int) -> int:
    """The home partition (0 .. count - 1) of the document of ``stream_id``."""
    key = int.from_bytes(hashlib.blake2b(stream_id.encode(), digest_size=8).digest(), "big")
    bucket, jump = -1, 0
    while jump < count:
        bucket = jump
        key = (key * 2862933555777941757 + 1) & _MASK
        jump = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket
