"""One typed settings object, read from the environment (prefix ``CQRSKIT_``) in one place.

Nothing here connects to anything: the URLs are parsed and validated, the engines, brokers and
clients are made later, at start-up, by the process that needs them.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit
from enum import Enum
from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cqrskit.infra import defaults

EMBEDDED_BROKER = "memory://"
DEFAULT_APP = "cqrskit.examples.shop:app"  # an import string only: the core imports no example
EMBEDDED_SEARCH = "embedded"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEVELOPMENT_SECRET = "cqrskit-development-secret"


class LogFormat(str, Enum):
    auto = "auto"  # readable on a terminal, JSON otherwise
    json = "json"
    console = "console"


class QueueType(str, Enum):
    quorum = "quorum"
    classic = "classic"


class Settings(BaseSettings):
    """Every knob of cqrskit. Environment variables win over defaults; CLI flags win over both."""

    model_config = SettingsConfigDict(env_prefix="CQRSKIT_", extra="ignore")

    app: str = Field(
        default=DEFAULT_APP,
        description="The app every process and CLI verb runs, as module:attribute (an App object).",
    )
    database_url: str = Field(
        default="sqlite:///./var/cqrskit.db",
        description="SQLAlchemy URL of the write store: postgresql+psycopg://... or sqlite:///path.",
    )
    broker_url: str = Field(
        default=EMBEDDED_BROKER,
        description="amqp:// URL of RabbitMQ (several, comma-separated: the nodes of one cluster), or memory:// "
                    "for the embedded in-process broker.",
    )
    elasticsearch_url: str = Field(
        default=EMBEDDED_SEARCH,
        description="http(s):// URL of Elasticsearch, or 'embedded' for an osmem server started on demand.",
    )
    elasticsearch_ca_certs: Path | None = Field(
        default=None,
        description="PEM file of the CA that signed the search server's certificate (a default Elasticsearch 8/9 "
                    "install: config/certs/http_ca.crt). Unset: the system's CAs.",
    )
    elasticsearch_ssl_fingerprint: str | None = Field(
        default=None,
        description="SHA-256 hex of the search server's certificate, checked instead of a CA (what Elasticsearch "
                    "prints at first start).",
    )
    elasticsearch_api_key: str | None = Field(
        default=None, repr=False,
        description="API key of this process's role, in the encoded form Elasticsearch's create-API-key call "
                    "returns (base64 of id:key). Basic auth goes in the URL instead.",
    )
    elasticsearch_timeout: float = Field(default=30.0, gt=0, le=3600,
                                         description="Seconds a request to the search server may take.")
    elasticsearch_replicas: int | None = Field(
        default=None, ge=0, le=32,
        description="number_of_replicas of the read models' indices (unset: 1 on a search server by URL, "
                    "0 embedded).",
    )
    max_command_bytes: int = Field(default=defaults.MAX_COMMAND_BYTES, gt=0, description="Largest command body accepted.")
    log_format: LogFormat = LogFormat.auto
    log_level: str = "INFO"

    commands_exchange: str = "cqrskit.commands"
    commands_queue: str = "commands"
    events_exchange: str = "cqrskit.events"
    indexer_queue: str = "indexer"
    relay_batch_size: int = Field(default=500, gt=0, description="Events per relay read and indexer batch.")
    relay_lease_seconds: float = Field(default=5.0, gt=0, description="A dead relay's lease expires after this.")
    indexer_max_retries: int = Field(default=10_000, ge=0, description="Indexer batches retry this often (a search outage).")
    indexer_partitions: int = Field(
        default=1, ge=1, le=64,
        description="Indexer queues; each document is computed only by the indexers of its home partition "
                    "(a consistent hash of its stream id). The relay feeds every batch to every partition.",
    )
    indexer_window_events: int = Field(
        default=5000, gt=0,
        description="Indexer batches held by one process's threads at once are projected together, up to this many events.",
    )
    relay_linger_ms: float = Field(
        default=40.0, ge=0, le=1000,
        description="While events come, the relay reads every this many ms (sooner when a batch would fill up "
                    "before), so batches, confirm rounds and bulk requests carry what committed meanwhile; a full "
                    "batch is followed at once (a backlog); 0: every 25 ms.",
    )
    relay_idle_poll_ms: float = Field(
        default=1000.0, ge=25, le=10_000,
        description="Once the relay found nothing for 2 s, its polls back off (x1.5 each) from 25 ms to this interval; "
                    "the first event after a quiet spell waits at most this long for the relay.",
    )
    indexer_linger_ms: float = Field(
        default=20.0, ge=0, le=1000,
        description="An indexer window may wait up to this long for more batches while they come at a moderate "
                    "rate (one bulk request for more of them); none under a backlog or when they come rarely (0: never).",
    )
    token_secret: str = Field(
        default=DEVELOPMENT_SECRET,
        description="HMAC key of consistency tokens, shared by the gateway and the query API. Set it in production.",
    )
    index_prefix: str = Field(default="cqrskit", description="Prefix of the read models' aliases and indices.")
    queue_type: QueueType = Field(
        default=QueueType.quorum,
        description="quorum (replicated, parks messages that crash workers after delivery_limit) or classic.",
    )
    delivery_limit: int = Field(default=20, gt=0, description="Quorum queues: deliveries before parking.")
    max_retries: int = Field(default=5, ge=0, description="Retries for infrastructure failures.")
    min_backoff_ms: int = Field(default=500, ge=0)
    max_backoff_ms: int = Field(default=30_000, ge=0)
    conflict_retries: int = Field(default=defaults.CONFLICT_RETRIES, ge=0, description="In-worker retries on version conflicts.")
    group_commit_max: int = Field(
        default=defaults.GROUP_COMMIT_MAX, ge=1, le=256,
        description="PostgreSQL: most commands a worker process decides and commits in one transaction (1: none).",
    )
    group_commit_leaders: int = Field(
        default=defaults.GROUP_COMMIT_LEADERS, ge=1, description="PostgreSQL: group-commit transactions a worker process runs at once (1: its "
        "batches never wait for each other's locks; 2 overlaps one batch's commit with the next when commands rarely share aggregates).",
    )
    group_commit_linger_ms: float = Field(
        default=defaults.GROUP_COMMIT_LINGER_MS, ge=0, le=1000,
        description="PostgreSQL: how long a batch may wait to fill up before it starts (0: it never waits).",
    )
    group_commit_adaptive_linger_ms: float = Field(
        default=10.0, ge=0, le=1000,
        description="PostgreSQL: a batch may wait up to this long for one command of every thread while commands "
                    "come at a moderate rate (one commit for more of them); none under a backlog or when they come rarely.",
    )
    lock_timeout: float = Field(
        default=5.0, ge=0, le=3600,
        description="PostgreSQL: seconds a command worker's transaction waits for an aggregate another transaction "
                    "holds before it gives up; its commands are retried (0: it waits as long as it takes).",
    )
    idle_transaction_timeout: float = Field(
        default=15.0, ge=0, le=3600,
        description="PostgreSQL: seconds a command worker's transaction may sit idle (a frozen or stalled worker) "
                    "before the server ends it, releasing its locks; its commands are decided again (0: never).",
    )
    producer_grants: bool = Field(
        default=False,
        description="Command workers run only the types each producer was granted (cqrskit producers grant); "
                    "a command without a validated AMQP user_id is refused.",
    )
    grants_ttl_seconds: float = Field(default=5.0, ge=0, description="Workers re-read the grants this often.")
    worker_user: str | None = Field(
        default=None,
        description="The command workers' RabbitMQ user (default: the user of broker_url): only the dead letters it "
                    "published (its own retries) are read as the workers' wrappers by cqrskit dlq.",
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="Serve Prometheus metrics on this port (one per process group or relay; unset: no metrics).",
    )
    metrics_host: str = Field(default="127.0.0.1", description="Interface of the metrics server (no authentication: "
                                                                "keep it local or behind your scraper's network).")
    insecure: bool = Field(
        default=False,
        description="Serve the gateway and the query API on real services without authentication and with the "
                    "development token secret (local use only).",
    )
    auth_database_url: str | None = Field(
        default=None,
        description="Where the HTTP processes look API keys up: a role that may only SELECT api_keys (the query "
                    "API needs it; the gateway defaults to database_url).",
    )
    auth_ttl_seconds: float = Field(default=5.0, ge=0, description="HTTP processes re-read an API key this often.")
    http_docs: bool = Field(default=False, description="Serve /docs (Swagger UI, loaded from a CDN) with authentication on.")
    http_limit_concurrency: int = Field(default=1000, gt=0, description="Connections and tasks an HTTP process "
                                                                        "serves at once; beyond, 503.")
    http_header_timeout: float = Field(default=10.0, gt=0, description="Seconds a client has to send a request's "
                                                                       "line and headers (else 408, closed).")
    http_body_timeout: float = Field(default=10.0, gt=0, description="Seconds a client has to send a request body.")
    max_consistency_waits: int = Field(default=8, ge=0, description="Concurrent consistent_with waits per client "
                                                                   "(API key, or address); beyond, 429. 0: no cap.")
    max_consistency_waits_total: int = Field(default=100, ge=0, description="Concurrent consistent_with waits per "
                                                                           "HTTP process, all clients; beyond, 429. "
                                                                           "0: no cap.")
    preflight_wait: float = Field(
        default=0.0, ge=0,
        description="Seconds a process waits for its services and for setup before giving up (a development "
                    "stack starts them all at once; 0: check once).",
    )
    metrics_dir: Path | None = Field(
        default=None, description="Where a worker group's processes share metric files (default: <tmp>/cqrskit-metrics).",
    )

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, value: str) -> str:
        """One URL, or the comma-separated URLs of one cluster's nodes: each amqp:// or amqps://,
        none twice, all with the same user and virtual host (RabbitMQ validates the ``user_id``
        a publisher sets against its connection's user, on whichever node it is)."""
        if value == EMBEDDED_BROKER:
            return value
        urls = [url.strip() for url in value.split(",")]
        if "" in urls or not all(url.startswith(("amqp://", "amqps://")) for url in urls):
            raise ValueError(f"broker_url must be amqp://, amqps:// (several, comma-separated: the nodes of one "
                             f"cluster) or {EMBEDDED_BROKER}, got {masked(value)!r}")
        nodes = [urlsplit(url) for url in urls]
        if len({(n.hostname, n.port) for n in nodes}) < len(nodes):
            raise ValueError(f"broker_url names one node twice: {masked(value)!r}")
        if len({(n.username, n.path or "/") for n in nodes}) > 1:
            raise ValueError(f"broker_url: the nodes of one cluster need the same user and virtual host, "
                             f"got {masked(value)!r}")
        return ",".join(urls)

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return value.upper()

    @field_validator("metrics_port", "metrics_dir", "auth_database_url", "elasticsearch_ca_certs",
                     "elasticsearch_ssl_fingerprint", "elasticsearch_api_key", "elasticsearch_replicas", "worker_user",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """``CQRSKIT_METRICS_PORT=$PORT`` in a Procfile run without a PORT means no metrics."""
        return None if value == "" else value

    @field_validator("elasticsearch_ca_certs")
    @classmethod
    def _ca_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value} (the PEM file of the search server's CA)")
        return value

    @field_validator("elasticsearch_ssl_fingerprint")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digits = value.replace(":", "").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digits):
            raise ValueError("not a SHA-256 fingerprint (64 hex digits, colons allowed)")
        return digits

    @field_validator("index_prefix")
    @classmethod
    def _index_prefix(cls, value: str) -> str:
        """Index names must be lowercase, without ``\\ / * ? " < > | , # :`` or spaces, and may not
        start with ``-``, ``_`` or ``+`` (Elasticsearch's rules); the suffixes take 40 characters."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,199}", value) or value in (".", ".."):
            raise ValueError(f"{value!r} is not a valid index prefix: lowercase letters, digits, '.', '_' and '-', "
                             "starting with a letter or a digit, at most 200 characters")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        if not value.startswith(("postgresql", "sqlite")):
            raise ValueError(f"database_url must be a postgresql or sqlite SQLAlchemy URL, got {masked(value)!r}")
        return value

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url == EMBEDDED_BROKER

    @property
    def broker_urls(self) -> list[str]:
        """The broker's node URLs, in the order given (one for a single broker)."""
        return self.broker_url.split(",")

    @property
    def real_services(self) -> bool:
        """Any of the write store, the broker or the search server is a real service."""
        return not (self.embedded_broker and self.elasticsearch_url == EMBEDDED_SEARCH
                    and self.database_url.startswith("sqlite"))

    @property
    def development_secret(self) -> bool:
        return self.token_secret == DEVELOPMENT_SECRET or len(self.token_secret) < 32

    def environment(self) -> dict[str, str]:
        """Every setting as the ``CQRSKIT_*`` variables that ``load_settings`` reads back: how a
        parent hands its effective settings (flags included) to the processes it starts. An unset
        optional stays unset."""
        return {f"CQRSKIT_{name.upper()}": str(value) for name, value in self.model_dump(mode="json").items()
                if value is not None}

    @cached_property
    def sqlite_path(self) -> Path | None:
        """The file of a SQLite write store (None for PostgreSQL or an in-memory SQLite)."""
        if not self.database_url.startswith("sqlite:///"):
            return None
        path = self.database_url.removeprefix("sqlite:///")
        return Path(path) if path and path != ":memory:" else None


def masked(url: str) -> str:
    """``url`` with the password of its user info replaced by ``***`` (for any message or log)."""
    return re.sub(r"(//[^/@:,]*:)[^/@,]*@", r"\1***@", url)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (CLI flags) applied on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
