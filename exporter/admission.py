"""Admission control for ingest: a budget of body bytes being processed at once.

Waitress spools large bodies to disk and bounds connections, but once a body reaches the app it
is decoded into Python objects several times its size. Capping the bytes in flight bounds that
memory whatever the request rate; a request over the budget is answered 503 at once (before its
body is read) so a client backs off instead of the exporter queueing without bound.
"""

from __future__ import annotations

import threading


class InflightBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._used = 0
        self._lock = threading.Lock()

    def try_acquire(self, size: int) -> bool:
        # A single body larger than the whole budget still gets in when nothing else is running,
        # so max_body_bytes, not this budget, decides what is too large.
        with self._lock:
            if self._used and self._used + size > self.limit_bytes:
                return False
            self._used += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self._used -= size

    @property
    def used(self) -> int:
        return self._used
