"""Throwaway RabbitMQ users for the access tests (G11): each with a unique name, removed after
the test, made with ``rabbitmqctl`` as an operator would."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from urllib.parse import urlsplit, urlunsplit


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@dataclass
class RabbitUsers:
    """Users made by one test; ``url`` is the broker URL as that user."""

    base_url: str
    made: list[str] = field(default_factory=list)

    def add(self, role: str, configure: str = "^$", write: str = "^$", read: str = "^$") -> tuple[str, str]:
        """A new user ``<role>-<random>`` with these permissions on ``/``: (name, amqp URL)."""
        name, password = f"{role}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        rabbitmqctl("add_user", name, password)
        self.made.append(name)
        rabbitmqctl("set_permissions", "-p", "/", name, configure, write, read)
        parts = urlsplit(self.base_url)
        return name, urlunsplit(parts._replace(netloc=f"{name}:{password}@{parts.hostname}:{parts.port or 5672}"))

    def remove_all(self) -> None:
        for name in self.made:
            try:
                rabbitmqctl("delete_user", name)
            except RuntimeError:
                pass


@contextmanager
def rabbit_users(base_url: str) -> Iterator[RabbitUsers]:
    users = RabbitUsers(base_url)
    try:
        yield users
    finally:
        users.remove_all()
