"""A client for gateways: one :meth:`UsageClient.send` per served request, never in the way.

``send`` serialises the record, puts it in a bounded in-memory buffer and returns: it never waits
on the network and never raises. A background thread takes batches (by size, or when the oldest
record is ``max_batch_age_s`` old) and POSTs them as NDJSON to ``/v1/requests``. A batch that meets
a connection error, a timeout, ``429`` or a ``5xx`` is retried, with exponential backoff and full
jitter, or after the ``Retry-After`` the exporter asked for; meanwhile new records queue up to
``max_queue`` and beyond that are dropped and counted, so a long outage costs records, not memory
or latency. Each record gets a ``request_id`` (a UUID unless the gateway gives one) when it is
sent, so a retried batch that the exporter had in fact stored is counted once.

Standard library only, so a gateway can also vendor this one file::

    from exporter.client import UsageClient

    usage = UsageClient("http://exporter:8080", token="ingest-secret")
    usage.send(org="acme", model="gpt-4o", status_code=200, path="/v1/chat/completions",
               response_time_ms=812, input_tokens=420, output_tokens=96, token_name="ci-bot")
    ...
    usage.close()  # at shutdown: sends what is buffered, within shutdown_timeout_s
"""

from __future__ import annotations

import atexit
import email.utils
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)

INGEST_PATH = "/v1/requests"
# Statuses worth another try: the exporter (or a proxy in front of it) is overloaded or away.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ClientStats:
    """Counts since the client started; ``queued`` is what waits right now."""

    queued: int = 0
    sent: int = 0  # records the exporter accepted (a retried batch it had already stored counts again)
    rejected: int = 0  # records the exporter refused as invalid (logged; retrying cannot help)
    dropped: int = 0  # records not buffered because the buffer was full
    failed: int = 0  # records given up: unserialisable, refused batch (401/413/...), or unsent at close
    retries: int = 0  # batch attempts repeated after a retryable failure
    batches: int = 0  # batches delivered (202)


