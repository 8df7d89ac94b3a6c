"""A throwaway PostgreSQL cluster for tests and benchmarks.

Starts Debian's ``postgresql`` binaries (``initdb`` + ``pg_ctl``) in a temporary directory, listening
on a free loopback port only (no Unix socket), with trust authentication and durability switched
off: it exists for seconds and holds nothing worth an fsync. PostgreSQL refuses to run as root, so
under root the cluster belongs to the ``postgres`` system user (or ``nobody``) and every server
command runs through ``runuser``.

Use it as a pytest fixture (``postgres_cluster``, one per session) or, outside pytest, as a context
manager: ``with PostgresCluster.started() as pg: pg.create_database("x")``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SUPERUSER = "postgres"
# Settings for a disposable cluster: no fsync, no WAL archiving, small but not starved.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "shared_buffers": "128MB",
    "max_connections": "40",
    "log_min_messages": "warning",
}


class PostgresUnavailable(RuntimeError):
    """The postgresql binaries are not installed (scripts/setup --test installs them)."""


def _bin_dir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise PostgresUnavailable("PostgreSQL's initdb was not found; run scripts/setup --test to install the postgresql package.")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _service_user() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and neither a postgres nor a nobody account exists to run PostgreSQL.")


class PostgresCluster:
    def __init__(self, base_dir: Path | None = None, settings: dict[str, str] | None = None) -> None:
        self.bin = _bin_dir()
        self.user = _service_user()
        # A fresh directory directly under the system temp dir: pytest's own temp dirs are private
        # to root (mode 700), which the postgres account could not enter.
        self.base = Path(tempfile.mkdtemp(prefix="pg-cluster-", dir=base_dir))
        self.data = self.base / "data"
        self.log_path = self.base / "server.log"
        self.port = _free_port()
        self.settings = SERVER_SETTINGS | (settings or {})
        if self.user is not None:
            os.chown(self.base, self.user.pw_uid, self.user.pw_gid)

    @classmethod
    @contextmanager
    def started(cls, **kwargs) -> Iterator["PostgresCluster"]:
        cluster = cls(**kwargs)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.destroy()

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user.pw_name, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.base, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}\n{self.log()}")
        return result

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> "PostgresCluster":
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                  "--locale=C", "--no-sync")
        options = " ".join(f"-c {key}={value!s}" if value else f"-c {key}=''" for key, value in self.settings.items())
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60",
                  "-o", f"-p {self.port} {options}", "start")
        return self

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its DSN."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One running cluster per test session; tests isolate themselves with ``create_database``."""
    with PostgresCluster.started() as cluster:
        yield cluster
