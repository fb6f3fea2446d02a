"""The conformance check: a request as cqrskit sent it (``tests/es_front.Recorded``) against the
official Elasticsearch specification, the compiled ``schema.json`` that Elastic's npm package
``@elastic/request-converter`` ships (installed by ``.ci/run`` under ``var/es-spec/<version>``,
never copied into the repository), plus the rules the types cannot express.

``Specification.check`` answers the violations of one request: the endpoint (method and path)
must exist, every query parameter must be one the endpoint declares, and the body must match the
request's body type: every property known, required ones present, enums, literals, arrays,
dictionaries, unions (a tagged union by its tag), container variants, shortcut properties and
additional-property behaviours as the specification describes them. Generic parameters (a
document's own fields) and user-defined values accept anything.

``house_rules`` adds what the types cannot say: sorts only on keyword, numeric and date fields
(looked up in the mappings cqrskit created), with ``nested`` for a path under a nested field; no
``from`` + ``size`` beyond ``index.max_result_window`` (10,000); no scripts; no ``query_string``;
never a ``compatible-with`` media type.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
VERSIONS = ("8.15.3", "9.5.0")  # the lowest 8.x and the highest 9.x the npm registry has; .ci/run pins the same
SPEC_DIR = Path(os.environ.get("ES_SPEC_DIR", PROJECT / "var" / "es-spec"))
PACKAGE = "@elastic/request-converter"
MAX_RESULT_WINDOW = 10_000
SORTABLE = {"keyword", "long", "integer", "short", "byte", "double", "float", "half_float", "scaled_float",
            "unsigned_long", "date", "date_nanos", "boolean"}
Ref = tuple[str, str]


def schema_path(version: str) -> Path:
    return SPEC_DIR / version / "node_modules" / "@elastic" / "request-converter" / "dist" / "schema.json"


def install(version: str) -> Path:
    """The specification of ``version``, installed from the npm registry when it is not yet
    (as .ci/run does). Raises FileNotFoundError without npm."""
    path = schema_path(version)
    if not path.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise FileNotFoundError("npm is not installed: the Elasticsearch specification cannot be fetched")
        (SPEC_DIR / version).mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "install", "--prefix", str(SPEC_DIR / version), "--no-save", "--ignore-scripts",
                        "--no-audit", "--no-fund", f"{PACKAGE}@{version}"], check=True, capture_output=True,
                       timeout=600)
    return path


@dataclass
class Violation:
    request: str
    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.request}: {self.where}: {self.problem}"


class Specification:
    """One version's compiled specification (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        model = json.loads(path.read_text())
        self.version = model.get("_info", {}).get("version") or path.parts[-6]
        self.types: dict[Ref, dict[str, Any]] = {(t["name"]["namespace"], t["name"]["name"]): t for t in model["types"]}
        self.routes: list[tuple[re.Pattern[str], int, str, dict[str, Any]]] = []
        for endpoint in model["endpoints"]:
            for url in endpoint["urls"]:
                literal = sum(1 for part in url["path"].split("/") if part and not part.startswith("{"))
                pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", url["path"]) + "$")
                for method in url["methods"]:
                    self.routes.append((pattern, literal, method, endpoint))
        self.routes.sort(key=lambda r: -r[1])

    def endpoint(self, method: str, path: str) -> dict[str, Any] | None:
        for pattern, _literal, verb, endpoint in self.routes:
            if verb == method and pattern.match(path):
                return endpoint
        return None

    # -- one request -------------------------------------------------------------------------
    def check(self, method: str, path: str, query: dict[str, str], body: Any) -> list[str]:
        """The violations of one request (empty: it conforms)."""
        endpoint = self.endpoint(method, path.rstrip("/") or "/")
        if endpoint is None:
            return [f"no endpoint of Elasticsearch {self.version} answers {method} {path}"]
        request = self.types[(endpoint["request"]["namespace"], endpoint["request"]["name"])]
        problems = self._query(request, query)
        spec_body = request.get("body", {"kind": "no_body"})
        if spec_body["kind"] == "no_body":
            if body not in (None, b"", {}):
                problems.append(f"{endpoint['name']} takes no body")
        elif body is not None:
            if endpoint["name"] == "bulk":
                problems += self._bulk(body)
            elif spec_body["kind"] == "properties":
                problems += self._object(body, spec_body["properties"], [], "body", set())
            else:
                problems += self.value(body, spec_body["value"], "body")
        return [f"{endpoint['name']}: {p}" for p in problems]

    def _query(self, request: dict[str, Any], query: dict[str, str]) -> list[str]:
        known = {p["name"] for p in request.get("query", [])}
        for behavior in request.get("attachedBehaviors", []):
            for ref, t in self.types.items():
                if ref[1] == behavior and t["kind"] == "interface":
                    known |= {p["name"] for p in t.get("properties", [])}
        return [f"unknown query parameter {name!r}" for name in query if name not in known]

    def _bulk(self, lines: list[Any]) -> list[str]:
        problems, at = [], 0
        operation = ("_global.bulk", "OperationContainer")
        while at < len(lines):
            problems += self.value(lines[at], {"kind": "instance_of", "type": {"namespace": operation[0],
                                                                               "name": operation[1]}}, f"line {at}")
            action = next(iter(lines[at]), "index") if isinstance(lines[at], dict) else "index"
            at += 1 if action == "delete" else 2
        return problems

    # -- values against types ----------------------------------------------------------------
    def value(self, value: Any, spec: dict[str, Any], where: str) -> list[str]:
        kind = spec["kind"]
        if kind == "instance_of":
            return self._instance(value, (spec["type"]["namespace"], spec["type"]["name"]), where)
        if kind == "array_of":
            if not isinstance(value, list):
                return [f"{where}: expected an array, got {_show(value)}"]
            return [p for n, item in enumerate(value) for p in self.value(item, spec["value"], f"{where}[{n}]")]
        if kind == "union_of":
            return self._union(value, spec["items"], where)
        if kind == "dictionary_of":
            if not isinstance(value, dict):
                return [f"{where}: expected an object, got {_show(value)}"]
            if spec.get("singleKey") and len(value) != 1:
                return [f"{where}: expected exactly one key, got {sorted(value)}"]
            return [p for k, v in value.items() for p in self.value(v, spec["value"], f"{where}.{k}")]
        if kind == "literal_value":
            return [] if value == spec["value"] else [f"{where}: expected {spec['value']!r}, got {_show(value)}"]
        return []  # user_defined_value

    def _instance(self, value: Any, ref: Ref, where: str) -> list[str]:
        if ref[0] == "_builtins":
            return _builtin(value, ref[1], where)
        t = self.types.get(ref)
        if t is None:
            return []  # a generic parameter (a document's own fields): anything
        if t["kind"] == "type_alias":
            if t.get("variants", {}).get("kind") == "internal_tag" and isinstance(value, dict):
                return self._tagged(value, t, where)
            return self.value(value, t["type"], where)
        if t["kind"] == "enum":
            names = {m["name"] for m in t["members"]} | {a for m in t["members"] for a in m.get("aliases", [])}
            if isinstance(value, bool) and str(value).lower() in names:
                return []
            return [] if value in names or t.get("isOpen") else [f"{where}: {_show(value)} is not one of {sorted(names)}"]
        if t.get("shortcutProperty") and not isinstance(value, dict):
            short = next(p for p in self._properties(t) if p["name"] == t["shortcutProperty"])
            return self.value(value, short["type"], where)
        if not isinstance(value, dict):
            return [f"{where}: expected {ref[1]} (an object), got {_show(value)}"]
        extra = next((b["generics"][1] for b in self._behaviors(t) if b["type"]["name"] in
                      ("AdditionalProperty", "AdditionalProperties")), None)
        return self._object(value, self._properties(t), [extra] if extra else [], where,
                            {"container"} if t.get("variants", {}).get("kind") == "container" else set())

    def _tagged(self, value: dict[str, Any], t: dict[str, Any], where: str) -> list[str]:
        tag = t["variants"]["tag"]
        wanted = value.get(tag, t["variants"].get("defaultTag"))
        for item in t["type"].get("items", []):
            member = self.types.get((item["type"]["namespace"], item["type"]["name"]), {})
            literal = next((p["type"].get("value") for p in self._properties(member) if p["name"] == tag), None)
            if literal == wanted:
                return self._instance(value, (item["type"]["namespace"], item["type"]["name"]), where)
        return [] if t["variants"].get("nonExhaustive") else [f"{where}: unknown {tag} {wanted!r}"]

    def _union(self, value: Any, items: list[dict[str, Any]], where: str) -> list[str]:
        best: list[str] | None = None
        for item in items:
            problems = self.value(value, item, where)
            if not problems:
                return []
            if best is None or len(problems) < len(best):
                best = problems
        return best or [f"{where}: matches no member of its union"]

    def _object(self, value: Any, properties: list[dict[str, Any]], extra: list[dict[str, Any]], where: str,
                flags: set[str]) -> list[str]:
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {_show(value)}"]
        by_name = {name: p for p in properties for name in (p["name"], *p.get("aliases", []))}
        problems = [f"{where}: missing required {p['name']!r}" for p in properties
                    if p.get("required") and not ({p["name"], *p.get("aliases", [])} & set(value))]
        for key, item in value.items():
            if key in by_name:
                problems += self.value(item, by_name[key]["type"], f"{where}.{key}")
            elif extra:
                problems += self.value(item, extra[0], f"{where}.{key}")
            else:
                problems.append(f"{where}: unknown property {key!r}")
        if "container" in flags:
            variants = [k for k in value if k in by_name and not by_name[k].get("containerProperty")]
            if len(variants) > 1:
                problems.append(f"{where}: a container holds one variant, got {variants}")
        return problems

    def _properties(self, t: dict[str, Any]) -> list[dict[str, Any]]:
        found = list(t.get("properties", []))
        parent = t.get("inherits")
        if parent:
            found += self._properties(self.types.get((parent["type"]["namespace"], parent["type"]["name"]), {}))
        return found

    def _behaviors(self, t: dict[str, Any]) -> list[dict[str, Any]]:
        found = list(t.get("behaviors", []))
        parent = t.get("inherits")
        if parent:
            found += self._behaviors(self.types.get((parent["type"]["namespace"], parent["type"]["name"]), {}))
        return found


