"""The flusher: moves batches from the spool into ClickHouse, exactly once.

One thread gathers what the spool holds until there are ``batch_rows`` rows or the oldest is
``max_age_s`` old, drops records whose ``request_id`` is already stored (or repeated inside the
batch), and inserts the rest with the batch's de-duplication token. A failed insert is retried
with exponential backoff and full jitter; the batch stays in flight, with the same token, until
ClickHouse takes it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec

from .metrics import Metrics
from .spool import Batch, Spool

log = logging.getLogger(__name__)


class BatchSink(Protocol):
    def insert_rows(self, payload: bytes, dedup_token: str, *, retry: bool = False) -> None: ...

    def existing_request_ids(self, request_ids: Sequence[str]) -> set[str]: ...


class _RequestId(msgspec.Struct):
    request_id: str = ""


_request_id_decoder = msgspec.json.Decoder(_RequestId)


def drop_duplicates(payload: bytes, lookup: Callable[[list[str]], set[str]]) -> tuple[bytes, int]:
    """Remove lines whose request_id ``lookup`` reports stored, or that appeared earlier in the payload."""
    lines = payload.splitlines(keepends=True)
    ids = [_request_id_decoder.decode(line).request_id for line in lines]
    wanted = [rid for rid in ids if rid]
    if not wanted:
        return payload, 0
    stored = lookup(list(dict.fromkeys(wanted)))
    kept: list[bytes] = []
    seen: set[str] = set()
    for line, rid in zip(lines, ids):
        if rid:
            if rid in stored or rid in seen:
                continue
            seen.add(rid)
        kept.append(line)
    return b"".join(kept), len(lines) - len(kept)


@dataclass
class WriterStatus:
    last_error: str | None = None
    last_error_at: float | None = None
    last_success_at: float | None = None
    consecutive_failures: int = 0


class Writer:
    def __init__(
        self,
        spool: Spool,
        sink: BatchSink,
        metrics: Metrics,
        batch_rows: int,
        max_age_s: float,
        retry_initial_s: float,
        retry_max_s: float,
    ) -> None:
        self.spool = spool
        self.sink = sink
        self.metrics = metrics
        self.batch_rows = batch_rows
        self.max_age_s = max_age_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.status = WriterStatus()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._random = random.Random()
        # One batch at a time, whoever sends it: the thread, or drain() at shutdown or in tests.
        self._send_lock = threading.Lock()
        # Tokens of batches that may be in ClickHouse already, in whole or in part: sent and not yet
        # committed, or in flight when the last process stopped.
        self._attempted: set[str] = {spool.in_flight.token} if spool.in_flight is not None else set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="usage-exporter-writer", daemon=True)
        self._thread.start()

    def flush_once(self, force: bool = False) -> int:
        """Send one batch if one is due (or ``force``); return the rows stored. Raises on failure."""
        with self._send_lock:
            return self._flush_locked(force)

    def _flush_locked(self, force: bool) -> int:
        if not force and self.spool.in_flight is None:
            due = self.spool.pending_rows >= self.batch_rows or self.spool.oldest_age() >= self.max_age_s
            if not due:
                return 0
        batch = self.spool.next_batch(self.batch_rows)
        if batch is None:
            return 0
        return self._send(batch)

    def _send(self, batch: Batch) -> int:
        payload, duplicates = drop_duplicates(batch.payload, self.sink.existing_request_ids)
        retry = batch.token in self._attempted
        self._attempted.add(batch.token)
        started = time.perf_counter()
        try:
            if payload:
                self.sink.insert_rows(payload, batch.token, retry=retry)
        finally:
            self.metrics.insert_duration.observe(time.perf_counter() - started)
        self.spool.commit(batch)
        self._attempted.discard(batch.token)
        stored = batch.rows - duplicates
        self.metrics.flushes.labels("success").inc()
        self.metrics.flushed_records.inc(stored)
        if duplicates:
            self.metrics.duplicate_records.inc(duplicates)
        now = time.time()
        self.metrics.last_flush_success.set(now)
        self.status.last_success_at = now
        self.status.consecutive_failures = 0
        return stored

    def drain(self, deadline: float) -> bool:
        """Flush everything buffered, retrying until ``deadline`` (monotonic); True when empty."""
        while self.spool.pending_rows > 0 or self.spool.in_flight is not None:
            if time.monotonic() >= deadline:
                return False
            if not self._attempt(force=True):
                time.sleep(min(self._backoff(), max(0.0, deadline - time.monotonic())))
        return True

    def _attempt(self, force: bool) -> bool:
        try:
            self.flush_once(force=force)
            return True
        except Exception as exc:  # the flusher must outlive any failure; each one is logged and counted
            self.metrics.flushes.labels("failure").inc()
            self.status.consecutive_failures += 1
            self.status.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.status.last_error_at = time.time()
            log.warning("insert into ClickHouse failed (attempt %d): %s", self.status.consecutive_failures, self.status.last_error)
            return False

    def _backoff(self) -> float:
        ceiling = min(self.retry_max_s, self.retry_initial_s * 2 ** min(self.status.consecutive_failures - 1, 30))
        return self._random.uniform(self.retry_initial_s / 2, max(ceiling, self.retry_initial_s / 2))

    def _run(self) -> None:
        # A closed spool has nothing more to give (its wait returns at once): stop, don't spin.
        while not self._stop.is_set() and not self.spool.closed:
            if self.spool.pending_rows == 0 and self.spool.in_flight is None:
                self.spool.wait_for_data(timeout=self.max_age_s)
                continue
            if not self._attempt(force=False):
                self._stop.wait(self._backoff())
                continue
            if self.spool.in_flight is None and self.spool.pending_rows < self.batch_rows:
                # Not a full batch yet: wait until the oldest record reaches max_age_s.
                remaining = self.max_age_s - self.spool.oldest_age()
                if remaining > 0:
                    self._stop.wait(min(remaining, self.max_age_s))

    def stop(self, grace_s: float) -> bool:
        """Stop the thread, then flush what is buffered within ``grace_s``; True when nothing is left."""
        deadline = time.monotonic() + grace_s
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=grace_s)
        return self.drain(deadline)

    def stop_thread(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
