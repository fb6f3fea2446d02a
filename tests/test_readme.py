"""The README's "Real services" section, run as written: its bash block, verbatim, in the
repository with its venv, against this machine's PostgreSQL and RabbitMQ and the bundled search
server (``Procfile.dev``). Only the variables the block itself reads first are set: this test's
own database, exchanges, queues, index prefix and ports."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from cqrskit.infra.settings import Settings
from tests.processes import PROJECT, port_bands

pytestmark = pytest.mark.slow
MARK = "<!-- real-services -->"


def readme_block() -> str:
    text = (PROJECT / "README.md").read_text()
    found = re.search(re.escape(MARK) + r"\s*```bash\n(.*?)```", text, re.S)
    assert found, f"no bash block after {MARK} in README.md"
    return found.group(1)


def free_port(span: int = 1) -> int:
    """A port such that it and the next ``span`` hundreds are free (honcho's $PORT per process), in
    this test process's own bands."""
    for base in port_bands():
        if all(_free(base + 100 * i + j) for i in range(span) for j in range(3)):
            return base
    raise AssertionError(f"no free ports in the bands {port_bands()}")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.timeout(420)
def test_the_real_services_section_runs_as_written(amqp_settings: Settings, tmp_path: Path) -> None:
    assert (PROJECT / ".venv" / "bin" / "activate").exists(), "the README's first command makes .venv"
    s = amqp_settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_") and k != "VIRTUAL_ENV"}
    env.update(
        CQRSKIT_DATABASE_URL=s.database_url, CQRSKIT_BROKER_URL=s.broker_url,
        CQRSKIT_ELASTICSEARCH_URL=f"http://127.0.0.1:{free_port()}",
        CQRSKIT_COMMANDS_EXCHANGE=s.commands_exchange, CQRSKIT_COMMANDS_QUEUE=s.commands_queue,
        CQRSKIT_EVENTS_EXCHANGE=s.events_exchange, CQRSKIT_INDEXER_QUEUE=s.indexer_queue,
        CQRSKIT_INDEX_PREFIX=s.index_prefix, CQRSKIT_QUEUE_TYPE=s.queue_type.value,
        PORT=str(free_port(span=6)), COLUMNS="160",
    )
    script = tmp_path / "real-services.sh"
    script.write_text(readme_block())
    log = tmp_path / "out.txt"
    with log.open("w") as out:
        run = subprocess.Popen(["bash", "-e", "-o", "pipefail", str(script)], cwd=PROJECT, env=env, stdout=out,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            status = run.wait(timeout=400)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGTERM)
                run.wait(timeout=30)
    output = log.read_text(errors="replace")
    assert status == 0, output[-5000:]
    assert '"status": "succeeded"' in output and "ada-1" in output, output[-5000:]
    assert '"name":"Ada Lovelace"' in output, output[-5000:]  # read your own write
    assert "SIGKILL" not in output, output[-5000:]  # every process stops on SIGTERM
    assert "Traceback" not in output, output[-5000:]
    assert re.search(r"customers\s+│\s+1\s+│\s+0\s+│\s+0\s+│\s+0", output), output[-5000:]  # verify


def test_the_readme_names_the_test_command_ci_runs() -> None:
    """The README's "Run the tests" says which pytest command ``bash .ci/run`` runs: the same one."""
    said = re.search(r"then runs `\.venv/bin/python -m pytest([^`]*)`", (PROJECT / "README.md").read_text())
    assert said, "README.md no longer names the test command"
    ran = re.findall(r'^"\$VENV/bin/python" -m pytest(.*)$', (PROJECT / ".ci" / "run").read_text(), re.M)
    assert ran == [said.group(1)], (ran, said.group(1))
