"""A front of the suite's own in front of osmem, standing in for what osmem cannot show of a real
Elasticsearch 8/9 cluster:

- **TLS**: HTTPS with a certificate signed by a self-signed CA made for the test (``make_ca``);
- **security**: API keys (``Authorization: ApiKey <base64 id:key>``) and basic users, each under a
  role given as the definitions ``cqrskit setup --privileges`` prints; what a role may not do is
  answered as Elasticsearch's security does: 401 ``security_exception`` for bad credentials, 403
  ``security_exception`` naming the action and the privileges that grant it (per item inside a
  bulk request, as Elasticsearch does);
- **faults**: replayed error bodies (a bulk refused whole with 429, 413, 503...) for the next
  requests that match;
- **recording**: every request, as sent, for the conformance check (``tests/es_spec.py``).

The authorization model follows Elasticsearch's privilege names: the index privileges ``all``,
``manage`` (which holds ``view_index_metadata``, ``create_index``, ``delete_index``,
``manage_aliases``...), ``read``, ``write`` (``index`` and ``delete``), ``index`` and the cluster's
``monitor``. A request this front cannot place is refused unless the role holds the cluster's ``all``.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import re
import secrets
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import httpx

IMPLIED = {
    "all": {"all", "manage", "read", "write", "index", "delete", "view_index_metadata", "create_index", "delete_index",
            "manage_aliases", "maintenance", "monitor"},
    "manage": {"manage", "view_index_metadata", "create_index", "delete_index", "manage_aliases", "maintenance",
               "monitor"},
    "write": {"write", "index", "delete"},
}
ACTIONS = {"read": "indices:data/read/search", "index": "indices:data/write/index",
           "view_index_metadata": "indices:admin/get", "create_index": "indices:admin/create",
           "delete_index": "indices:admin/delete", "manage_aliases": "indices:admin/aliases",
           "maintenance": "indices:admin/refresh", "delete": "indices:data/write/delete"}
GRANTED_BY = {"read": "read,all", "index": "create,index,write,all", "view_index_metadata": "view_index_metadata,manage,all",
              "create_index": "create_index,manage,all", "delete_index": "delete_index,manage,all",
              "manage_aliases": "manage,all", "maintenance": "maintenance,manage,all", "delete": "delete,write,all"}


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA's PEM (what CQRSKIT_ELASTICSEARCH_CA_CERTS names)
    cert: Path
    key: Path
    fingerprint: str  # SHA-256 hex of the server's certificate (CQRSKIT_ELASTICSEARCH_SSL_FINGERPRINT)


def make_ca(directory: Path) -> Certificates:
    """A self-signed CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    d = directory
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=cqrskit test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "node.key", "-out", "node.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "ext.cnf", "-out", "node.pem")
    digest = run("x509", "-in", "node.pem", "-noout", "-fingerprint", "-sha256").stdout.decode()
    return Certificates(d / "ca.pem", d / "node.pem", d / "node.key", digest.split("=", 1)[1].strip().replace(":", ""))


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    principal: str | None
    status: int = 0

    def json_body(self) -> Any:
        """The body: one JSON value, or a list of them for NDJSON (bulk, msearch); None when empty."""
        if not self.body:
            return None
        if self.path.endswith(("/_bulk", "/_msearch")):
            return [json.loads(line) for line in self.body.splitlines() if line.strip()]
        return json.loads(self.body)


@dataclass
class Fault:
    matches: Callable[[str, str], bool]  # (method, path)
    status: int
    body: dict[str, Any]
    times: int
    headers: dict[str, str] = field(default_factory=dict)


