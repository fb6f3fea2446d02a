"""An oversized command is refused without being copied around (G10, issue 19 finding 4), on a
real worker process, RabbitMQ and PostgreSQL."""

from __future__ import annotations

import json

import pytest

from cqrskit.infra.outcomes import Status
from tests.processes import (  # noqa: F401  (fixtures)
    Workers,
    WriteStore,
    commands_topology,
    envelope,
    producer,
    workers,
    write_store,
)


def peak_rss_kib(pids: list[int]) -> int:
    """The largest peak resident set (VmHWM) among ``pids``."""
    peaks = []
    for pid in pids:
        with open(f"/proc/{pid}/status") as status:
            peaks += [int(line.split()[1]) for line in status if line.startswith("VmHWM:")]
    return max(peaks)


@pytest.mark.timeout(120)
def test_a_20_mb_command_is_invalid_and_never_copied_whole(workers: Workers, write_store: WriteStore) -> None:
    """G10, issue 19 finding 4: a 20 MB command took a worker from 97 to 270 MB resident (the body
    base64-encoded, wrapped in JSON, decoded back). The worker cuts a body to one byte over
    CQRSKIT_MAX_COMMAND_BYTES before anything else: the command is invalid "more than 65536 bytes",
    by its command id, and the worker's peak resident set grows by well under the 173 MB it did."""
    settings = workers.settings
    worker = workers.start(threads=1)
    warm = envelope("RegisterCustomer", "c-1", {"name": "Ann", "email": "a@example.com"})
    with producer(settings) as publisher:
        publisher.publish(warm)
        assert write_store.wait_for_outcomes([warm["command_id"]], timeout=60)[warm["command_id"]].status \
            is Status.succeeded
        before = peak_rss_kib(worker.children())
        big = envelope("RegisterCustomer", "c-2", {"name": "x" * 20_000_000, "email": "b@example.com"})
        publisher.publish_bytes(json.dumps(big).encode(), "RegisterCustomer", big["command_id"])
    outcome = write_store.wait_for_outcomes([big["command_id"]], timeout=60)[big["command_id"]]
    assert (outcome.status, outcome.reason) == (
        Status.invalid, f"command of more than {settings.max_command_bytes} bytes exceeds "
                        f"CQRSKIT_MAX_COMMAND_BYTES={settings.max_command_bytes}")
    grown_mib = (peak_rss_kib(worker.children()) - before) / 1024
    assert grown_mib < 80, f"the worker's peak resident set grew by {grown_mib:.0f} MiB"
