"""A private PostgreSQL 15 cluster for fault tests (restart, stop, SIGSTOP of a backend), and
a streaming replica of one (health-check tests).

Started with the server binaries of the machine (``initdb`` + ``pg_ctl``; ``pg_basebackup -R``
for the replica) in a temporary directory on a free port, as the ``postgres`` OS user when
running as root (``initdb`` refuses root). Faults injected here never touch the shared server
other tests and engineers use. Starting it must work: a failure raises (the test fails, it
never skips).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

PG_BIN = Path(os.environ.get("OAUTHMIG_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A running private cluster: its data directory, port and control commands."""

    directory: Path
    port: int
    as_user: tuple[str, ...]
    options: str = ""  # extra server options (-c name=value ...)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.directory} -c fsync=off "
            f"-c synchronous_commit=off -c full_page_writes=off {self.options}"
        ).strip()
        cmd = [
            *self.as_user,
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.directory / "data"),
            "-l",
            str(self.directory / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "120",
            *args,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if check and result.returncode != 0:
            log = (self.directory / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pg_ctl {' '.join(args)} failed: {result.stderr}\n{log}")
        return result

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: terminate sessions; ``immediate``: like a crash)."""
        self._pg_ctl("-m", mode, "stop")

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again (sessions are terminated; clients must reconnect)."""
        self._pg_ctl("-m", mode, "restart")

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` on this cluster."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create a database and return its URL."""
        engine = create_engine(self.url(), poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)


def _tools(*names: str) -> None:
    for tool in names:
        if not (PG_BIN / tool).is_file():
            raise RuntimeError(f"{PG_BIN / tool} not found: set OAUTHMIG_PG_BIN")


def _private_directory(prefix: str) -> tuple[Path, tuple[str, ...]]:
    """A new temporary directory owned by the user the server runs as, and how to run as it."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    as_user: tuple[str, ...] = ()
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
        as_user = ("runuser", "-u", "postgres", "--")
    return directory, as_user


@contextlib.contextmanager
def private_cluster(options: str = "") -> Iterator[Cluster]:
    """A fresh private cluster (initdb, trust auth, replication allowed from 127.0.0.1),
    started with ``options``; stopped and removed afterwards."""
    _tools("initdb", "pg_ctl")
    directory, as_user = _private_directory("oauthmig-pgcluster-")
    cluster = Cluster(directory, free_port(), as_user, options)
    try:
        init = subprocess.run(
            [
                *as_user,
                str(PG_BIN / "initdb"),
                "-D",
                str(directory / "data"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr}")
        for attempt in range(5):
            try:
                cluster.start()
                break
            except RuntimeError as exc:
                # Another test process (a pytest-xdist worker) took the free port first.
                if "already in use" not in str(exc) or attempt == 4:
                    raise
                cluster.port = free_port()
        yield cluster
    finally:
        cluster._pg_ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(name="pg_cluster")
def pg_cluster_fixture() -> Iterator[Cluster]:
    """A fresh private cluster per test, stopped and removed afterwards."""
    with private_cluster() as cluster:
        yield cluster


@contextlib.contextmanager
def streaming_replica(primary: Cluster, options: str = "") -> Iterator[Cluster]:
    """A hot-standby streaming replica of ``primary``: ``pg_basebackup -R -X stream`` into a
    new temporary directory, started on a free port with ``options``; waits until it accepts
    read-only connections. Stopped and removed afterwards."""
    _tools("pg_basebackup", "pg_ctl")
    directory, as_user = _private_directory("oauthmig-pgreplica-")
    replica = Cluster(directory, free_port(), as_user, f"-c hot_standby=on {options}")
    try:
        backup = subprocess.run(
            [
                *as_user,
                str(PG_BIN / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(primary.port),
                "-U",
                "postgres",
                "-D",
                str(directory / "data"),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if backup.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed: {backup.stderr}")
        replica.start()
        yield replica
    finally:
        replica._pg_ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(directory, ignore_errors=True)
