"""A private RabbitMQ cluster for one test, on this machine, beside (never joined to) its own.

``RabbitCluster`` starts ``size`` nodes of the installed RabbitMQ (Debian's scripts under
``/usr/lib/rabbitmq/bin``, run directly so that nothing switches user or reads the machine's
``/etc/rabbitmq``), each with its own node name (``cqrskit-<tag>-<n>@localhost``), AMQP and
distribution ports, data and log directories under the test's tmp path, the management plugin
off, one Erlang cookie of the cluster's own (``$HOME/.erlang.cookie`` of a home of its own) and
an epmd of its own on its own port (``ERL_EPMD_PORT``). The machine's RabbitMQ (``rabbit@...`` on
5672, epmd on 4369) never sees these nodes: another epmd, another cookie.

Every node runs as a process group the cluster started; ``kill`` sends SIGKILL to one group
(the broker dies as in a power cut), ``close`` kills every group and the epmd, and nothing else.
Waiting is bounded polling of ``rabbitmqctl``, never a sleep standing in for a condition.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
HOST = "localhost"


@dataclass
class Node:
    name: str  # the Erlang node name, e.g. cqrskit-ab12-1@localhost
    amqp_port: int
    dist_port: int
    base: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2F"

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class RabbitCluster:
    """``size`` nodes on ports ``first_port`` + 0.. (AMQP), + 10.. (distribution), + 20 (epmd)."""

    directory: Path
    first_port: int
    size: int = 3
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.epmd_port = self.first_port + 20
        self.home = self.directory / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (self.directory / "rabbitmq-env.conf").write_text("")  # not the machine's /etc/rabbitmq one
        (self.directory / "enabled_plugins").write_text("[].\n")  # management off
        self.nodes = [Node(f"cqrskit-{self.tag}-{n + 1}@{HOST}", self.first_port + n, self.first_port + 10 + n,
                           self.directory / f"node{n + 1}") for n in range(self.size)]
        self.epmd: subprocess.Popen[bytes] | None = None

    # -- environment -----------------------------------------------------------------------------
    def env(self, node: Node | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(HOME=str(self.home), ERL_EPMD_PORT=str(self.epmd_port), ERL_EPMD_ADDRESS="127.0.0.1",
                   RABBITMQ_CONF_ENV_FILE=str(self.directory / "rabbitmq-env.conf"),
                   RABBITMQ_ENABLED_PLUGINS_FILE=str(self.directory / "enabled_plugins"),
                   LANG="C.UTF-8", LC_ALL="C.UTF-8")
        if node is not None:
            conf = node.base / "rabbitmq.conf"
            env.update(RABBITMQ_NODENAME=node.name, RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                       RABBITMQ_NODE_PORT=str(node.amqp_port), RABBITMQ_DIST_PORT=str(node.dist_port),
                       RABBITMQ_CONFIG_FILE=str(conf.with_suffix("")), RABBITMQ_MNESIA_BASE=str(node.base / "mnesia"),
                       RABBITMQ_LOG_BASE=str(node.base / "log"), RABBITMQ_PID_FILE=str(node.base / "pid"),
                       RABBITMQ_ADVANCED_CONFIG_FILE=str(node.base / "advanced.config"),
                       RABBITMQ_FEATURE_FLAGS_FILE=str(node.base / "feature_flags"),
                       RABBITMQ_PLUGINS_EXPAND_DIR=str(node.base / "plugins-expand"),
                       RABBITMQ_QUORUM_DIR=str(node.base / "mnesia" / "quorum"))
        return env

    def ctl(self, node: Node, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n NODE ARGS`` with this cluster's cookie and epmd."""
        return subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", node.name, *args], env=self.env(),
                              capture_output=True, text=True, timeout=timeout, check=check)

    # -- life cycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 240.0) -> RabbitCluster:
        """Start epmd and every node, cluster them with the first, and wait until all run."""
        self.epmd = subprocess.Popen(["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                                     env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        _wait_port(self.epmd_port, 30, "epmd")
        for node in self.nodes:
            self._write_config(node)
            self.start_node(node)
        first, *others = self.nodes
        self.await_startup(first, timeout)
        for node in others:
            self.await_startup(node, timeout)
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        self.wait_running(self.nodes, timeout)
        return self

    def _write_config(self, node: Node) -> None:
        node.base.mkdir(parents=True, exist_ok=True)
        (node.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{node.amqp_port}\n"
            "loopback_users = none\n"
            "cluster_partition_handling = pause_minority\n"
            "log.console = false\n"
            "log.file.level = info\n")
        (node.base / "advanced.config").write_text("[].\n")

    def start_node(self, node: Node) -> None:
        log = (node.base / "server.out").open("ab")
        node.popen = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env(node), stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def await_startup(self, node: Node, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not node.alive:
                raise AssertionError(f"{node.name} exited:\n{self.tail(node)}")
            done = self.ctl(node, "await_startup", "--timeout", "30", timeout=60, check=False)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{node.name} did not start in {timeout}s: {done.stderr[-500:]}\n{self.tail(node)}")
            time.sleep(0.5)

    def wait_running(self, nodes: list[Node], timeout: float = 120.0) -> None:
        """Until the first live node lists exactly ``nodes`` as running."""
        wanted = {n.name for n in nodes}
        deadline = time.monotonic() + timeout
        while self.running_nodes() != wanted:
            if time.monotonic() > deadline:
                raise AssertionError(f"running nodes {self.running_nodes()} after {timeout}s, wanted {wanted}")
            time.sleep(0.5)

    def running_nodes(self) -> set[str]:
        live = next((n for n in self.nodes if n.alive), None)
        if live is None:
            return set()
        out = self.ctl(live, "eval", "rabbit_nodes:all_running().", check=False)
        return set(_atoms(out.stdout)) if out.returncode == 0 else set()

    def kill(self, node: Node) -> None:
        """SIGKILL the node's process group (the Erlang VM and its port programs) and reap it."""
        if node.popen is None:
            return
        if node.popen.poll() is None:
            try:
                os.killpg(node.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.popen.wait(timeout=30)

    def close(self) -> None:
        for node in self.nodes:
            self.kill(node)
        if self.epmd is not None and self.epmd.poll() is None:
            os.killpg(self.epmd.pid, signal.SIGKILL)
            self.epmd.wait(timeout=30)

    # -- what the test asks ------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def node_named(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def live(self) -> Node:
        return next(n for n in self.nodes if n.alive)

    def wait_settled(self, names: list[str], members: int, timeout: float = 120.0) -> dict[str, str]:
        """Until each quorum queue of ``names`` has a leader and ``members`` members online; their leaders."""
        deadline = time.monotonic() + timeout
        while True:
            table = self.queue_table()
            if all(n in table and table[n]["leader"].startswith("cqrskit-") and int(table[n]["online"]) >= members
                   for n in names):
                return {n: table[n]["leader"] for n in names}
            if time.monotonic() > deadline:
                raise AssertionError(f"queues not settled after {timeout}s: { {n: table.get(n) for n in names} }")
            time.sleep(0.5)

    def connections(self) -> dict[str, list[str]]:
        """Node name -> the ``connection_name`` of every named client connection it holds (the node
        is in the connection's Erlang pid: ``<node.N.M.K>``)."""
        out = self.ctl(self.live(), "list_connections", "-q", "--no-table-headers", "pid", "client_properties",
                       timeout=60)
        found: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for line in out.stdout.splitlines():
            node = re.match(r"<([^.>]+@[^.>]+)\.", line)
            name = re.search(r'\{"connection_name","([^"]+)"\}', line)
            if node and name:
                found.setdefault(node[1], []).append(name[1])
        return found

    def queue_table(self) -> dict[str, dict[str, str]]:
        """Queue -> its type, leader, members online (a count), messages and consumers, from a live node."""
        out = self.ctl(self.live(), "list_queues", "-q", "--no-table-headers", "name", "type", "leader", "online",
                       "messages", "consumers", timeout=60)
        table = {}
        for line in out.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) == 6:
                table[parts[0]] = {"type": parts[1], "leader": parts[2], "online": str(len(_atoms(parts[3]))),
                                   "messages": parts[4], "consumers": parts[5]}
        return table

    def tail(self, node: Node, lines: int = 30) -> str:
        text = ""
        for path in [node.base / "server.out", *sorted((node.base / "log").glob("*.log"))]:
            if path.exists():
                text += f"== {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text


def _atoms(text: str) -> list[str]:
    """The node names in an Erlang term as rabbitmqctl prints it (``[a@h, 'b-c@h']``)."""
    return [t.strip(" '\"[]\n") for t in text.replace("\n", ",").split(",") if "@" in t]


def _wait_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not listening on {port} after {timeout}s") from None
            time.sleep(0.1)
