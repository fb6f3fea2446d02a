"""The PostgreSQL statements of the event store's hot path (``cqrskit.infra.pg_store``), as text:
psycopg prepares each on the server after a few executions, so none is parsed or planned per
command.

``WRITE`` is one command's whole write, in data-modifying CTEs: the outcome (its primary key is
the dedup guard; every other write is gated on its insert, so a duplicate writes nothing), the
new and the moved streams, the events (positions drawn in the statement, so that the outcome can
carry them), and the unique claims given up and taken. Everything to write, the outcome, the
events' metadata and the time included, travels as ONE JSON document, the statement's only
parameter: the client adapts one string, not dozens of values.
"""

LOAD = "SELECT version, state::text, state_version FROM streams WHERE stream_id = %s"
LOAD_MANY = "SELECT stream_id, version, state::text, state_version FROM streams WHERE stream_id = ANY(%s)"
OWNER = "SELECT owner FROM unique_claims WHERE scope = %s AND key = %s"
OWNERS = ("SELECT c.scope, c.key, c.owner FROM unnest(%s::text[], %s::text[]) AS w(scope, key) "
          "JOIN unique_claims AS c ON c.scope = w.scope AND c.key = w.key")
LOCK = "SELECT pg_advisory_xact_lock(%s)"
TRY_LOCK = "SELECT pg_try_advisory_xact_lock(%s)"
LOCKS = "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k"  # waits for each, in the array's order
TRY_LOCKS = "SELECT k, pg_try_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k"
READ_EVENTS = ("SELECT type, schema_version, data FROM events WHERE stream_id = %s AND version > %s "
               "ORDER BY version")
OUTCOME_COLUMNS = ("command_id", "status", "type", "aggregate_id", "reason", "errors", "aggregate_version",
                   "correlation_id", "causation_id", "recorded_at")
INSERT_OUTCOME = (
    "INSERT INTO command_outcomes (command_id, status, type, aggregate_id, reason, errors, aggregate_version, "
    "correlation_id, causation_id, recorded_at, positions) "
    "VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, '[]'::jsonb) "
    "ON CONFLICT (command_id) DO NOTHING RETURNING 1"
)
SELECT_OUTCOME = "SELECT * FROM command_outcomes WHERE command_id = %s"

# One command's whole write. ``go`` gates every write on the outcome's insert (no outcome given:
# always true), so a duplicate writes nothing. Positions are drawn first, so that the outcome
# can carry them.
WRITE = """
WITH d AS MATERIALIZED (SELECT %s::jsonb AS doc),
t AS MATERIALIZED (SELECT (d.doc ->> 'now')::timestamptz AS now, d.doc -> 'meta' AS meta FROM d),
p AS MATERIALIZED ({positions}),
{outcome},
sn AS (
    INSERT INTO streams (stream_id, stream_type, aggregate_id, version, state, state_version, updated_at)
    SELECT u.sid, u.t, u.aid, u.v, u.state, u.sv, t.now
    FROM d, t, jsonb_to_recordset(d.doc -> 'n') AS u(sid text, t text, aid text, v int, state jsonb, sv int)
    WHERE (SELECT ok FROM go)
    RETURNING 1),
sm AS (
    UPDATE streams AS s SET version = u.v, state = u.state, state_version = u.sv, updated_at = (SELECT now FROM t)
    FROM d, jsonb_to_recordset(d.doc -> 'm') AS u(sid text, f int, v int, state jsonb, sv int)
    WHERE s.stream_id = u.sid AND s.version = u.f AND (SELECT ok FROM go)
    RETURNING 1),
ev AS (
    INSERT INTO events (position, event_id, stream_id, stream_type, version, type, schema_version, data,
                        metadata, recorded_at)
    SELECT p.pos, e.id, e.sid, e.t, e.v, e.et, e.sv, e.data, t.meta, t.now
    FROM d, t, jsonb_array_elements(d.doc -> 'e') WITH ORDINALITY AS a(value, n)
    CROSS JOIN LATERAL jsonb_to_record(a.value) AS e(id text, sid text, t text, v int, et text, sv int, data jsonb)
    JOIN p ON p.n = a.n
    WHERE (SELECT ok FROM go)
    RETURNING 1),
cd AS (
    DELETE FROM unique_claims AS c
    USING d, jsonb_to_recordset(d.doc -> 'r') AS u(s text, k text, o text)
    WHERE c.scope = u.s AND c.key = u.k AND c.owner = u.o AND (SELECT ok FROM go)
    RETURNING 1),
ci AS (
    INSERT INTO unique_claims (scope, key, owner)
    SELECT u.s, u.k, u.o FROM d, jsonb_to_recordset(d.doc -> 'c') AS u(s text, k text, o text)
    WHERE (SELECT ok FROM go)
    RETURNING 1)
SELECT (SELECT ok FROM go), (SELECT count(*) FROM sm), (SELECT count(*) FROM sn),
       (SELECT array_agg(pos ORDER BY n) FROM p)
"""
WITH_OUTCOME = """o AS (
    INSERT INTO command_outcomes (command_id, status, type, aggregate_id, reason, errors, aggregate_version,
                                  correlation_id, causation_id, recorded_at, positions)
    SELECT r.id, r.status, r.type, r.aid, r.reason, r.errors, r.version, r.corr, r.cause, r.at,
           (SELECT coalesce(jsonb_agg(pos ORDER BY n), '[]'::jsonb) FROM p)
    FROM d, jsonb_to_record(d.doc -> 'o') AS r(id text, status text, type text, aid text, reason text, errors jsonb,
                                               version int, corr text, cause text, at timestamptz)
    ON CONFLICT (command_id) DO NOTHING
    RETURNING 1),
go AS (SELECT EXISTS (SELECT FROM o) AS ok)"""
WITHOUT_OUTCOME = "go AS (SELECT true AS ok)"