class EsFront:
    """See the module docstring. ``roles``: role name -> definition (None: security off, every
    request forwarded). Use as a context manager; ``url`` is where to connect."""

    def __init__(self, upstream: str, *, certificates: Certificates | None = None,
                 roles: dict[str, dict[str, Any]] | None = None, major: int | None = None) -> None:
        self.upstream, self.roles, self.major = upstream.rstrip("/"), roles, major
        self.keys: dict[str, tuple[str, str, str]] = {}  # id -> (secret, role, name)
        self.users: dict[str, tuple[str, str]] = {}  # user -> (password, role)
        self.records: list[Recorded] = []
        self.refused: list[tuple[str | None, str, str, str]] = []  # (principal, method, path, reason)
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=120)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        scheme = "http"
        if certificates is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certificates.cert, certificates.key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    # -- credentials and faults -------------------------------------------------------------
    def api_key(self, role: str, name: str | None = None) -> str:
        """A new API key under ``role``, in the encoded form Elasticsearch's create-API-key call returns."""
        key_id, secret = secrets.token_urlsafe(15), secrets.token_urlsafe(16)
        self.keys[key_id] = (secret, role, name or role)
        return base64.b64encode(f"{key_id}:{secret}".encode()).decode()

    def user(self, name: str, password: str, role: str) -> None:
        self.users[name] = (password, role)

    def fail(self, status: int, body: dict[str, Any], *, times: int = 1, path: str = "*", method: str = "*",
             headers: dict[str, str] | None = None) -> Fault:
        """Answer the next ``times`` requests matching ``method`` and ``path`` (fnmatch) with this error."""
        fault = Fault(lambda m, p: fnmatch.fnmatch(m, method) and fnmatch.fnmatch(p, path), status, body, times,
                      headers or {})
        with self._lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.matches(method, path):
                    fault.times -= 1
                    return fault
        return None

    def media_type_error(self, headers: dict[str, str]) -> dict[str, Any] | None:
        """As a cluster of major ``self.major`` answers a ``compatible-with`` it does not speak (an
        8.x cluster and a 9.x client's default headers)."""
        for name in ("accept", "content-type"):
            found = re.search(r"compatible-with=(\d+)", headers.get(name, ""))
            if self.major is not None and found and int(found[1]) not in (self.major, self.major - 1):
                reason = (f"{'Accept' if name == 'accept' else 'Content-Type'} version must be either version "
                          f"{self.major} or {self.major - 1}, but found {found[1]}. "
                          f"{'Accept' if name == 'accept' else 'Content-Type'}={headers[name]}")
                cause = {"type": "media_type_header_exception", "reason": "Invalid media-type value on headers "
                         f"[{name.title()}]"}
                return {"error": {"root_cause": [cause], "type": "media_type_header_exception",
                                  "reason": cause["reason"], "caused_by": {"type": "status_exception",
                                                                           "reason": reason}}, "status": 400}
        return None

    # -- security ----------------------------------------------------------------------------
    def authenticate(self, header: str | None) -> tuple[str | None, str | None]:
        """(principal, role); (None, reason) when the credentials are missing or wrong."""
        if self.roles is None:
            return "anonymous", None
        scheme, _, value = (header or "").partition(" ")
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            decoded = ""
        ident, _, secret = decoded.partition(":")
        if scheme == "ApiKey" and ident in self.keys and secrets.compare_digest(self.keys[ident][0], secret):
            return f"API key id [{ident}] of user [{self.keys[ident][2]}]", self.keys[ident][1]
        if scheme == "Basic" and ident in self.users and secrets.compare_digest(self.users[ident][0], secret):
            return f"user [{ident}]", self.users[ident][1]
        return None, ("missing authentication credentials for REST request" if not header else
                      "unable to authenticate with provided credentials and anonymous access is not allowed "
                      "for this request")

    def holds(self, role: str, need: str, index: str) -> bool:
        definition = self.roles[role] if self.roles is not None else {"cluster": ["all"], "indices": []}
        if need == "monitor" and index == "":
            return bool({"monitor", "manage", "all"} & set(definition.get("cluster", [])))
        if "all" in definition.get("cluster", []):
            return True
        for entry in definition.get("indices", []):
            privileges = set().union(*({p} | IMPLIED.get(p, set()) for p in entry["privileges"]))
            if need in privileges and any(fnmatch.fnmatchcase(index, n) for n in entry["names"]):
                return True
        return False

    def __enter__(self) -> EsFront:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._client.close()


