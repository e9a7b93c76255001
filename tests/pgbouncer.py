"""A real PgBouncer (Debian's ``pgbouncer``) in front of the test server, for the pooler tests.

Started in a private temporary directory on a free port, as the ``postgres`` OS user when running
as root (PgBouncer refuses root), with trust authentication and a wildcard database entry, so
that every test database of the server is reachable through it. The pool is small
(``default_pool_size`` 2): the pooler really multiplexes, and a setting or a lock left on one of
its server sessions is seen by the next clients. Starting it must work: a failure raises (the
test fails, it never skips).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from tests.pgcluster import free_port

PGBOUNCER = Path(os.environ.get("OAUTHMIG_PGBOUNCER", "/usr/sbin/pgbouncer"))
POOL_SIZE = 2


@dataclass
class Bouncer:
    """A running PgBouncer: its port, pool mode and log."""

    directory: Path
    port: int
    mode: str
    upstream_host: str
    upstream_port: int

    def url(self, direct_url: str) -> str:
        """The URL of ``direct_url``'s database through this pooler."""
        return (
            make_url(direct_url)
            .set(host="127.0.0.1", port=self.port)
            .render_as_string(hide_password=False)
        )

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _config(directory: Path, port: int, mode: str, host: str, upstream: int) -> str:
    return "\n".join(
        [
            "[databases]",
            f"* = host={host} port={upstream}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {directory / 'users.txt'}",
            f"pool_mode = {mode}",
            f"default_pool_size = {POOL_SIZE}",
            "min_pool_size = 0",
            "reserve_pool_size = 0",
            "max_client_conn = 500",
            "server_reset_query = DISCARD ALL",
            "server_check_delay = 0",
            f"logfile = {directory / 'pgbouncer.log'}",
            f"pidfile = {directory / 'pgbouncer.pid'}",
            "",
        ]
    )


def _wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with code {process.returncode}")
        try:
            with psycopg.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=2
            ) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.Error as exc:
            last = exc
            time.sleep(0.05)
    raise RuntimeError(f"pgbouncer did not accept connections within {timeout}s: {last}")


@contextlib.contextmanager
def pgbouncer(mode: str, upstream_url: str) -> Iterator[Bouncer]:
    """PgBouncer in ``mode`` (``transaction`` or ``session``) in front of the server of
    ``upstream_url``; stopped and removed afterwards. Raises when it cannot start."""
    if not PGBOUNCER.is_file():
        raise RuntimeError(
            f"{PGBOUNCER} not found: run scripts/test-components (installs Debian's pgbouncer)"
        )
    upstream = make_url(upstream_url)
    host, up_port = upstream.host or "127.0.0.1", int(upstream.port or 5432)
    directory = Path(tempfile.mkdtemp(prefix="oauthmig-pgbouncer-"))
    as_user: tuple[str, ...] = ()
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
        as_user = ("runuser", "-u", "postgres", "--")
    (directory / "users.txt").write_text('"postgres" ""\n')
    process: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(5):
            port = free_port()
            ini = directory / "pgbouncer.ini"
            ini.write_text(_config(directory, port, mode, host, up_port))
            if as_user:
                for f in (ini, directory / "users.txt"):
                    shutil.chown(f, "postgres", "postgres")
            process = subprocess.Popen(
                [*as_user, str(PGBOUNCER), str(ini)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                _wait_ready(port, process)
                break
            except RuntimeError:
                log = (directory / "pgbouncer.log").read_text(errors="replace")
                _stop(process)
                process = None
                # Another test process took the free port first: try another one.
                if "Address already in use" not in log or attempt == 4:
                    raise RuntimeError(f"pgbouncer failed to start:\n{log[-2000:]}") from None
        yield Bouncer(directory, port, mode, host, up_port)
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(directory, ignore_errors=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)  # SIGINT: PgBouncer's immediate shutdown
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
