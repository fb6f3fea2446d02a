"""Group commit under kill -9 (real worker processes, real RabbitMQ and PostgreSQL): a batch of
commands decided together and killed before its commit is redelivered and applied once (G1, G2);
a batch killed after its commit, before its acks, comes back as duplicates that change nothing
(G2). The worker is started with a short linger and a batch size equal to its threads, so that
its batches are full ones, and at DEBUG, so that the log names each batch's commands."""

from __future__ import annotations

import uuid

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import make_url

from cqrskit.infra.outcomes import Status
from tests.processes import (  # noqa: F401  (fixtures: commands_topology, workers, write_store)
    Workers,
    WriteStore,
    commands_topology,
    envelope,
    producer,
    workers,
    write_store,
)
from tests.test_worker_faults import assert_each_command_took_effect_once, customer, setup_shop, stock_of

BATCHES = {"CQRSKIT_GROUP_COMMIT_MAX": "8", "CQRSKIT_GROUP_COMMIT_LEADERS": "1",
           "CQRSKIT_GROUP_COMMIT_LINGER_MS": "300"}


def waiting_on_a_row_lock(store: WriteStore) -> int:
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND wait_event = 'transactionid' AND pid <> pg_backend_pid()"
    )
    with store.engine.connect() as conn:
        return conn.execute(query).scalar_one()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_batch_killed_before_its_commit_is_redelivered_and_applied_once(
    workers: Workers, write_store: WriteStore, pg_url: str
) -> None:
    """G1/G2: eight restocks of one product are decided in one batch; the test holds the product's
    stream row locked, so the batch's writes wait before COMMIT; the worker is killed there.
    Nothing of the batch is left, and a new worker applies each restock exactly once."""
    tag = uuid.uuid4().hex[:6]
    product_id = f"p-{tag}"
    setup = workers.start(threads=2)
    with producer(workers.settings) as publisher:
        setup_shop(publisher, write_store, {product_id: 10}, [])
        setup.kill()
        restocks = [envelope("RestockProduct", product_id, {"quantity": q}) for q in range(1, 9)]
        ids = [r["command_id"] for r in restocks]
        dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(dsn) as lock:
            lock.execute("SELECT 1 FROM streams WHERE stream_id = %s FOR UPDATE", (f"product:{product_id}",))
            publisher.publish_all(restocks)
            stuck = workers.start(threads=8, CQRSKIT_LOG_LEVEL="DEBUG", **BATCHES)
            write_store.wait_until(lambda: waiting_on_a_row_lock(write_store) == 1, timeout=30,
                                   what="the batch's writes to wait on the locked stream row")
            (batch,) = [r for r in stuck.log_records() if r["event"] == "group_commit.batch_begun"]
            assert len(set(batch["command_ids"]) & set(ids)) >= 2, f"not a batch: {batch}"
            stuck.kill()
            lock.rollback()
    assert write_store.outcomes(ids) == {}, "a batch killed before its commit left outcomes behind"
    assert write_store.stream_version(f"product:{product_id}") == 1

    workers.start(threads=8, **BATCHES)
    outcomes = write_store.wait_for_outcomes(ids, timeout=30)
    assert_each_command_took_effect_once(write_store, outcomes, lambda cid: ["ProductRestocked"])
    assert write_store.stream_version(f"product:{product_id}") == 1 + 8
    assert stock_of(write_store, product_id) == 10 + sum(range(1, 9))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_batch_killed_after_its_commit_comes_back_as_duplicates_that_change_nothing(
    workers: Workers, write_store: WriteStore
) -> None:
    """G2: the worker's log pipe is never read, so its leader blocks on the batch's log line,
    which it writes after the batch's COMMIT and before handing the outcomes back (and so
    before any of the batch's messages is acked); the group is killed there. The committed
    batch's commands come back, each recognised by its command id, and nothing takes effect
    twice."""
    tag = uuid.uuid4().hex[:6]
    commands = [customer(i, tag) for i in range(1600)]  # ~70 KB of batch lines fill the pipes
    with producer(workers.settings) as publisher:
        confirmed = publisher.publish_all(commands)
    stalled = workers.start(threads=8, stall_logs=True, **BATCHES)
    write_store.wait_until(lambda: stalled.threads_blocked_writing() >= 1, timeout=60,
                           what="the leader blocked on its post-commit batch line")
    stalled.kill()
    committed = set(write_store.outcomes(confirmed))
    assert 0 < len(committed) < len(commands)

    second = workers.start(threads=8, **BATCHES)
    outcomes = write_store.wait_for_outcomes(confirmed, timeout=90)
    assert_each_command_took_effect_once(write_store, outcomes, lambda cid: ["CustomerRegistered"])
    # The group is killed as soon as one thread blocks on its log line: that thread's batch may
    # hold a single command (a batch of one logs its own line), so one duplicate at least.
    duplicates = second.wait_for_log(lambda r: r["event"] == "command.duplicate", count=1, timeout=20)
    assert {r["command_id"] for r in duplicates} <= committed, "a duplicate of a command never committed"
    assert all(o.status is Status.succeeded for o in outcomes.values())
