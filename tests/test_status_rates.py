"""``status`` rates: per second between two snapshots, from the counters the snapshot already
holds (outcomes, the relay's checkpoint and backlog, documents); null where a side is unknown."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cqrskit.app.status import PipelineStatus, ReadModelState, RelayState


def snapshot(at: datetime, outcomes: int, checkpoint: int, unpublished: int, documents: int | None) -> PipelineStatus:
    return PipelineStatus(
        taken_at=at, components={}, outcomes={"succeeded": outcomes - 1, "rejected": 1},
        relay=RelayState(checkpoint_position=checkpoint, unpublished_events=unpublished),
        read_models={"orders": ReadModelState(alias="x-orders", documents=documents),
                     "products": ReadModelState(alias="x-products", documents=10)})


def test_rates_between_two_snapshots() -> None:
    t0 = datetime(2026, 12, 3, tzinfo=UTC)
    before = snapshot(t0, outcomes=100, checkpoint=200, unpublished=10, documents=50)
    after = snapshot(t0 + timedelta(seconds=4), outcomes=140, checkpoint=290, unpublished=0, documents=58)
    rates = after.with_rates(before).rates
    assert rates is not None
    assert (rates.window_seconds, rates.commands, rates.events, rates.published, rates.documents) == (4, 10, 20, 22.5, 2)


def test_an_unknown_counter_has_no_rate() -> None:
    t0 = datetime(2026, 12, 3, tzinfo=UTC)
    before = snapshot(t0, outcomes=1, checkpoint=0, unpublished=0, documents=None)
    after = snapshot(t0 + timedelta(seconds=2), outcomes=3, checkpoint=0, unpublished=0, documents=5)
    rates = after.with_rates(before).rates
    assert rates is not None and rates.documents is None and rates.commands == 1
