"""The Harness is the deployed wiring, not a copy: its executor comes from the builder that makes
every command worker's (``cqrskit.app.bootstrap.build_runtime``), with the same settings: the
same group commit, waits, retries, size limit and producer gate. So what an app's tests see of
outcomes (G3), exactly-once effect (G2) and conflicts (G4) is what its workers do."""

from __future__ import annotations

from dataclasses import fields

from cqrskit.app import bootstrap
from cqrskit.app.api import Harness
from cqrskit.examples.hotel import app as hotel
from cqrskit.workers.execution import CommandExecutor


def _configuration(executor: CommandExecutor) -> dict[str, object]:
    """What decides how an executor runs commands: every field but the store and the registry
    (process resources), plus the store's lock waits and whether it batches."""
    resources = ("store", "registry", "gate", "sent_internally")
    values = {f.name: getattr(executor, f.name) for f in fields(executor) if f.name not in resources}
    vouch = executor.sent_internally
    return {**values, "gate": (executor.gate.enforce, type(executor.gate.grants).__name__),
            "sent_internally": None if vouch is None else vouch.__qualname__,  # internal commands: the outbox's word
            "waits": executor.store.waits, "batches": executor.store.batches,
            "group": None if executor.group is None else (executor.group.max_batch, executor.group.leaders)}


def test_the_harness_runs_the_deployed_workers_executor(pg_url: str, search_url: str) -> None:
    """G2, G3, G4: the Harness decides commands with a command worker's executor and settings."""
    with Harness(hotel, pg_url, search_url) as harness:
        _broker, deployed = bootstrap.command_worker(harness.settings.model_copy(update={"app": "cqrskit.examples.hotel:app"}))
        try:
            assert type(harness.executor) is type(deployed.executor)
            assert _configuration(harness.executor) == _configuration(deployed.executor)
            assert harness.executor.max_batch == harness.settings.group_commit_max  # the one default: Settings'
            assert harness.executor.group is not None  # group commit, as on a deployed PostgreSQL worker
            done = harness.send("AddRoom", "r1", {"number": "101", "room_type": "double", "rate_cents": 12000})
            assert done.status == "succeeded", done.outcome
        finally:
            deployed.close()


def test_each_default_is_written_once() -> None:
    """G4 and G1 tunables (retries, batch size) mean the same built by hand or by the root: an
    executor made without Settings takes Settings' defaults, and every entry point takes the
    same thread counts (cqrskit.infra.defaults)."""
    import inspect

    from cqrskit.app import processes
    from cqrskit.infra import defaults
    from cqrskit.infra.settings import Settings

    settings = Settings()
    executor_defaults = {f.name: f.default for f in fields(CommandExecutor)}
    assert executor_defaults["max_bytes"] == settings.max_command_bytes
    assert executor_defaults["conflict_retries"] == settings.conflict_retries
    assert executor_defaults["max_batch"] == settings.group_commit_max
    assert executor_defaults["leaders"] == settings.group_commit_leaders
    assert executor_defaults["linger"] == settings.group_commit_linger_ms / 1000
    for entry, default in ((bootstrap.command_worker, defaults.COMMAND_THREADS),
                           (bootstrap.indexer_worker, defaults.INDEXER_THREADS)):
        assert inspect.signature(entry).parameters["threads"].default == default
    assert "defaults.COMMAND_THREADS" in inspect.getsource(processes.command_worker)
    assert "defaults.INDEXER_THREADS" in inspect.getsource(processes.indexer_worker)


def test_the_relays_broker_leaves_the_process_broker_alone(amqp_settings) -> None:  # type: ignore[no-untyped-def]
    """G5: the relay declares and publishes through a broker of its own; making it installs no
    global Dramatiq broker (an actor declared in the same process keeps the broker it was given)."""
    import dramatiq
    from dramatiq.brokers.stub import StubBroker

    from cqrskit.workers.relay_outlet import RabbitmqOutlet

    mine = StubBroker()
    dramatiq.set_broker(mine)
    outlet = RabbitmqOutlet(amqp_settings)
    try:
        outlet._declare()  # the relay's first use: its broker made, queues and exchange declared
        assert outlet.broker is not None and outlet.broker is not mine
        assert dramatiq.get_broker() is mine
    finally:
        outlet.close()
