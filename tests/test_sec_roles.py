"""Each PostgreSQL role of ``setup --privileges`` may do its job and nothing past it (G11), on real
PostgreSQL: issue 19 finding 7's refusals."""

from __future__ import annotations

from tests.processes import commands_topology  # noqa: F401  (fixture of ``provisioned``)
from tests.test_privileges import pg_as, provisioned, refused_sql  # noqa: F401

ROLES = ("worker", "relay", "indexer", "gateway", "query", "operator")


def test_no_role_rewrites_history_makes_temporary_tables_or_reads_past_its_columns(provisioned) -> None:  # noqa: F811
    """G11, issue 19 finding 7: the worker may append events but not UPDATE them (a history
    rewrite once succeeded); no role may CREATE TEMP TABLE; the gateway reads the events' stream
    versions only (what a consistency token names), never their data; the worker reads the API
    keys' names and scopes (a vouched-for issuer must be a live key), never the secrets' digests;
    the relay counts parked documents (its metrics) and reads nothing else of them."""
    settings, prefix, made = provisioned
    url = {r: pg_as(settings, f"{prefix}_{r}", made[f"{prefix}_{r}"]) for r in ROLES}
    assert refused_sql(url["worker"], "UPDATE events SET data = '{}'")
    assert refused_sql(url["worker"], "DELETE FROM events")
    for role in ROLES:
        assert refused_sql(url[role], "CREATE TEMP TABLE scratch (x int)"), role
    assert not refused_sql(url["gateway"], "SELECT stream_id, max(version) FROM events WHERE position IN (1) "
                                           "GROUP BY stream_id")
    for column in ("data", "metadata", "type", "event_id"):
        assert refused_sql(url["gateway"], f"SELECT {column} FROM events"), column
    assert not refused_sql(url["worker"], "SELECT name, commands FROM api_keys WHERE revoked_at IS NULL")
    assert refused_sql(url["worker"], "SELECT secret_sha256 FROM api_keys")
    assert refused_sql(url["worker"], "SELECT * FROM api_keys")
    assert not refused_sql(url["relay"], "SELECT read_model, count(*) FROM parked_documents GROUP BY read_model")
    assert refused_sql(url["relay"], "SELECT error FROM parked_documents")