def _builtin(value: Any, name: str, where: str) -> list[str]:
    ok = {"string": isinstance(value, str), "boolean": isinstance(value, bool), "null": value is None,
          "number": isinstance(value, (int, float)) and not isinstance(value, bool)}.get(name, True)
    return [] if ok else [f"{where}: expected a {name}, got {_show(value)}"]


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# -- the rules the types cannot say -------------------------------------------------------------
class Mappings:
    """Field types per index and alias, learnt from the index creations cqrskit sent."""

    def __init__(self) -> None:
        self.fields: dict[str, dict[str, str]] = {}

    def learn(self, method: str, path: str, body: Any) -> None:
        parts = [p for p in path.split("/") if p]
        if method == "PUT" and len(parts) == 1 and isinstance(body, dict) and "mappings" in body:
            fields = _field_types(body["mappings"].get("properties", {}))
            for name in (parts[0], *body.get("aliases", {})):
                self.fields[name] = fields

    def of(self, path: str) -> dict[str, str] | None:
        parts = [p for p in path.split("/") if p]
        return self.fields.get(parts[0]) if parts else None


def _field_types(properties: dict[str, Any], prefix: str = "") -> dict[str, str]:
    found: dict[str, str] = {}
    for name, spec in properties.items():
        found[prefix + name] = spec.get("type", "object")
        found |= _field_types(spec.get("properties", {}), f"{prefix}{name}.")
        found |= _field_types(spec.get("fields", {}), f"{prefix}{name}.")
    return found