def needs(method: str, path: str, query: dict[str, str], body: bytes) -> list[tuple[str, str]] | None:
    """The (privilege, index) pairs a request needs ("" index: a cluster privilege), or None when
    this front cannot place it. Bulk requests are authorized per item (``bulk_items``)."""
    parts = [unquote(p) for p in path.strip("/").split("/") if p]
    if not parts:
        return [("monitor", "")] if method in ("GET", "HEAD") else None
    if parts[0] == "_cluster" and parts[1:2] == ["health"]:
        return [("monitor", "")]
    if parts[0] == "_alias" and len(parts) == 2 and method in ("GET", "HEAD"):
        return [("view_index_metadata", name) for name in parts[1].split(",")]
    if parts[0] == "_aliases" and method == "POST":
        return _alias_actions(json.loads(body or b"{}"))
    if parts[0] in ("_mget", "_search") and parts[0] == "_mget" and method in ("GET", "POST"):
        return [("read", d.get("_index", "")) for d in json.loads(body or b"{}").get("docs", [])]
    if parts[0] == "_pit" and method == "DELETE" or parts[:2] == ["_search", "scroll"]:
        return []  # closing a point in time or a scroll: any authenticated user (its id is the capability)
    if parts[0].startswith("_"):
        return None
    indices, rest = parts[0].split(","), parts[1:]
    return _index_needs(method, rest, indices, body)


def _index_needs(method: str, rest: list[str], indices: list[str], body: bytes) -> list[tuple[str, str]] | None:
    need: str | None = None
    if not rest:
        need = {"GET": "view_index_metadata", "HEAD": "view_index_metadata", "PUT": "create_index",
                "DELETE": "delete_index"}.get(method)
        if method == "PUT":
            aliases = json.loads(body or b"{}").get("aliases", {})
            return [("create_index", i) for i in indices] + [("manage_aliases", a) for a in aliases]
    elif rest[0] in ("_search", "_count", "_mget", "_pit", "_source") or (rest[0] == "_doc" and method in ("GET", "HEAD")):
        need = "read"
    elif rest[0] in ("_alias", "_aliases", "_mapping", "_mappings", "_settings") and method in ("GET", "HEAD"):
        need = "view_index_metadata"
    elif rest[0] == "_refresh":
        need = "maintenance"
    elif rest[0] in ("_doc", "_create", "_update") and method in ("PUT", "POST"):
        need = "index"
    elif rest[0] == "_doc" and method == "DELETE":
        need = "delete"
    return None if need is None else [(need, i) for i in indices]