class _Outcome:
    __slots__ = ("status", "retry_after", "body", "error")

    def __init__(self, status: int = 0, retry_after: float | None = None, body: bytes = b"", error: str = "") -> None:
        self.status = status
        self.retry_after = retry_after
        self.body = body
        self.error = error

    @property
    def retryable(self) -> bool:
        return self.status == 0 or self.status in RETRYABLE_STATUSES


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class UsageClient:
    """Sends gateway records to a usage exporter in the background; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        max_queue: int = 10_000,
        batch_size: int = 500,
        max_batch_bytes: int = 4 * 1024 * 1024,
        max_batch_age_s: float = 1.0,
        timeout_s: float = 10.0,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        max_retry_after_s: float = 300.0,
        shutdown_timeout_s: float = 5.0,
        flush_at_exit: bool = True,
    ) -> None:
        if max_queue < 1 or batch_size < 1 or max_batch_age_s <= 0 or timeout_s <= 0:
            raise ValueError("max_queue and batch_size must be positive, max_batch_age_s and timeout_s above 0")
        self.endpoint = url.rstrip("/") + INGEST_PATH
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_age_s = max_batch_age_s
        self.timeout_s = timeout_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.max_retry_after_s = max_retry_after_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self._headers = {"Content-Type": "application/x-ndjson", "User-Agent": "llm-usage-exporter-client/1"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._random = random.Random()
        self._reset()
        if flush_at_exit:
            atexit.register(self._at_exit)
        # A gateway that forks workers after creating the client (gunicorn --preload) gets a fresh,
        # empty client in each child: the parent's thread does not exist there.
        if hasattr(os, "register_at_fork"):
            reset = weakref.WeakMethod(self._reset)  # the hook must not keep a closed client alive
            os.register_at_fork(after_in_child=lambda: (method := reset()) is not None and method())

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._buffer: deque[tuple[float, bytes]] = deque()
        self._in_flight = 0
        self._flush_requested = False
        self._closing = False
        self._give_up_at: float | None = None
        self._thread: threading.Thread | None = None
        self._counts = {"sent": 0, "rejected": 0, "dropped": 0, "failed": 0, "retries": 0, "batches": 0}
        self._last_drop_log = 0.0

    # --- the caller's side -------------------------------------------------------------------

    def send(self, record: Mapping[str, Any] | None = None, /, **fields: Any) -> bool:
        """Buffer one record (a mapping of the contract's fields, or keywords); False when it was dropped.

        ``timestamp`` defaults to now; a ``datetime`` is sent as RFC 3339 (naive means UTC).
        ``request_id`` defaults to a new UUID. Never blocks on the network, never raises.
        """
        try:
            line = self._encode({**(record or {}), **fields})
        except (TypeError, ValueError) as exc:
            self._count("failed")
            log.warning("usage record dropped: it cannot be sent as JSON (%s)", exc)
            return False
        with self._cond:
            if self._closing:
                self._counts["failed"] += 1
                return False
            if len(self._buffer) >= self.max_queue:
                self._counts["dropped"] += 1
                self._log_drop()
                return False
            self._buffer.append((time.monotonic(), line))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="usage-exporter-client", daemon=True)
                self._thread.start()
            # Wake the sender when its wait changes: the first record starts the age clock, a full
            # buffer makes a batch due. Other records need no wake-up (cheaper for the caller).
            if len(self._buffer) == 1 or len(self._buffer) == self.batch_size:
                self._cond.notify_all()
        return True

    @staticmethod
    def _encode(record: dict[str, Any]) -> bytes:
        stamp = record.get("timestamp")
        if stamp is None:
            record["timestamp"] = time.time()
        elif isinstance(stamp, datetime):
            record["timestamp"] = (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).isoformat()
        if not record.get("request_id"):
            record["request_id"] = uuid.uuid4().hex
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode() + b"\n"

    def _log_drop(self) -> None:
        now = time.monotonic()
        if now - self._last_drop_log >= 60:
            self._last_drop_log = now
            log.warning("usage buffer full (%d records): dropping records until the exporter takes them (%d dropped so far)",
                        self.max_queue, self._counts["dropped"])

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything buffered now; wait until it is delivered (or given up). True when nothing is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._buffer:
                self._flush_requested = True
                self._cond.notify_all()
            while self._buffer or self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self, timeout: float | None = None) -> bool:
        """Stop taking records, deliver what is buffered within ``timeout`` (default shutdown_timeout_s),
        count the rest as failed, and stop the thread. True when everything was delivered."""
        timeout = self.shutdown_timeout_s if timeout is None else timeout
        atexit.unregister(self._at_exit)
        with self._cond:
            failed_before = self._counts["failed"]
            self._closing = True
            self._give_up_at = time.monotonic() + timeout
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout + self.timeout_s + 1)
        with self._cond:
            left = len(self._buffer)
            self._buffer.clear()
            self._counts["failed"] += left
            delivered = self._counts["failed"] == failed_before
        if left:
            log.warning("usage client closed with %d records undelivered", left)
        return delivered and (thread is None or not thread.is_alive())

    def _at_exit(self) -> None:
        self.close()

    def __enter__(self) -> UsageClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def stats(self) -> ClientStats:
        with self._cond:
            return ClientStats(queued=len(self._buffer) + self._in_flight, **self._counts)

    def _count(self, key: str, n: int = 1) -> None:
        with self._cond:
            self._counts[key] += n

    # --- the sender thread -------------------------------------------------------------------

    def _next_batch(self) -> list[bytes] | None:
        """Wait until a batch is due (size, age, flush or close) and take it; None when closed and empty."""
        with self._cond:
            while True:
                if not self._buffer:
                    self._flush_requested = False
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                due = (
                    len(self._buffer) >= self.batch_size
                    or self._flush_requested
                    or self._closing
                    or time.monotonic() - self._buffer[0][0] >= self.max_batch_age_s
                )
                if due:
                    break
                self._cond.wait(self._buffer[0][0] + self.max_batch_age_s - time.monotonic())
            batch: list[bytes] = []
            size = 0
            while self._buffer and len(batch) < self.batch_size:
                line = self._buffer[0][1]
                if batch and size + len(line) > self.max_batch_bytes:
                    break
                self._buffer.popleft()
                batch.append(line)
                size += len(line)
            self._in_flight = len(batch)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._deliver(batch)
            except Exception:  # the sender must outlive any surprise; the batch is counted, not lost silently
                log.exception("usage client: unexpected error delivering %d records", len(batch))
                self._count("failed", len(batch))
            finally:
                with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()

    def _deliver(self, batch: list[bytes]) -> None:
        attempt = 0
        while True:
            outcome = self._post(b"".join(batch))
            if outcome.status == 202:
                self._accepted(batch, outcome.body)
                return
            if outcome.status == 413 and len(batch) > 1:  # the exporter's body limit is lower than ours
                half = len(batch) // 2
                self._deliver(batch[:half])
                self._deliver(batch[half:])
                return
            if not outcome.retryable:
                self._refused(batch, outcome)
                return
            delay = self._delay(attempt, outcome.retry_after)
            with self._cond:
                give_up_at = self._give_up_at
            if give_up_at is not None and time.monotonic() + delay > give_up_at:
                log.warning("usage client closing: %d records undelivered (%s)", len(batch), outcome.error or outcome.status)
                self._count("failed", len(batch))
                return
            log.info("usage exporter unavailable (%s); retrying %d records in %.1fs", outcome.error or outcome.status, len(batch), delay)
            self._count("retries")
            with self._cond:
                # A close() during the wait ends it: one more attempt, then retries only within its deadline.
                closing = self._give_up_at is not None
                self._cond.wait_for(lambda closing=closing: (self._give_up_at is not None) != closing, delay)
            attempt += 1

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after_s)
        ceiling = min(self.retry_max_s, self.retry_initial_s * 2**min(attempt, 30))
        return self._random.uniform(0, ceiling)

    def _post(self, body: bytes) -> _Outcome:
        request = urllib.request.Request(self.endpoint, data=body, method="POST", headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return _Outcome(response.status, body=response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return _Outcome(exc.code, parse_retry_after(exc.headers.get("Retry-After")), exc.read(), f"HTTP {exc.code}")
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return _Outcome(error=f"{type(reason).__name__}: {reason}")

    def _accepted(self, batch: list[bytes], body: bytes) -> None:
        try:
            answer = json.loads(body)
            accepted = int(answer.get("accepted", len(batch)))
            rejected = answer.get("rejected") or []
        except (ValueError, AttributeError, TypeError):
            accepted, rejected = len(batch), []
        with self._cond:
            self._counts["sent"] += accepted
            self._counts["rejected"] += len(rejected)
            self._counts["batches"] += 1
        if rejected:
            log.warning("usage exporter rejected %d of %d records; first: %s", len(rejected), len(batch), rejected[0].get("error"))

    def _refused(self, batch: list[bytes], outcome: _Outcome) -> None:
        """A 4xx that retrying cannot fix: invalid records (400), a wrong token (401/403), ..."""
        try:
            answer = json.loads(outcome.body)
        except ValueError:
            answer = {}
        if outcome.status == 400 and isinstance(answer, dict) and "rejected" in answer:
            self._count("rejected", len(batch))
            first = (answer["rejected"] or [{}])[0].get("error")
            log.warning("usage exporter rejected all %d records; first: %s", len(batch), first)
            return
        self._count("failed", len(batch))
        message = answer.get("error") if isinstance(answer, dict) else None
        log.error("usage exporter refused %d records with HTTP %d: %s", len(batch), outcome.status, message or outcome.error)
