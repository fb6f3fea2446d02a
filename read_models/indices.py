"""Physical indices and aliases of the read models.

Each read model ``m`` is served by the alias ``<prefix>-m`` over one physical index
``<prefix>-m-v<generation>``; during a rebuild a second alias ``<prefix>-m-next`` points at the
index being built. Indexers write only through aliases with ``require_alias``: a write can
never auto-create an index with guessed mappings (after a search server lost its data, writes
fail and wait until ``cqrskit setup`` or ``rebuild`` recreates the index).
The write store's ``read_model_indices`` table records which physical index plays which role.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from elasticsearch import ApiError, Elasticsearch
from sqlalchemy import Connection, Engine

from cqrskit.infra.schema import read_model_indices
from cqrskit.read_models.model import SETTINGS, ReadModel

LIVE, BUILDING = "live", "building"


def alias(prefix: str, model: str) -> str:
    return f"{prefix}-{model}"


def next_alias(prefix: str, model: str) -> str:
    return f"{prefix}-{model}-next"


def physical(prefix: str, model: str, generation: int) -> str:
    return f"{prefix}-{model}-v{generation}"


def roles(engine: Engine, model: str) -> dict[str, str]:
    """index name -> role, for one read model."""
    query = sa.select(read_model_indices.c.index_name, read_model_indices.c.role).where(
        read_model_indices.c.read_model == model)
    with engine.connect() as conn:
        return dict(conn.execute(query).all())


def write_targets(engine: Engine | Connection, prefix: str, models: list[str]) -> dict[str, list[str]]:
    """Aliases each model's documents must be written to now: live, plus next while rebuilding.
    Given a connection, read in its transaction (an indexer's snapshot, before it reads anything else)."""
    query = sa.select(read_model_indices.c.read_model, read_model_indices.c.role)
    if isinstance(engine, Connection):
        rows = engine.execute(query).all()
    else:
        with engine.connect() as conn:
            rows = conn.execute(query).all()
    building = {m for m, role in rows if role == BUILDING}
    return {m: [alias(prefix, m)] + ([next_alias(prefix, m)] if m in building else []) for m in models}


def ensure(es: Elasticsearch, engine: Engine, prefix: str, model: ReadModel, *, replicas: int | None = None) -> str | None:
    """Create the first physical index and its alias if the alias is missing (idempotent, and
    safe when two ``setup`` runs race: the one that loses the creation finds it made). Returns
    the index created, or None when the alias already existed."""
    name = alias(prefix, model.name)
    if es.indices.exists_alias(name=name):
        return None
    index = physical(prefix, model.name, _next_generation(engine, model.name))
    try:
        create_index(es, index, model, {name: {}}, replicas=replicas)
    except ApiError as exc:
        if exc.meta.status == 400 and error_type(exc) == "resource_already_exists_exception":
            return None  # a concurrent setup made it, with its alias, in one request
        raise
    _record(engine, model.name, {index: LIVE}, replace=True)
    return index


def create_index(es: Elasticsearch, index: str, model: ReadModel, aliases: dict,  # type: ignore[type-arg]
                 *, replicas: int | None = None) -> None:
    """The index with the model's mappings, and ``aliases``, in one request. ``replicas``:
    ``number_of_replicas`` (default: that of ``model.SETTINGS``, 0)."""
    settings = SETTINGS if replicas is None else {**SETTINGS, "number_of_replicas": replicas}
    meta = {**model.mappings.get("_meta", {}), "cqrskit": {"projection_version": projection_version(model)}}
    es.indices.create(index=index, mappings={**model.mappings, "_meta": meta}, settings=settings, aliases=aliases)


def projection_version(model: ReadModel) -> int:
    """The model's ``projection_version`` (default 1). Raises ValueError unless it is an int >= 1."""
    version = getattr(model, "projection_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"read model {model.name!r}: projection_version must be an int >= 1, got {version!r}")
    return version


def error_type(exc: ApiError) -> str | None:
    """The ``error.type`` of an Elasticsearch error body (``resource_already_exists_exception``...)."""
    body = exc.body
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("type") if isinstance(error, dict) else None


def mapping_drift(es: Elasticsearch, prefix: str, model: ReadModel) -> list[str]:
    """How the live index's mapping falls short of what ``model`` declares: each declared field
    it lacks, or holds with another type (a field added to a read model: every document with it
    would be refused, ``strict_dynamic_mapping_exception``). Empty: no drift, or no live index.
    Fields the index has and the model no longer declares do no harm and are not reported."""
    live = es.indices.get_mapping(index=alias(prefix, model.name), ignore_unavailable=True, allow_no_indices=True)
    if not live:
        return []
    declared = field_types(model.mappings.get("properties", {}))
    found: list[str] = []
    for index in sorted(live):
        have = field_types(live[index]["mappings"].get("properties", {}))
        for path, kind in declared.items():
            if path not in have:
                found.append(f"field {path!r} ({kind}) missing")
            elif have[path] != kind:
                found.append(f"field {path!r} is {have[path]}, declared {kind}")
    return sorted(set(found))


def projection_drift(es: Elasticsearch, prefix: str, model: ReadModel) -> list[str]:
    """The live index was built by another ``projection_version`` than ``model`` declares (its
    documents are valid but computed the old way; a rebuild computes them anew). An index made
    before versions were recorded counts as version 1. Empty: same version, or no live index."""
    live = es.indices.get_mapping(index=alias(prefix, model.name), ignore_unavailable=True, allow_no_indices=True)
    declared = projection_version(model)
    built = {m["mappings"].get("_meta", {}).get("cqrskit", {}).get("projection_version", 1) for m in live.values()}
    return [f"built by projection_version {v}, declared {declared}" for v in sorted(built) if v != declared]


def drift_line(prefix: str, model: str, drift: list[str]) -> str:
    """The one line that names a drifted read model and its fix."""
    more = f" (and {len(drift) - 2} more)" if len(drift) > 2 else ""
    return (f"read model {model}: the live index {alias(prefix, model)!r} has an older mapping than the app declares "
            f"({'; '.join(drift[:2])}{more}); run cqrskit rebuild {model}")


def field_types(properties: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Every field path of a mapping (sub-fields as ``name.keyword``) with its type; an object
    with properties is ``object`` whether or not the mapping says so (Elasticsearch leaves it out)."""
    found: dict[str, str] = {}
    for name, spec in properties.items():
        path = prefix + name
        found[path] = spec.get("type", "object" if "properties" in spec else "object")
        found |= field_types(spec.get("properties", {}), path + ".")
        found |= field_types(spec.get("fields", {}), path + ".")
    return found


def begin_build(es: Elasticsearch, engine: Engine, prefix: str, model: ReadModel, *, replicas: int | None = None) -> str:
    """A new physical index behind the ``-next`` alias, recorded as building: from now on the
    indexers write every document they compute to it too (G9)."""
    abandon_build(es, engine, prefix, model.name)
    index = physical(prefix, model.name, _next_generation(engine, model.name))
    create_index(es, index, model, {next_alias(prefix, model.name): {}}, replicas=replicas)
    _record(engine, model.name, {index: BUILDING})
    return index


def finish_build(es: Elasticsearch, engine: Engine, prefix: str, model: str, index: str) -> list[str]:
    """Swap the live alias to ``index`` in one atomic alias update that reads nothing first (the
    alias leaves every generation of the model, whichever holds it at that instant, and joins
    ``index``), then delete the generations no alias points at any more. Returns the deleted names."""
    live = alias(prefix, model)
    es.indices.update_aliases(actions=[
        {"remove": {"index": f"{live}-v*", "alias": live, "must_exist": False}},
        {"add": {"index": index, "alias": live}},
        {"remove": {"index": index, "alias": next_alias(prefix, model)}}])
    _record(engine, model, {index: LIVE}, replace=True)
    generations = es.indices.get_alias(index=f"{live}-v*", ignore_unavailable=True, allow_no_indices=True)
    old = sorted(name for name, entry in generations.items() if name != index and not entry.get("aliases")
                 and name.rsplit("-v", 1)[-1].isdigit())
    for name in old:
        es.indices.delete(index=name, ignore_unavailable=True)
    return old


def abandon_build(es: Elasticsearch, engine: Engine, prefix: str, model: str) -> None:
    """Drop a half-done build (a rebuild that died), if any."""
    for index, role in roles(engine, model).items():
        if role == BUILDING:
            es.indices.delete(index=index, ignore_unavailable=True)
            with engine.begin() as conn:
                conn.execute(read_model_indices.delete().where(read_model_indices.c.index_name == index))


def _next_generation(engine: Engine, model: str) -> int:
    names = roles(engine, model)
    generations = [int(name.rsplit("-v", 1)[1]) for name in names if name.rsplit("-v", 1)[-1].isdigit()]
    return max(generations, default=0) + 1


def _record(engine: Engine, model: str, entries: dict[str, str], replace: bool = False) -> None:
    with engine.begin() as conn:
        if replace:
            conn.execute(read_model_indices.delete().where(read_model_indices.c.read_model == model))
        now = datetime.now(UTC)
        for index, role in entries.items():
            conn.execute(read_model_indices.insert().values(read_model=model, index_name=index, role=role, created_at=now))