def _alias_actions(body: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for action in body.get("actions", []):
        for kind, spec in action.items():
            names = [spec["index"]] if "index" in spec else list(spec.get("indices", []))
            if kind == "remove_index":
                pairs += [("delete_index", n) for n in names]
                continue
            aliases = [spec["alias"]] if "alias" in spec else list(spec.get("aliases", []))
            pairs += [("manage_aliases", n) for n in names + aliases]
    return pairs


def bulk_items(body: bytes, default_index: str | None) -> list[tuple[str, str, list[bytes]]]:
    """(operation, index, lines) per item of an NDJSON bulk body."""
    lines = [line for line in body.split(b"\n") if line.strip()]
    items, at = [], 0
    while at < len(lines):
        header = json.loads(lines[at])
        (operation, meta), = header.items()
        width = 1 if operation == "delete" else 2
        items.append((operation, meta.get("_index", default_index or ""), lines[at : at + width]))
        at += width
    return items


def security_error(status: int, reason: str) -> dict[str, Any]:
    cause = {"type": "security_exception", "reason": reason}
    return {"error": {"root_cause": [cause], **cause}, "status": status}


def _handler(front: EsFront) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def handle_one(self) -> None:
            split = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            record = Recorded(self.command, split.path, dict(parse_qsl(split.query, keep_blank_values=True)),
                              {k.lower(): v for k, v in self.headers.items()}, body, None)
            with front._lock:
                front.records.append(record)
            refused = front.media_type_error(record.headers)
            if refused is not None:
                return self.answer(record, 400, refused)
            principal, role = front.authenticate(self.headers.get("authorization"))
            record.principal = principal
            if principal is None:
                return self.answer(record, 401, security_error(401, str(role)),
                                   {"WWW-Authenticate": 'ApiKey, Basic realm="security", charset="UTF-8"'})
            fault = front.take_fault(self.command, split.path)
            if fault is not None:
                return self.answer(record, fault.status, fault.body, fault.headers)
            if split.path.rstrip("/").endswith("_bulk"):
                return self.bulk(record, principal, role, split)
            wanted = needs(self.command, split.path, record.query, body)
            missing = self.missing(principal, role, wanted, split.path)
            if missing is not None:
                return self.answer(record, 403, security_error(403, missing))
            self.forward(record, split)

        def missing(self, principal: str, role: str | None, wanted: list[tuple[str, str]] | None,
                    path: str) -> str | None:
            if role is None:
                return None
            if wanted is None:
                if front.holds(role, "all", "*"):
                    return None
                reason = f"action [{self.command} {path}] is unauthorized for {principal}"
            else:
                lacking = [(n, i) for n, i in wanted if not front.holds(role, n, i)]
                if not lacking:
                    return None
                need, index = lacking[0]
                if index == "":
                    reason = (f"action [cluster:monitor/main] is unauthorized for {principal}, this action is "
                              f"granted by the cluster privileges [monitor,manage,all]")
                else:
                    reason = (f"action [{ACTIONS[need]}] is unauthorized for {principal} on indices [{index}], "
                              f"this action is granted by the index privileges [{GRANTED_BY[need]}]")
            front.refused.append((principal, self.command, path, reason))
            return reason

        def bulk(self, record: Recorded, principal: str, role: str | None, split: Any) -> None:
            parts = [p for p in split.path.strip("/").split("/") if p]
            items = bulk_items(record.body, parts[0] if len(parts) == 2 else None)
            allowed = [i for i in items if role is None or front.holds(role, "delete" if i[0] == "delete" else "index",
                                                                         i[1])]
            results: dict[int, Any] = {}
            if len(allowed) < len(items):
                reason = (f"action [indices:data/write/bulk[s]] is unauthorized for {principal} on indices [{{}}], "
                          "this action is granted by the index privileges [create_doc,create,index,write,all]")
                for n, (operation, index, lines) in enumerate(items):
                    if (operation, index, lines) not in allowed:
                        meta = json.loads(lines[0])[operation]
                        results[n] = {operation: {"_index": index, "_id": meta.get("_id"), "status": 403,
                                                  "error": security_error(403, reason.format(index))["error"]}}
                        front.refused.append((principal, "POST", f"/_bulk {index}", reason.format(index)))
            upstream: list[Any] = []
            if allowed:
                content = b"\n".join(line for _, _, lines in allowed for line in lines) + b"\n"
                answer = front._client.request("POST", front.upstream + "/_bulk", params=record.query, content=content,
                                               headers={"content-type": "application/x-ndjson"})
                if answer.status_code >= 300 or not results:
                    return self.send(record, answer.status_code, answer.content,
                                     answer.headers.get("content-type", "application/json"), {})
                upstream = answer.json()["items"]
            merged, feed = [], iter(upstream)
            for n in range(len(items)):
                merged.append(results[n] if n in results else next(feed))
            self.answer(record, 200, {"took": 1, "errors": True, "items": merged})

        def forward(self, record: Recorded, split: Any) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
            answer = front._client.request(self.command, front.upstream + split.path, params=record.query,
                                           content=record.body or None, headers=headers)
            self.send(record, answer.status_code, answer.content, answer.headers.get("content-type", ""), {})

        def answer(self, record: Recorded, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            self.send(record, status, json.dumps(body).encode(), "application/json", headers or {})

        def send(self, record: Recorded, status: int, content: bytes, content_type: str, headers: dict[str, str]) -> None:
            record.status = status
            self.send_response(status)
            for name, value in {"content-type": content_type, "x-elastic-product": "Elasticsearch", **headers}.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(content)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(content)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_one

    return Handler
