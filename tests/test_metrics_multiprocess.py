"""Metrics under a multi-worker server: /metrics is the sum over workers.

The exporter runs under a real gunicorn with several workers (``exporter.wsgi:app``). Embedded
chDB can be opened by one process only, so the workers get a ClickHouse *server* DSN pointing at a
closed loopback port: every worker accepts records into its own spool slot and counts them, and
the writer keeps retrying the inserts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from .conftest import REPO, free_port

pytestmark = pytest.mark.slow
OPENMETRICS = "application/openmetrics-text;version=1.0.0"


def sample_map(text: str, openmetrics: bool = False) -> dict[tuple, float]:
    parse = parse_openmetrics if openmetrics else parse_text
    found = {}
    for family in parse(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in found, f"sample {key} appears twice"
            found[key] = s.value
    return found


def assert_same_samples(mine: dict[tuple, float], library: dict[tuple, float]) -> None:
    """Same samples; values equal up to float summation order (workers' files are read in another order)."""
    assert set(mine) == set(library)
    for key, value in library.items():
        assert mine[key] == pytest.approx(value, rel=1e-12), key


CHILD = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess, values
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
    from exporter.metrics import Metrics
    from exporter.multiproc import MultiProcessRenderer
    from exporter.records import Row

    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    hostile = json.loads(sys.argv[1])

    def worker(rows, backlog):
        metrics = Metrics(CollectorRegistry(), max_series=5, multiprocess_dir=directory)
        metrics.register_spool_gauges(lambda: backlog, 1000)
        metrics.observe_rows(rows)
        metrics.records_accepted.inc(len(rows))
        metrics.refresh()
        return metrics

    def rows(orgs, ms):
        return [Row(timestamp="2026-11-24 10:00:00.000", org=o, model=o, endpoint="completion", status_code=code,
                    response_time_ms=ms, input_tokens=7, output_tokens=3) for o in orgs for code in (200, 503)]

    this = worker(rows(["acme", "beta"], 40.0), (4, 400, 2.5))
    # Two more "workers" in this one process: value classes writing the files of other pids.
    own = values.ValueClass
    for pid, ms in ((4000001, 900.0), (4000002, 70000.0)):
        values.ValueClass = values.MultiProcessValue(lambda pid=pid: pid)
        worker(rows(["acme"] + hostile, ms), (1, 100, 9.0))
    values.ValueClass = own

    library = CollectorRegistry()
    multiprocess.MultiProcessCollector(library, path=str(directory))
    renderer = MultiProcessRenderer(directory)
    result = {
        "mine": renderer.render(False), "mine_om": renderer.render(True),
        "library": generate_latest(library).decode(), "library_om": generate_openmetrics(library).decode(),
    }
    # Through Metrics.render the live gauges of the two fake pids (not running) are dropped.
    result["scrape"] = this.render(None)[0].decode()
    print(json.dumps(result))
''')


def test_multiprocess_exposition_equals_prometheus_client(tmp_path):
    hostile = ['q"uote', "back\\slash", "new\nline", "ünï©ødé", "x" * 300, "", "cr\r"]
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(hostile)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    assert_same_samples(sample_map(out["mine"]), sample_map(out["library"]))
    assert_same_samples(sample_map(out["mine_om"], True), sample_map(out["library_om"], True))

    found = [s for f in parse_text(out["mine"]) for s in f.samples]

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in found if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    # Counters and histograms summed over the three workers; each worker folds past its own cap of 5.
    assert value("usage_exporter_records_accepted_total") == 4 + 2 * 2 * (1 + len(hostile))
    assert value("llm_requests_total", org="acme") == 2 + 2 + 2
    assert value("llm_response_time_seconds_count", org="acme") == 6
    assert value("llm_response_time_seconds_bucket", org="acme", le="0.05") == 2
    assert value("llm_response_time_seconds_bucket", org="acme", le="1.0") == 4
    assert value("llm_response_time_seconds_sum", org="acme") == pytest.approx(2 * (0.04 + 0.9 + 70))
    assert value("usage_exporter_folded_records_total") == 2 * 2 * (1 + len(hostile) - 5)
    # Live gauges: summed (spool) or the maximum (age) over live workers.
    assert value("usage_exporter_spool_records") == 4 + 1 + 1
    assert value("usage_exporter_oldest_unflushed_age_seconds") == 9.0
    assert value("usage_exporter_workers") == 3
    scraped = [s for f in parse_text(out["scrape"]) for s in f.samples]
    assert sum(s.value for s in scraped if s.name == "usage_exporter_workers") == 1
    assert sum(s.value for s in scraped if s.name == "usage_exporter_spool_records") == 4
    assert sum(s.value for s in scraped if s.name == "usage_exporter_records_accepted_total") == value(
        "usage_exporter_records_accepted_total")


class Gunicorn:
    """``gunicorn -c python:exporter.gunicorn_conf -w N 'exporter.wsgi:app'`` on a loopback port."""

    def __init__(self, data_dir: Path, workers: int) -> None:
        self.data_dir = data_dir
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / "gunicorn.log"
        closed = free_port()  # nothing listens there: ClickHouse is unreachable
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("USAGE_EXPORTER_", "PROMETHEUS_"))} | {
            "USAGE_EXPORTER_DATA_DIR": str(data_dir),
            "USAGE_EXPORTER_CLICKHOUSE_DSN": f"http://127.0.0.1:{closed}/llm_usage",
            "USAGE_EXPORTER_CLICKHOUSE_CONNECT_TIMEOUT_S": "1",
            "USAGE_EXPORTER_WRITER_RETRY_INITIAL_S": "2",
            "USAGE_EXPORTER_SHUTDOWN_GRACE_S": "1",
            "USAGE_EXPORTER_LOG_LEVEL": "ERROR",
        }

    def start(self, timeout: float = 90) -> "Gunicorn":
        binary = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or shutil.which("gunicorn")
        assert binary, "gunicorn is missing: it is in the test extras"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [binary, "-c", "python:exporter.gunicorn_conf", "-w", str(self.workers), "--threads", "4", "-b", f"127.0.0.1:{self.port}",
             "--graceful-timeout", "10", "exporter.wsgi:app"],
            cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"gunicorn exited: {self.log()}"
            if len(self.worker_pids()) == self.workers and self.metric("usage_exporter_workers") == self.workers:
                return self
            time.sleep(0.3)
        raise AssertionError(f"gunicorn workers did not come up within {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def worker_pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    pids.append(int(entry.name))
        return pids

    def scrape(self, accept: str | None = None) -> str:
        answer = requests.get(self.url + "/metrics", headers={"Accept": accept} if accept else {}, timeout=10)
        assert answer.status_code == 200
        return answer.text

    def metric(self, name: str, **labels: str) -> float | None:
        try:
            text = self.scrape()
        except (requests.RequestException, AssertionError):
            return None
        found = [s.value for f in parse_text(text) for s in f.samples
                 if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        return sum(found) if found else None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture
def gunicorn(tmp_path):
    started: list[Gunicorn] = []

    def start(workers: int) -> Gunicorn:
        server = Gunicorn(tmp_path / "data", workers).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=30)


def wait_for(check, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"{what} not met within {timeout}s")


def test_gunicorn_workers_sum_into_one_scrape(gunicorn):
    server = gunicorn(3)
    orgs = ["acme", "beta", 'q"uote\n']
    batches = [[{"timestamp": 1_764_000_000 + i, "org": orgs[(i + j) % 3], "model": "gpt-4o", "status_code": 500 if j == 0 else 200,
                 "path": "/v1/chat/completions", "input_tokens": 5, "response_time_ms": 120} for j in range(4)]
               for i in range(60)]

    def send(batch):
        # A fresh connection per request, so the kernel spreads them over the workers' accept calls.
        with requests.Session() as session:
            answer = session.post(server.url + "/v1/requests", json=batch, headers={"Connection": "close"}, timeout=30)
        assert answer.status_code == 202, answer.text
        return answer

    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(send, batches))
    total = sum(len(b) for b in batches)
    expected_by_org = Counter(r["org"] for b in batches for r in b)

    # Every worker holds part of the records in its own spool slot...
    slots = [p for p in (server.data_dir / "spool").iterdir() if p.name.startswith("slot-")]
    used = [s for s in slots if sum(f.stat().st_size for f in s.glob("seg-*.log")) > 0]
    assert len(used) >= 2, f"the records all went to one worker ({len(slots)} slots)"
    # ...and every scrape, whichever worker answers, shows the sum.
    # Workers copy their usage counts and gauges to the shared files each second.
    wait_for(lambda: server.metric("usage_exporter_spool_records") == total and server.metric("llm_requests_total") == total,
             what="every worker's counts in the shared files")
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/setup --test installs Debian's prometheus package"
    for _ in range(6):
        text = server.scrape()
        found = [s for f in parse_text(text) for s in f.samples]
        by_org = Counter()
        for s in found:
            if s.name == "llm_requests_total":
                by_org[s.labels["org"]] += s.value
        assert by_org == expected_by_org
        assert sum(s.value for s in found if s.name == "usage_exporter_records_accepted_total") == total
        assert sum(s.value for s in found if s.name == "llm_failed_requests_total") == len(batches)
        assert sum(s.value for s in found if s.name == "llm_response_time_seconds_count") == total
        assert sum(s.value for s in found if s.name == "usage_exporter_workers") == 3
        assert sum(s.value for s in found if s.name == "process_resident_memory_bytes") > 3 * 10 * 1024 * 1024
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    om = server.scrape(OPENMETRICS)
    assert om.endswith("# EOF\n")
    assert {s.labels["org"] for f in parse_openmetrics(om) for s in f.samples if s.name == "llm_requests_total"} == set(orgs)

    # A worker killed outright: its counts stay, its live gauges leave the sums, and its replacement
    # takes over its spool slot (and reports that backlog).
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in server.worker_pids() and len(server.worker_pids()) == 3, what="worker respawned")
    wait_for(lambda: server.metric("usage_exporter_workers") == 3 and server.metric("usage_exporter_spool_records") == total,
             timeout=40, what="sums after a respawn")
    assert server.metric("usage_exporter_records_accepted_total") == total
    assert server.metric("llm_requests_total") == total

    # A graceful stop: workers exit through their shutdown (spool kept for the next start).
    multiproc = next((server.data_dir / "prometheus-multiproc").iterdir())
    assert server.stop() == 0
    assert not list(multiproc.glob("gauge_live*")), "stopped workers left live gauges behind"


def _gunicorn_with_bad_config(tmp_path, *args: str) -> subprocess.CompletedProcess:
    server = Gunicorn(tmp_path / "data", 2)
    server.env["USAGE_EXPORTER_WRITER_BATCH_ROWS"] = "-5"
    binary = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or shutil.which("gunicorn")
    return subprocess.run([binary, *args, "-b", f"127.0.0.1:{server.port}", "exporter.wsgi:app"], cwd=REPO,
                          env=server.env, capture_output=True, text=True, timeout=120)


def test_gunicorn_stops_with_one_line_on_a_bad_config(tmp_path):
    # The documented command: the master checks the configuration before it forks any worker.
    done = _gunicorn_with_bad_config(tmp_path, "-c", "python:exporter.gunicorn_conf", "-w", "4")
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("usage-exporter:")]
    assert len(errors) == 1 and "writer.batch_rows" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert "Booting worker" not in done.stderr, "a worker was forked before the configuration was checked"


def test_a_worker_with_a_bad_config_halts_gunicorn_without_the_settings_module(tmp_path):
    # Without exporter.gunicorn_conf the worker itself exits with gunicorn's boot-error code, which
    # halts the server instead of respawning the worker forever. (One worker: with several,
    # gunicorn's arbiter raises a second time while halting; the settings module avoids that.)
    done = _gunicorn_with_bad_config(tmp_path, "-w", "1")
    assert done.returncode == 3, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("usage-exporter:")]
    assert errors and "writer.batch_rows" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
