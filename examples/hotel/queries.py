"""A hotel query the declarations cannot express, through the escape hatch (``QueryFunction``):
arrivals and departures per day over a range of dates, for the front desk."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from elasticsearch import Elasticsearch
from pydantic import BaseModel, Field, model_validator

from cqrskit.app.api import QueryFunction, QueryModel, alias

MAX_DAYS = 366


class FrontDeskQuery(QueryModel):
    start: date = Field(description="First day (included).")
    end: date = Field(description=f"Last day (excluded); at most {MAX_DAYS} days after start.")

    @model_validator(mode="after")
    def _range(self) -> FrontDeskQuery:
        if not 0 < (self.end - self.start).days <= MAX_DAYS:
            raise ValueError(f"end must be 1 to {MAX_DAYS} days after start")
        return self


class Day(BaseModel):
    day: date
    arrivals: int
    departures: int


class FrontDesk(BaseModel):
    days: list[Day] = Field(description="Every day of the range; cancelled bookings left out.")


def _per_day(es: Elasticsearch, prefix: str, field: str, q: FrontDeskQuery) -> dict[str, int]:
    query = {"bool": {"filter": [{"range": {field: {"gte": q.start.isoformat(), "lt": q.end.isoformat()}}}],
                      "must_not": [{"term": {"status": "cancelled"}}]}}
    aggs = {"days": {"terms": {"field": field, "size": MAX_DAYS}}}
    response = es.search(index=alias(prefix, "bookings"), query=query, size=0, aggs=aggs, track_total_hits=False)
    return {b.get("key_as_string", "")[:10]: b["doc_count"] for b in response["aggregations"]["days"]["buckets"]}


def front_desk(es: Elasticsearch, prefix: str, q: Any) -> FrontDesk:
    arrivals, departures = _per_day(es, prefix, "check_in", q), _per_day(es, prefix, "check_out", q)
    days = [q.start + timedelta(days=n) for n in range((q.end - q.start).days)]
    return FrontDesk(days=[Day(day=d, arrivals=arrivals.get(d.isoformat(), 0),
                               departures=departures.get(d.isoformat(), 0)) for d in days])


FUNCTIONS = (
    QueryFunction("/bookings/front-desk", "bookings", FrontDeskQuery, FrontDesk, front_desk,
                  "Arrivals and departures per day over a range of dates"),
)
