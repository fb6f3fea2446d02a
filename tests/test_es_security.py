"""Real Elasticsearch's TLS and security, through the suite's front in front of osmem
(``tests/es_front.py``): the CA, fingerprint and API key settings reach the client under its own
names; a TLS failure, a 401 and a 403 each end in one line naming the setting to fix (G10's
"one clear error" for operators); the roles ``setup --privileges`` prints are exactly what each
process asks (G11)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from elastic_transport import TlsError
from elasticsearch import AuthenticationException, AuthorizationException

from cqrskit.app.errors import explain
from cqrskit.app.preflight import Needs, check
from cqrskit.app.privileges import elasticsearch_roles
from cqrskit.infra.settings import Settings
from cqrskit.read_models.search import search_client
from tests.es_front import Certificates, EsFront, make_ca
from tests.processes import PROJECT

MODELS = ["orders", "products", "customers"]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def tls_front(search_url: str, certificates: Certificates, index_prefix: str) -> Iterator[EsFront]:
    roles = elasticsearch_roles(Settings(index_prefix=index_prefix), MODELS, prefix="t")
    with EsFront(search_url, certificates=certificates, roles=roles) as front:
        yield front


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    return subprocess.run([sys.executable, "-m", "cqrskit.app", *args], cwd=PROJECT, env={**base, **env},
                          capture_output=True, text=True, timeout=120)


def test_the_ca_fingerprint_and_api_key_settings_reach_the_client(tls_front: EsFront, certificates: Certificates,
                                                                   index_prefix: str) -> None:
    """G11: over HTTPS with a self-signed CA, the client verifies the server by the CA file or by
    the certificate's SHA-256 (colons allowed, as Elasticsearch prints it), and authenticates with
    the encoded API key; the key's role is what the server sees."""
    key = tls_front.api_key("t_operator", "ops")
    pretty = ":".join(certificates.fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
    for trust in ({"elasticsearch_ca_certs": certificates.ca}, {"elasticsearch_ssl_fingerprint": pretty}):
        settings = Settings(elasticsearch_url=tls_front.url, elasticsearch_api_key=key, index_prefix=index_prefix,
                            **trust)
        es = search_client(settings)
        assert es.info()["version"]["number"]
        es.close()
    key_id = base64.b64decode(key).decode().split(":")[0]
    assert {r.principal for r in tls_front.records} == {f"API key id [{key_id}] of user [ops]"}
    assert key not in repr(Settings(elasticsearch_api_key=key))  # never in a log line that shows the settings


def test_a_tls_failure_names_the_ca_setting_and_the_fingerprint_setting(tls_front: EsFront, certificates: Certificates,
                                                                         tmp_path: Path) -> None:
    """G10 for operators: without the CA (a default 8/9 install's own CA), the line names
    CQRSKIT_ELASTICSEARCH_CA_CERTS and says TLS failed, not "nothing answers"; a wrong
    fingerprint names CQRSKIT_ELASTICSEARCH_SSL_FINGERPRINT; http:// on an HTTPS port is a
    refused connection the line explains; the CLI prints the line, no traceback, exit 2."""
    settings = Settings(elasticsearch_url=tls_front.url, elasticsearch_api_key=tls_front.api_key("t_operator"))
    with pytest.raises(TlsError) as no_ca:
        search_client(settings).info()
    line = explain(no_ca.value, settings).line()
    assert line.startswith("CQRSKIT_ELASTICSEARCH_CA_CERTS: TLS with 127.0.0.1:") and "certificate verify failed" in line
    assert "http_ca.crt" in line and "nothing answers" not in line
    wrong = settings.model_copy(update={"elasticsearch_ssl_fingerprint": "ab" * 32})
    with pytest.raises(TlsError) as mismatch:
        search_client(wrong).info()
    assert explain(mismatch.value, wrong).line().startswith(f"CQRSKIT_ELASTICSEARCH_SSL_FINGERPRINT={'ab' * 32}: TLS")
    done = cli({"CQRSKIT_ELASTICSEARCH_URL": tls_front.url, "CQRSKIT_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"},
               "setup")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("CQRSKIT_ELASTICSEARCH_CA_CERTS: TLS with"), done.stderr
    assert "Traceback" not in done.stderr
    missing = cli({"CQRSKIT_ELASTICSEARCH_CA_CERTS": str(tmp_path / "nope.pem")}, "status")
    assert missing.returncode == 2 and "CQRSKIT_ELASTICSEARCH_CA_CERTS" in missing.stderr and "no such file" in missing.stderr


def test_a_refused_key_and_a_refused_role_each_get_their_line(tls_front: EsFront, certificates: Certificates,
                                                               index_prefix: str) -> None:
    """G11: a wrong key is a 401 naming CQRSKIT_ELASTICSEARCH_API_KEY (its value never printed);
    a role asking what it may not is a 403 security_exception naming the action and the privileges
    that grant it, the setting and the fix; basic auth in the URL names the URL instead."""
    base = Settings(elasticsearch_url=tls_front.url, elasticsearch_ca_certs=certificates.ca, index_prefix=index_prefix)
    bogus = "aWQ6c2VjcmV0"  # base64 of id:secret, a key the server never made
    with pytest.raises(AuthenticationException) as unknown:
        search_client(base.model_copy(update={"elasticsearch_api_key": bogus})).info()
    line = explain(unknown.value, base.model_copy(update={"elasticsearch_api_key": bogus})).line()
    assert line.startswith("CQRSKIT_ELASTICSEARCH_API_KEY: the search server did not accept the credentials (401: "), line
    assert bogus not in line
    query = base.model_copy(update={"elasticsearch_api_key": tls_front.api_key("t_query", "query")})
    with pytest.raises(AuthorizationException) as refused:
        search_client(query).indices.create(index=f"{index_prefix}-orders-v9")
    body = refused.value.body
    assert body["error"]["type"] == "security_exception" and body["status"] == 403
    line = explain(refused.value, query).line()
    assert line.startswith("CQRSKIT_ELASTICSEARCH_API_KEY: the search server refused this process's role (403: action "
                           "[indices:admin/create] is unauthorized for API key id ["), line
    assert "setup --privileges" in line
    tls_front.user("ops", "s3cret", "t_indexer")
    basic = base.model_copy(update={"elasticsearch_url": tls_front.url.replace("https://", "https://ops:s3cret@")})
    with pytest.raises(AuthorizationException) as as_user:
        search_client(basic).info()
    assert explain(as_user.value, basic).line().startswith("CQRSKIT_ELASTICSEARCH_URL=https://ops:***@127.0.0.1:")


def test_preflight_asks_each_role_only_what_it_may(tls_front: EsFront, certificates: Certificates,
                                                   index_prefix: str) -> None:
    """G11: the indexer's and the query side's preflight (their read models' aliases) pass under
    their roles, which hold no cluster privilege; the operator's (GET /) under its own; and the
    roles name the deployment's index prefix and the role prefix given."""
    base = Settings(elasticsearch_url=tls_front.url, elasticsearch_ca_certs=certificates.ca, index_prefix=index_prefix)
    operator = base.model_copy(update={"elasticsearch_api_key": tls_front.api_key("t_operator")})
    check(operator, Needs(reach=("search",)))
    from cqrskit.app.setup import _ensure_indices
    from cqrskit.infra.db import make_engine
    from cqrskit.infra.migrate import upgrade

    engine = make_engine("sqlite://")
    upgrade(engine)
    _ensure_indices(operator, engine, lambda _line: None)
    for role in ("t_indexer", "t_query"):
        check(base.model_copy(update={"elasticsearch_api_key": tls_front.api_key(role)}), Needs(indices=True))
    assert not tls_front.refused, tls_front.refused
    with pytest.raises(AuthorizationException):  # a role without the cluster's monitor: GET / is refused
        search_client(base.model_copy(update={"elasticsearch_api_key": tls_front.api_key("t_query")})).info()
    roles = elasticsearch_roles(base, MODELS, prefix="acme")
    assert set(roles) == {"acme_indexer", "acme_query", "acme_operator"}
    assert roles["acme_query"]["indices"][0]["names"] == [f"{index_prefix}-{m}" for m in MODELS]
    json.dumps(roles)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_process_starts_and_works_under_its_role_over_tls(amqp_settings: Settings, search_url: str,
                                                                 certificates: Certificates, tmp_path: Path) -> None:
    """G11 (and G6, G8 under least privilege): through an HTTPS front that answers as
    Elasticsearch's security does, ``setup`` (preflight included) runs under the operator's key,
    the indexer and the query API start (preflight included) and work under their own keys, a
    command reaches a query, and the operator's ``status``, ``rebuild`` and ``verify`` pass: not one
    request of any process is refused. Each role is then refused what it must not do."""
    import httpx

    from cqrskit.infra.envelope import CommandEnvelope
    from tests.processes import WorkerProcess, envelope
    from tests.stack import Stack, wait_until

    roles = elasticsearch_roles(amqp_settings, MODELS, prefix="t")
    with EsFront(search_url, certificates=certificates, roles=roles) as front:
        keys = {role: front.api_key(f"t_{role}", role) for role in ("operator", "indexer", "query")}
        base = amqp_settings.model_copy(update={"elasticsearch_ca_certs": certificates.ca,
                                                "elasticsearch_api_key": keys["operator"]})
        stack = Stack.create(base, front.url, tmp_path)  # cqrskit setup, as the operator
        tls = {"CQRSKIT_ELASTICSEARCH_CA_CERTS": str(certificates.ca)}

        def start(kind: str, args: list[str], key: str | None) -> WorkerProcess:
            log_path = tmp_path / f"{kind}.log"
            env = stack.env(**tls, **({"CQRSKIT_ELASTICSEARCH_API_KEY": key} if key else {}))
            with log_path.open("wb") as log:
                popen = subprocess.Popen([sys.executable, "-m", "cqrskit.app", *args], cwd=PROJECT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
            process = WorkerProcess(popen, log_path)
            stack.started.append(process)
            return process

        def operator(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "cqrskit.app", *args], cwd=PROJECT, timeout=120, text=True,
                                  env=stack.env(**tls, CQRSKIT_ELASTICSEARCH_API_KEY=keys["operator"]),
                                  capture_output=True)

        port = _free_port()
        try:
            start("worker", ["worker", "--processes", "1", "--threads", "2"], None)
            start("relay", ["relay"], None)
            start("indexer", ["indexer", "--processes", "1", "--threads", "2"], keys["indexer"])
            query = start("query", ["query", "--port", str(port), "--insecure"], keys["query"])
            command = CommandEnvelope.model_validate(envelope("RegisterCustomer", "c-1",
                                                              {"name": "Ada", "email": "ada@example.com"}))
            stack.send_and_wait([command], timeout=60)
            stack.wait_drained(timeout=90)

            def answered() -> bool:
                assert query.alive, query.tail()
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/customers/c-1", timeout=5).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(answered, 60, "the query API to serve the customer", poll=0.2)
            for args in (["status"], ["rebuild", "customers"], ["verify"]):
                done = operator(*args)
                assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
            stack.assert_converged()
            assert not front.refused, front.refused
            principals = {r.principal for r in front.records}
            assert {f"API key id [{base64.b64decode(k).decode().split(':')[0]}] of user [{role}]"
                    for role, k in keys.items()} <= principals
        except BaseException:
            for process in stack.started:
                print(process.log_path.name, process.tail(20), sep="\n")
            raise
        finally:
            stack.close()
        as_query = search_client(stack.settings.model_copy(update={"elasticsearch_api_key": keys["query"]}))
        bulk = as_query.bulk(operations=[{"index": {"_index": f"{base.index_prefix}-customers", "_id": "x"}}, {"a": 1}])
        assert bulk["items"][0]["index"]["status"] == 403
        as_indexer = search_client(stack.settings.model_copy(update={"elasticsearch_api_key": keys["indexer"]}))
        with pytest.raises(AuthorizationException):
            as_indexer.search(index=f"{base.index_prefix}-customers")
        with pytest.raises(AuthorizationException):
            as_indexer.indices.delete(index=f"{base.index_prefix}-customers-v1")
