"""exporter.client against a real exporter process (down, back, killed mid-stream), plus a scripted
HTTP server for the answers a healthy exporter rarely gives (429 with Retry-After, 413, 401)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from exporter.client import UsageClient, parse_retry_after

from .conftest import ExporterProcess, free_port


def record(i: int, **extra) -> dict:
    return {"org": f"org-{i % 3}", "model": "gpt-4o", "status_code": 200, "path": "/v1/chat/completions",
            "input_tokens": i, "output_tokens": 1, "token_name": "t", "response_time_ms": 12.5} | extra


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.05)


def stored(proc: ExporterProcess) -> tuple[int, int]:
    """(rows, distinct request ids) in the exporter's store."""
    row = proc.sql("SELECT count() AS n, uniqExact(request_id) AS ids FROM requests")[0]
    return int(row["n"]), int(row["ids"])


@pytest.fixture
def exporter_config(tmp_path: Path) -> Path:
    path = tmp_path / "exporter.yaml"
    path.write_text("writer:\n  max_age_s: 0.05\n")
    return path


@pytest.fixture
def processes() -> Iterator[list[ExporterProcess]]:
    started: list[ExporterProcess] = []
    yield started
    for proc in started:
        proc.kill()


def test_records_from_many_threads_arrive_once_each(tmp_path, exporter_config, processes):
    proc = ExporterProcess(tmp_path / "data", config_file=exporter_config).start()
    processes.append(proc)
    client = UsageClient(proc.url, batch_size=50, max_batch_age_s=0.05)
    workers = [threading.Thread(target=lambda k=k: [client.send(record(k * 1000 + i)) for i in range(250)]) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    client.send(org="kw", model="m", status_code=503, timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert client.flush(timeout=30)
    stats = client.stats
    assert (stats.sent, stats.rejected, stats.dropped, stats.failed, stats.queued) == (1001, 0, 0, 0, 0)
    assert stats.batches >= 1001 // 50
    wait_for(lambda: stored(proc) == (1001, 1001), what="1001 rows stored")
    assert proc.sql("SELECT toString(timestamp) AS t FROM requests WHERE org = 'kw'") == [{"t": "2026-01-02 03:04:05.000"}]
    assert client.close(timeout=5)


def test_exporter_down_then_up_loses_nothing_and_sending_never_blocks(tmp_path, exporter_config, processes):
    proc = ExporterProcess(tmp_path / "data", config_file=exporter_config)  # not started: nothing listens
    client = UsageClient(proc.url, batch_size=100, max_batch_age_s=0.05, retry_initial_s=0.05, retry_max_s=0.3)
    started = time.perf_counter()
    assert all(client.send(record(i)) for i in range(2000))
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"2000 sends took {elapsed:.2f}s while the exporter was down"
    wait_for(lambda: client.stats.retries >= 3, what="retries against the absent exporter")
    assert client.stats.sent == 0
    processes.append(proc.start())
    assert client.flush(timeout=60)
    assert (client.stats.sent, client.stats.dropped, client.stats.failed) == (2000, 0, 0)
    wait_for(lambda: stored(proc) == (2000, 2000), what="2000 rows stored")
    client.close()


def test_exporter_killed_mid_stream_and_restarted_counts_each_record_once(tmp_path, exporter_config, processes):
    proc = ExporterProcess(tmp_path / "data", config_file=exporter_config).start()
    processes.append(proc)
    client = UsageClient(proc.url, batch_size=40, max_batch_age_s=0.02, retry_initial_s=0.05, retry_max_s=0.5)
    total = 3000

    def produce() -> None:
        for i in range(total):
            client.send(record(i))
            if i % 100 == 0:
                time.sleep(0.02)

    producer = threading.Thread(target=produce)
    producer.start()
    wait_for(lambda: client.stats.sent >= 500, what="first records delivered")
    proc.kill()  # SIGKILL: batches in flight get no answer and are retried with the same request ids
    time.sleep(0.3)
    proc.start()
    producer.join()
    assert client.flush(timeout=60)
    assert client.stats.retries >= 1
    assert (client.stats.dropped, client.stats.failed) == (0, 0)
    wait_for(lambda: stored(proc)[1] == total, what="every record stored")
    assert stored(proc) == (total, total)
    client.close()


class Scripted(BaseHTTPRequestHandler):
    """Answers POSTs from a script of (status, headers, body); records when each arrived."""

    script: list[tuple[int, dict[str, str], dict]] = []
    seen: list[tuple[float, bytes, dict[str, str]]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((time.monotonic(), body, dict(self.headers)))
        status, headers, answer = self.script.pop(0) if self.script else (202, {}, {"accepted": body.count(b"\n"), "rejected": []})
        payload = json.dumps(answer).encode()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[tuple[str, type[Scripted]]]:
    handler = type("Handler", (Scripted,), {"script": [], "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_retry_after_is_honoured_and_the_retry_is_the_same_batch(scripted):
    url, handler = scripted
    handler.script = [(429, {"Retry-After": "1"}, {"error": "slow down"}),
                      (503, {"Retry-After": format_datetime(datetime.now(timezone.utc), usegmt=True)}, {"error": "full"})]
    client = UsageClient(url, batch_size=10, max_batch_age_s=0.01, retry_initial_s=5, token="s3cret")
    for i in range(10):
        client.send(record(i))
    assert client.flush(timeout=10)
    (t0, first, headers), (t1, second, _), (t2, third, _) = handler.seen
    assert t1 - t0 >= 0.95  # Retry-After: 1, not the 5 s backoff...
    assert t2 - t1 < 2.0  # ...and an HTTP date already past means "now", not the backoff either
    assert first == second == third and first.count(b"\n") == 10
    assert len({json.loads(line)["request_id"] for line in first.splitlines()}) == 10
    assert headers["Authorization"] == "Bearer s3cret" and headers["Content-Type"] == "application/x-ndjson"
    assert (client.stats.sent, client.stats.retries) == (10, 2)
    client.close()


def test_refusals_are_counted_not_retried_and_413_splits_the_batch(scripted):
    url, handler = scripted
    handler.script = [
        (413, {}, {"error": "too large"}),
        (202, {}, {"accepted": 1, "rejected": [{"index": 1, "error": "model: expected a string."}]}),
        (202, {}, {"accepted": 2, "rejected": []}),
        (400, {}, {"accepted": 0, "rejected": [{"index": 0, "error": "bad"}]}),
        (401, {}, {"error": "A valid ingest token is required."}),
    ]
    client = UsageClient(url, batch_size=4, max_batch_age_s=0.01)
    for i in range(4):
        client.send(record(i))
    assert client.flush(timeout=10)
    assert [body.count(b"\n") for _, body, _ in handler.seen] == [4, 2, 2]
    client.send(record(5))
    assert client.flush(timeout=10)
    client.send(record(6))
    assert client.flush(timeout=10)
    stats = client.stats
    assert (stats.sent, stats.rejected, stats.failed, stats.retries) == (3, 2, 1, 0)
    assert len(handler.seen) == 5
    assert client.send({"org": "x", "model": "m", "status_code": 200, "input_tokens": object()}) is False
    assert client.stats.failed == 2
    client.close()


def test_full_buffer_drops_and_counts_and_close_gives_up_in_time():
    client = UsageClient(f"http://127.0.0.1:{free_port()}", max_queue=10, batch_size=1000, max_batch_age_s=60,
                         retry_initial_s=10, flush_at_exit=False)
    results = [client.send(record(i)) for i in range(25)]
    assert results == [True] * 10 + [False] * 15
    assert (client.stats.dropped, client.stats.queued) == (15, 10)
    started = time.monotonic()
    assert client.close(timeout=0.5) is False
    assert time.monotonic() - started < 3
    assert (client.stats.failed, client.stats.sent, client.stats.queued) == (10, 0, 0)
    assert client.send(record(99)) is False


def test_retry_after_parsing():
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
