"""A real Prometheus for tests: Debian's ``prometheus`` binary on a loopback port, a temporary
config and TSDB, a short scrape interval, and helpers for its HTTP API.

Use the ``prometheus_server`` fixture (import it into the test module)::

    from .prom_support import prometheus_server  # noqa: F401

    def test_x(exporter_process, prometheus_server):
        exporter = exporter_process()
        prom = prometheus_server([exporter.url])
        prom.wait_for_scrape()
        prom.query("sum(llm_requests_total)")

Also :func:`docs_queries`, the PromQL blocks of ``docs/metrics.md`` by id, and
:func:`with_grafana_ranges`, which fills in Grafana's ``$__range``/``$__rate_interval``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import yaml

from .conftest import free_port

REPO = Path(__file__).resolve().parent.parent
JOB = "llm-usage-exporter"


class PrometheusServer:
    """One Prometheus process scraping ``targets`` (exporter base URLs) every ``scrape_interval``."""

    def __init__(self, workdir: Path, targets: list[str], scrape_interval: str = "1s",
                 rule_files: list[Path] | None = None, job: str = JOB) -> None:
        self.workdir = workdir
        self.targets = targets
        self.scrape_interval = scrape_interval
        self.rule_files = rule_files or []
        self.job = job
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "prometheus.log"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval,
                       "scrape_timeout": self.scrape_interval},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [{
                "job_name": self.job,
                "static_configs": [{"targets": [urlsplit(t).netloc for t in self.targets]}],
            }],
        }

    def start(self, timeout: float = 60) -> "PrometheusServer":
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: scripts/setup --test installs Debian's prometheus package"
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config()))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log()}")
            try:
                if requests.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus did not get ready within {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)

    # -- the HTTP API --------------------------------------------------------------------------

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result vector (or a scalar as one unlabeled sample)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        answer = requests.get(self.url + "/api/v1/query", params=params, timeout=30)
        body = answer.json()
        assert answer.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def values(self, expr: str, at: float | None = None, by: str | tuple[str, ...] | None = None) -> dict[Any, float]:
        """``{label value (or tuple of values, or None): float}`` of an instant query."""
        names = (by,) if isinstance(by, str) else by
        result = {}
        for sample in self.query(expr, at):
            if names is None:
                key: Any = None
            elif len(names) == 1:
                key = sample["metric"].get(names[0], "")
            else:
                key = tuple(sample["metric"].get(name, "") for name in names)
            result[key] = float(sample["value"][1])
        return result

    def targets_health(self) -> list[dict[str, Any]]:
        return requests.get(self.url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]

    def wait_until(self, expr: str, predicate: Callable[[dict[Any, float]], bool], timeout: float = 30,
                   by: str | tuple[str, ...] | None = None) -> dict[Any, float]:
        deadline = time.monotonic() + timeout
        last: dict[Any, float] = {}
        while time.monotonic() < deadline:
            last = self.values(expr, by=by)
            if predicate(last):
                return last
            time.sleep(0.2)
        raise AssertionError(f"{expr} never met the condition within {timeout}s; last {last}; targets {self.targets_health()}")

    def wait_for_scrape(self, timeout: float = 30) -> None:
        """Until every target has been scraped successfully at least once."""
        self.wait_until(f'up{{job="{self.job}"}}', lambda v: len(v) == len(self.targets) and all(x == 1 for x in v.values()),
                        timeout=timeout, by="instance")

    def last_scrape_time(self, metric: str) -> float:
        """Timestamp (s) of the newest sample of ``metric``: a moment the TSDB holds a scrape for."""
        [sample] = self.query(f"max(timestamp({metric}))")
        return float(sample["value"][1])


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    started: list[PrometheusServer] = []

    def start(targets: list[str], **kwargs: Any) -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus-{len(started)}", targets, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


_BLOCK = re.compile(r"```promql\n# (?P<id>[a-z0-9_]+): [^\n]*\n(?P<expr>.*?)```", re.S)


def docs_queries(path: Path = REPO / "docs" / "metrics.md") -> dict[str, str]:
    """The PromQL blocks of a doc by id: a block opens with a comment ``# <id>: <title>``."""
    queries = {}
    for match in _BLOCK.finditer(path.read_text()):
        assert match["id"] not in queries, f"query id {match['id']} appears twice in {path.name}"
        queries[match["id"]] = match["expr"].strip()
    return queries


def with_grafana_ranges(expr: str, range_ms: int) -> str:
    """Grafana's range variables filled in with one window (as Grafana does for an instant query)."""
    return expr.replace("$__range", f"{range_ms}ms").replace("$__rate_interval", f"{range_ms}ms")
