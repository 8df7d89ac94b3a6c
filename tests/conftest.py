"""Shared fixtures: a real embedded ClickHouse for the whole session, a fresh database per test,
and real exporter processes on loopback ports.

chDB opens one data directory per process, so in-process tests share one directory and each gets
its own database (``t_<random>``), the way clickhouse-connect's own integration tests isolate runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from exporter.app import Runtime, create_app, runtime
from exporter.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def chdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chdb")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture
def make_config(tmp_path: Path, chdb_dir: Path):
    """Config on the session's chDB directory with a database of its own; overrides nest like the YAML."""

    def build(**overrides: Any) -> Config:
        base = {
            "data_dir": str(tmp_path / "data"),
            "clickhouse": {"dsn": f"chdb://{chdb_dir}", "database": f"t_{uuid.uuid4().hex[:12]}"},
            "writer": {"max_age_s": 0.05},
        }
        return load_config(None, _merge(base, overrides), environ={})

    return build


@pytest.fixture
def make_app(make_config):
    """Apps built by the factory with the writer thread off: tests flush explicitly, no sleeps."""
    built: list[Runtime] = []

    def build(config: Config | None = None, **overrides: Any):
        app = create_app(config or make_config(**overrides), start_writer=False)
        built.append(runtime(app))
        return app

    yield build
    for rt in built:
        rt.writer.stop_thread()  # a test may have started it
        if not rt.spool.closed:
            rt.spool.close()
        rt.store.close()


def flush(app) -> None:
    """Move everything the spool holds into ClickHouse, as the writer thread would."""
    rt = runtime(app)
    assert rt.writer.drain(time.monotonic() + 30), rt.writer.status.last_error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ExporterProcess:
    """A real ``usage-exporter serve`` on a loopback port."""

    def __init__(self, data_dir: Path, config_file: Path | None = None, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.config_file = config_file
        self.extra_args = extra_args or []
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"exporter-{self.port}.log"

    def start(self, timeout: float = 60) -> "ExporterProcess":
        args = [sys.executable, "-m", "exporter.cli", "serve", "--data-dir", str(self.data_dir), "--port", str(self.port)]
        if self.config_file:
            args += ["--config", str(self.config_file)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("USAGE_EXPORTER_")} | self.env
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args + self.extra_args, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited with {self.proc.returncode}: {self.log()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"exporter did not answer within {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def sql(self, query: str) -> list[dict[str, Any]]:
        answer = requests.post(self.url + "/api/v1/sql", params={"format": "JSON"}, data=query, timeout=60)
        answer.raise_for_status()
        return answer.json()["data"]


@pytest.fixture
def exporter_process(tmp_path: Path) -> Iterator[Any]:
    started: list[ExporterProcess] = []

    def start(data_dir: Path | None = None, **kwargs: Any) -> ExporterProcess:
        proc = ExporterProcess(data_dir or tmp_path / "data", **kwargs).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
