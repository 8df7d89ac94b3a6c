"""What a 2xx promised survives the process: SIGKILL at random moments, SIGTERM with a flush.

Real exporter processes on loopback; load from threads; the store is checked through the
exporter's own read-only SQL endpoint after a restart.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from .conftest import ExporterProcess

FAST_FLUSH = {"writer": {"batch_rows": 300, "max_age_s": 0.05, "retry_initial_s": 0.05, "retry_max_s": 0.5}}


@dataclass
class Ledger:
    """Which records the load sent, and which of them were acknowledged with 2xx."""

    sent: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _load(url: str, ledger: Ledger, stop: threading.Event, worker: int, round_no: int) -> None:
    session = requests.Session()
    sequence = 0
    while not stop.is_set():
        batch, ids = [], []
        for _ in range(random.randint(1, 40)):
            marker = f"w{worker}-r{round_no}-{sequence}"
            sequence += 1
            record = {"timestamp": time.time(), "org": f"org-{worker % 3}", "model": "gpt-4o", "status_code": 200,
                      "path": "/v1/chat/completions", "input_tokens": 3, "output_tokens": 4, "user_id": marker}
            # Half carry a request_id; the other half rely on the spool's batch tokens alone.
            if sequence % 2:
                record["request_id"] = marker
            batch.append(record)
            ids.append(marker)
        with ledger.lock:
            ledger.sent.update(ids)
        try:
            answer = session.post(url + "/v1/requests", json=batch, timeout=5)
        except requests.RequestException:
            return  # the process died under us: this batch's fate is unknown, which is allowed
        if answer.status_code == 202:
            with ledger.lock:
                ledger.acked.update(ids)


def _run_load_then(action, proc: ExporterProcess, ledger: Ledger, round_no: int, workers: int = 3) -> None:
    stop = threading.Event()
    threads = [threading.Thread(target=_load, args=(proc.url, ledger, stop, w, round_no)) for w in range(workers)]
    for thread in threads:
        thread.start()
    try:
        action()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)


def _wait_drained(proc: ExporterProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = requests.get(proc.url + "/readyz", timeout=5).json()
        if state["spool"]["records"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"spool not drained: {state}")


def _stored_markers(proc: ExporterProcess) -> list[str]:
    return [row["user_id"] for row in proc.sql("SELECT user_id FROM requests")]


def _config(tmp_path: Path, extra: dict | None = None) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(FAST_FLUSH | (extra or {})))
    return path


def test_sigkill_at_random_moments_loses_and_duplicates_nothing_acknowledged(tmp_path, exporter_process):
    rng = random.Random(20261124)
    data_dir = tmp_path / "data"
    config = _config(tmp_path)
    ledger = Ledger()
    rounds = 20
    for round_no in range(rounds):
        proc = exporter_process(data_dir=data_dir, config_file=config)
        _run_load_then(lambda: time.sleep(rng.uniform(0.2, 1.2)), proc, ledger, round_no)
        proc.kill()  # SIGKILL while the load is still running

    proc = exporter_process(data_dir=data_dir, config_file=config)
    _wait_drained(proc)
    stored = _stored_markers(proc)
    assert len(ledger.acked) > rounds * 50, "the load did not get enough records acknowledged to mean anything"
    missing = ledger.acked - set(stored)
    assert not missing, f"{len(missing)} acknowledged records lost, e.g. {sorted(missing)[:5]}"
    assert len(stored) == len(set(stored)), "a record was stored twice"
    assert set(stored) <= ledger.sent


def test_sigterm_stops_accepting_flushes_and_exits_zero(tmp_path, exporter_process):
    data_dir = tmp_path / "data"
    # A long max age: without the shutdown flush, nothing would reach ClickHouse before exit.
    config = _config(tmp_path, {"writer": {"batch_rows": 1_000_000, "max_age_s": 3600}, "shutdown_grace_s": 20})
    ledger = Ledger()
    proc = exporter_process(data_dir=data_dir, config_file=config)
    results: dict[str, float | int] = {}

    def terminate() -> None:
        time.sleep(0.8)
        started = time.monotonic()
        results["code"] = proc.terminate(timeout=30)
        results["seconds"] = time.monotonic() - started

    _run_load_then(terminate, proc, ledger, 0)
    assert results["code"] == 0
    assert results["seconds"] < 20
    assert ledger.acked
    assert "flushing the buffer" in proc.log()

    restarted = exporter_process(data_dir=data_dir, config_file=config)
    # Read before the restarted writer could flush anything: the rows are there from the SIGTERM flush.
    stored = _stored_markers(restarted)
    assert ledger.acked <= set(stored)
    assert len(stored) == len(set(stored))


def _stream_endless_header(port: int, stop: threading.Event) -> None:
    # A request whose header never ends: every chunk that arrives runs waitress's parser on the
    # main thread, which is where a stop signal used to land and be swallowed.
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"POST /v1/requests HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: ")
                while not stop.is_set():
                    sock.sendall(b"a" * 512)
        except OSError:
            time.sleep(0.01)  # waitress answered 431 and closed, or the server is gone


def test_sigterm_stops_the_server_while_its_main_loop_is_busy(tmp_path, exporter_process):
    proc = exporter_process(data_dir=tmp_path / "data", config_file=_config(tmp_path, {"shutdown_grace_s": 5}))
    stop = threading.Event()
    streams = [threading.Thread(target=_stream_endless_header, args=(proc.port, stop)) for _ in range(6)]
    for thread in streams:
        thread.start()
    try:
        time.sleep(1.5)
        started = time.monotonic()
        assert proc.terminate(timeout=30) == 0
        assert time.monotonic() - started < 15
    finally:
        stop.set()
        for thread in streams:
            thread.join(timeout=10)
    assert "stopping: finishing in-flight requests" in proc.log()
