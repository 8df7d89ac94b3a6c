"""Faults at the storage boundary and on the spool's disk, caused for real.

The embedded store is wrapped so that inserts raise clickhouse-connect's own exceptions (as a
refused connection, a timeout after the server committed, a server error would); the spool is
put on a real, tiny tmpfs to fill its disk; and a server DSN on a closed port is used as is.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from exporter.app import runtime

from .conftest import flush


class FlakySink:
    """The real store behind a switch that makes it fail the way a sick server does."""

    def __init__(self, store) -> None:
        self.store = store
        self.mode = "ok"
        self.attempts: list[float] = []

    def insert_rows(self, payload: bytes, dedup_token: str, retry: bool = False) -> None:
        self.attempts.append(time.monotonic())
        if self.mode == "refuse":
            raise OperationalError("Error HTTPConnectionPool: [Errno 111] Connection refused (injected)")
        if self.mode == "server_error":
            raise DatabaseError("HTTPDriver received ClickHouse error code 242: Table is in readonly mode (injected)")
        self.store.insert_rows(payload, dedup_token, retry=retry)
        if self.mode == "timeout_after_commit":
            self.mode = "ok"
            raise OperationalError("Error HTTPConnectionPool: Read timed out (injected, after the server committed)")

    def existing_request_ids(self, request_ids):
        if self.mode == "refuse":
            raise OperationalError("Error HTTPConnectionPool: [Errno 111] Connection refused (injected)")
        return self.store.existing_request_ids(request_ids)


def flaky_app(make_app, **overrides):
    app = make_app(writer={"batch_rows": 100, "max_age_s": 0.02, "retry_initial_s": 0.02, "retry_max_s": 0.3}, **overrides)
    rt = runtime(app)
    sink = FlakySink(rt.store)
    rt.writer.sink = sink
    rt.writer.start()
    return app, sink


def records(prefix: str, count: int, with_ids: bool = True) -> list[dict]:
    return [{"timestamp": 1795000000 + i, "org": "acme", "model": "gpt-4o", "status_code": 200, "user_id": f"{prefix}-{i}",
             **({"request_id": f"{prefix}-{i}"} if with_ids and i % 2 else {})} for i in range(count)]


def stored_users(app) -> list[str]:
    return [row[0] for row in runtime(app).store.query("SELECT user_id FROM requests")]


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def stop(app) -> None:
    rt = runtime(app)
    rt.writer.stop_thread()


@pytest.mark.parametrize("mode", ["refuse", "server_error"])
def test_outage_keeps_accepting_then_drains_exactly_once(make_app, mode):
    app, sink = flaky_app(make_app)
    client = app.test_client()
    sink.mode = mode
    acked = []
    for n in range(10):
        batch = records(f"b{n}", 30)
        assert client.post("/v1/requests", json=batch).status_code == 202
        acked += [r["user_id"] for r in batch]
    wait_until(lambda: runtime(app).writer.status.consecutive_failures >= 3)
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert "inserts into ClickHouse failed" in ready.json["error"]
    assert ready.json["spool"]["records"] == len(acked)
    assert stored_users(app) == []

    sink.mode = "ok"
    wait_until(lambda: runtime(app).spool.pending_rows == 0)
    stored = stored_users(app)
    assert sorted(stored) == sorted(acked)
    wait_until(lambda: client.get("/readyz").status_code == 200)
    stop(app)


def test_insert_that_timed_out_after_commit_is_not_counted_twice(make_app):
    app, sink = flaky_app(make_app)
    client = app.test_client()
    sink.mode = "timeout_after_commit"
    # No request_ids at all: only the batch's de-duplication token can prevent the double count.
    batch = records("t", 50, with_ids=False)
    assert client.post("/v1/requests", json=batch).status_code == 202
    wait_until(lambda: runtime(app).spool.pending_rows == 0)
    assert len(sink.attempts) >= 2  # the first attempt "failed", the retry resent the same batch
    assert sorted(stored_users(app)) == sorted(r["user_id"] for r in batch)
    stop(app)


def test_retries_back_off_exponentially_with_jitter_up_to_the_cap(make_app):
    app, sink = flaky_app(make_app)
    sink.mode = "refuse"
    app.test_client().post("/v1/requests", json=records("x", 5, with_ids=False))
    wait_until(lambda: len(sink.attempts) >= 9)
    stop(app)
    gaps = [b - a for a, b in zip(sink.attempts, sink.attempts[1:])]
    # initial 0.02 s doubling to the 0.3 s cap: later gaps are longer than the first ones ...
    assert sum(gaps[-3:]) / 3 > 2 * sum(gaps[:2]) / 2
    # ... never much over the cap, and jittered rather than a fixed ladder.
    assert max(gaps) < 0.3 + 0.25
    assert len({round(g, 3) for g in gaps}) > len(gaps) // 2


def test_full_buffer_during_outage_sheds_with_503_then_recovers(make_app):
    app, sink = flaky_app(make_app, spool={"max_bytes": 20_000})
    client = app.test_client()
    sink.mode = "refuse"
    acked, statuses = [], []
    for n in range(30):
        batch = records(f"f{n}", 10)
        answer = client.post("/v1/requests", json=batch)
        statuses.append(answer.status_code)
        if answer.status_code == 202:
            acked += [r["user_id"] for r in batch]
        else:
            assert answer.status_code == 503
            assert answer.headers["Retry-After"].isdigit()
            assert "buffer is full" in answer.json["error"]
    assert 202 in statuses and 503 in statuses
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "durable buffer" in ready.json["error"]
    sink.mode = "ok"
    wait_until(lambda: runtime(app).spool.pending_rows == 0)
    assert sorted(stored_users(app)) == sorted(acked)
    assert client.post("/v1/requests", json=records("after", 3)).status_code == 202
    stop(app)


@pytest.fixture
def tiny_disk(tmp_path: Path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    # A real filesystem that really fills up (the suite runs as root, as CI does).
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_spool_disk_answers_503_keeps_every_acknowledged_record_and_recovers(make_app, tiny_disk):
    app = make_app(spool={"dir": str(tiny_disk), "segment_bytes": 8_000})
    client = app.test_client()
    acked, refused = [], 0
    for n in range(60):
        batch = records(f"d{n}", 10)
        answer = client.post("/v1/requests", json=batch)
        if answer.status_code == 202:
            acked += [r["user_id"] for r in batch]
        else:
            assert answer.status_code == 503
            assert answer.headers["Retry-After"].isdigit()
            assert "cannot be written" in answer.json["error"]
            refused += 1
    assert acked and refused, "the disk never filled: the test proves nothing"
    flush(app)
    assert sorted(stored_users(app)) == sorted(acked)
    # Flushed segments are deleted, so the disk has room again.
    assert client.post("/v1/requests", json=records("later", 10)).status_code == 202
    flush(app)
    assert len(stored_users(app)) == len(acked) + 10


def test_unreachable_server_dsn_accepts_into_the_spool_and_a_later_start_delivers(tmp_path, exporter_process):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"shutdown_grace_s": 2, "writer": {"retry_initial_s": 0.05, "retry_max_s": 0.2}}))
    data_dir = tmp_path / "data"
    down = exporter_process(data_dir=data_dir, config_file=config, extra_args=["--clickhouse-dsn", "http://default:s3cret-pw@127.0.0.1:9/llm_usage"])
    batch = records("srv", 40)
    answer = requests.post(down.url + "/v1/requests", json=batch, timeout=10)
    assert answer.status_code == 202
    ready = requests.get(down.url + "/readyz", timeout=10)
    assert ready.status_code == 503
    assert "127.0.0.1:9" in ready.json()["error"]
    assert "s3cret-pw" not in ready.text and "s3cret-pw" not in down.log()
    started = time.monotonic()
    assert down.terminate(timeout=30) == 0  # grace period over, records stay in the spool
    assert time.monotonic() - started < 10
    # The store comes back (here: the embedded one on the same data dir): the backlog drains by itself.
    up = exporter_process(data_dir=data_dir, config_file=config)
    wait_until(lambda: requests.get(up.url + "/readyz", timeout=10).json()["spool"]["records"] == 0)
    assert sorted(r["user_id"] for r in up.sql("SELECT user_id FROM requests")) == sorted(r["user_id"] for r in batch)


def test_bodies_beyond_the_inflight_budget_are_refused_at_once(make_app):
    app = make_app(ingest={"max_inflight_bytes": 10_000})
    rt = runtime(app)
    client = app.test_client()
    record = {"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 200}
    assert rt.inflight.try_acquire(9_000)  # another request's body is being decoded
    try:
        answer = client.post("/v1/requests", json=[record] * 30)
        assert answer.status_code == 503
        assert answer.headers["Retry-After"] == "1"
        assert "limit of bodies in progress" in answer.json["error"]
    finally:
        rt.inflight.release(9_000)
    assert client.post("/v1/requests", json=[record] * 30).status_code == 202
    assert rt.inflight.used == 0



class RendezvousSink:
    """Holds the first insert for up to a second, so that a second sender of the same batch meets it."""

    def __init__(self, store) -> None:
        self.store = store
        self.calls = 0
        self.tokens: list[str] = []
        self.second = threading.Event()
        self.lock = threading.Lock()

    def insert_rows(self, payload: bytes, dedup_token: str, retry: bool = False) -> None:
        with self.lock:
            self.calls += 1
            first = self.calls == 1
            self.tokens.append(dedup_token)
        if first:
            self.second.wait(1.0)
        else:
            self.second.set()
        self.store.insert_rows(payload, dedup_token, retry=retry)

    def existing_request_ids(self, request_ids):
        return self.store.existing_request_ids(request_ids)


def test_drain_while_the_writer_thread_runs_sends_each_batch_once(make_app):
    # drain() (shutdown, tests) and the writer thread must never send and commit the same batch
    # twice: a double commit under-counts the backlog and strands the records behind it.
    app = make_app(writer={"batch_rows": 20, "max_age_s": 0.001, "retry_initial_s": 0.01, "retry_max_s": 0.05})
    rt = runtime(app)
    rt.writer.sink = RendezvousSink(rt.store)
    client = app.test_client()
    first, second = records("first", 25, with_ids=False), records("second", 25, with_ids=False)
    assert client.post("/v1/requests", json=first).status_code == 202
    rt.writer.start()
    wait_until(lambda: rt.writer.sink.calls == 1)  # the thread holds the first batch in its insert
    assert client.post("/v1/requests", json=second).status_code == 202
    drainer = threading.Thread(target=rt.writer.drain, args=(time.monotonic() + 30,))
    drainer.start()
    drainer.join()
    stop(app)
    assert rt.writer.drain(time.monotonic() + 30)
    assert len(rt.writer.sink.tokens) == len(set(rt.writer.sink.tokens)), "a batch was sent twice"
    assert sorted(stored_users(app)) == sorted(r["user_id"] for r in first + second)


def test_a_writer_whose_spool_is_closed_stops_instead_of_spinning(make_app):
    # A closed spool's wait returns at once; a writer that kept looping on it held the GIL and a
    # core until the process ended.
    app = make_app(writer={"max_age_s": 1})
    rt = runtime(app)
    rt.writer.start()
    assert client_post_ok(app)
    flush(app)
    rt.spool.close()
    rt.writer._thread.join(timeout=10)  # it may be waiting out max_age_s first
    assert not rt.writer.alive, "the writer thread kept running on a closed spool"


def client_post_ok(app) -> bool:
    return app.test_client().post("/v1/requests", json=records("closed", 3)).status_code == 202