def house_rules(method: str, path: str, query: dict[str, str], headers: dict[str, str], body: Any,
                mappings: Mappings) -> list[str]:
    problems = [f"header {name}: {value} (a compatible-with media type)" for name, value in headers.items()
                if name in ("accept", "content-type") and "compatible-with" in value]
    text = json.dumps(body) if body is not None else ""
    if '"script"' in text or '"_script"' in text or '"script_fields"' in text:
        problems.append("a script (osmem runs none; keep to standard queries)")
    if '"query_string"' in text or "q" in query:
        problems.append("query_string (user input never becomes query syntax)")
    if isinstance(body, dict) and path.rstrip("/").endswith("/_search"):
        start, size = body.get("from", query.get("from", 0)), body.get("size", query.get("size", 10))
        window = int(start) + int(size) if str(start).isdigit() and str(size).isdigit() else 0
        if window > MAX_RESULT_WINDOW:
            problems.append(f"from + size = {window} is beyond index.max_result_window ({MAX_RESULT_WINDOW})")
        problems += _sorts(body.get("sort", []), mappings.of(path))
    return problems


def _sorts(sort: Any, fields: dict[str, str] | None) -> list[str]:
    problems = []
    for entry in sort if isinstance(sort, list) else [sort]:
        name, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        if name in ("_score", "_doc") or fields is None:
            continue
        kind = fields.get(name)
        if kind not in SORTABLE:
            problems.append(f"sort on {name!r}, a {kind or 'unmapped'} field (sorts need keyword, numeric or date)")
        nested = [p for p in _parents(name) if fields.get(p) == "nested"]
        if nested and not (isinstance(options, dict) and options.get("nested", {}).get("path") == nested[0]):
            problems.append(f"sort on {name!r} under the nested field {nested[0]!r} without a nested context")
    return problems


def _parents(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def conformance(records: list[Any], specs: list[Specification]) -> list[Violation]:
    """Every violation of ``records`` (``es_front.Recorded``) against each specification and the rules."""
    mappings, found = Mappings(), []
    for record in records:
        body = record.json_body()
        mappings.learn(record.method, record.path, body)
        label = f"{record.method} {record.path}"
        for spec in specs:
            found += [Violation(label, f"Elasticsearch {spec.version}", p)
                      for p in spec.check(record.method, record.path, record.query, body)]
        found += [Violation(label, "rule", p)
                  for p in house_rules(record.method, record.path, record.query, record.headers, body, mappings)]
    return found
