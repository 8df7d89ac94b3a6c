"""The durable buffer: an append-only log of accepted rows, fsynced before the 2xx.

Layout of one spool slot (a process owns a slot through an exclusive ``flock``)::

    slot-0/lock                 held while a process owns the slot
    slot-0/id                   random id, part of every de-duplication token
    slot-0/checkpoint           the position flushed to ClickHouse and the batch in flight (A/B slots)
    slot-0/seg-000000000001.log frames: <length u32><crc32 u32><JSONEachRow lines>

Request threads append one frame per request and then wait for a group fsync: while one thread
runs ``fsync`` the others queue behind it, and the next ``fsync`` covers all of them, so the cost
per request falls as concurrency rises. The flusher reads only what is synced.

A batch in flight is written to the checkpoint (start, end, token) *before* it is inserted. After
a crash the same byte range is re-sent with the same token, so ClickHouse drops it if the first
attempt had landed. See docs/durability.md.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")
_SEGMENT_GLOB = "seg-*.log"


class SpoolFull(Exception):
    """The spool cannot take more right now (size limit or disk full); the client should retry."""


@dataclass(frozen=True, order=True, slots=True)
class Position:
    segment: int
    offset: int


@dataclass(frozen=True, slots=True)
class Batch:
    start: Position
    end: Position
    payload: bytes
    rows: int
    token: str


def _segment_name(number: int) -> str:
    return f"seg-{number:012d}.log"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Checkpoint:
    """Two fixed 512-byte slots, written alternately in place and never grown.

    Writing in place means a full disk can never stop the flusher from recording progress (a
    temp file and rename would need a new block), and the alternation with a sequence number
    and CRC means a torn write loses at most the newest record, never both.
    """

    SLOT = 512
    _HEAD = struct.Struct("<QII")  # sequence, length, crc32

    def __init__(self, path: Path) -> None:
        fresh = not path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if fresh or os.fstat(self._fd).st_size < 2 * self.SLOT:
            os.pwrite(self._fd, bytes(2 * self.SLOT), 0)
            os.fsync(self._fd)
            _fsync_dir(path.parent)
        self._sequence, self.data = self._load()

    def _load(self) -> tuple[int, dict | None]:
        best: tuple[int, dict | None] = (0, None)
        for index in range(2):
            raw = os.pread(self._fd, self.SLOT, index * self.SLOT)
            sequence, length, crc = self._HEAD.unpack_from(raw)
            body = raw[self._HEAD.size : self._HEAD.size + length]
            if sequence and length <= self.SLOT - self._HEAD.size and zlib.crc32(body) == crc and sequence > best[0]:
                best = (sequence, json.loads(body))
        return best

    def save(self, data: dict) -> None:
        body = json.dumps(data, separators=(",", ":")).encode()
        if len(body) > self.SLOT - self._HEAD.size:
            raise ValueError("checkpoint record too large")
        self._sequence += 1
        record = self._HEAD.pack(self._sequence, len(body), zlib.crc32(body)) + body
        os.pwrite(self._fd, record.ljust(self.SLOT, b"\0"), (self._sequence % 2) * self.SLOT)
        os.fdatasync(self._fd)
        self.data = data

    def close(self) -> None:
        os.close(self._fd)


def claim_slot(root: Path) -> tuple[Path, int]:
    """The first slot directory no other process holds, and the open lock fd that holds it."""
    root.mkdir(parents=True, exist_ok=True)
    index = 0
    while True:
        slot = root / f"slot-{index}"
        slot.mkdir(exist_ok=True)
        fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return slot, fd
        except BlockingIOError:
            os.close(fd)
            index += 1


class Spool:
    def __init__(self, root: Path, max_bytes: int, segment_bytes: int, fsync: bool = True) -> None:
        self.directory, self._lock_fd = claim_slot(Path(root))
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync_enabled = fsync
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._data_ready = threading.Condition(self._lock)
        self.closed = False
        # Set when an append was refused (size limit or disk), cleared when a flush frees space.
        self.refusing = False

        id_path = self.directory / "id"
        if not id_path.exists():
            _write_atomic(id_path, uuid.uuid4().hex.encode())
        self.spool_id = id_path.read_text().strip()

        self._checkpoint = Checkpoint(self.directory / "checkpoint")
        self.committed, self.in_flight = self._read_checkpoint()
        self._recover()

        # Each process start writes to a fresh segment, so recovery never races an appender.
        segments = self._segments()
        self._segment = (segments[-1] if segments else self.committed.segment) + 1
        self._fd = os.open(self.directory / _segment_name(self._segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_dir(self.directory)
        self._offset = 0
        self._written_bytes = 0  # monotonic counters give tickets for the group fsync
        self._synced_bytes = 0
        self._synced_position = Position(self._segment, 0)
        self.pending_bytes = self._backlog_bytes()
        self.pending_rows = self._count_backlog_rows()
        self.oldest_append: float | None = time.monotonic() if self.pending_rows else None
        self._skip_finished_segment()

    # -- recovery -----------------------------------------------------------------------------

    def _read_checkpoint(self) -> tuple[Position, Batch | None]:
        data = self._checkpoint.data
        if data is None:
            return Position(0, 0), None
        committed = Position(*data["committed"])
        flight = data.get("in_flight")
        if flight:
            start, end = Position(*flight["start"]), Position(*flight["end"])
            return committed, Batch(start, end, b"", flight.get("rows", 0), flight["token"])
        return committed, None

    def _segments(self) -> list[int]:
        return sorted(int(p.name[4:-4]) for p in self.directory.glob(_SEGMENT_GLOB))

    def _recover(self) -> None:
        """Cut a torn frame off the end of each segment (a crash mid-append leaves at most one)."""
        for number in self._segments():
            path = self.directory / _segment_name(number)
            good = 0
            with open(path, "rb") as handle:
                data = handle.read()
            while good + _HEADER.size <= len(data):
                length, crc = _HEADER.unpack_from(data, good)
                body = data[good + _HEADER.size : good + _HEADER.size + length]
                if len(body) < length or zlib.crc32(body) != crc:
                    break
                good += _HEADER.size + length
            if good < len(data):
                log.warning("spool segment %s: dropping %d bytes of an unfinished write", path.name, len(data) - good)
                with open(path, "r+b") as handle:
                    handle.truncate(good)
                    os.fsync(handle.fileno())

    def _backlog_bytes(self) -> int:
        total = 0
        for number in self._segments():
            if number < self.committed.segment:
                continue
            size = (self.directory / _segment_name(number)).stat().st_size
            total += size - (self.committed.offset if number == self.committed.segment else 0)
        return total

    def _count_backlog_rows(self) -> int:
        rows = 0
        position = self.committed
        for _, body, _next in self._frames(position, None):
            rows += body.count(b"\n")
        return rows

    # -- appending (request threads) ----------------------------------------------------------

    def append(self, payload: bytes, rows: int) -> None:
        """Append one frame and return once it is durable (with fsync on)."""
        frame = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        with self._lock:
            if self.closed:
                raise SpoolFull("the exporter is shutting down")
            if self.pending_bytes + len(frame) > self.max_bytes:
                self.refusing = True
                raise SpoolFull("the durable buffer is full")
            try:
                written = os.write(self._fd, frame)
                if written != len(frame):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as exc:
                # A partial frame would hide every later one from the reader: cut it off.
                os.ftruncate(self._fd, self._offset)
                self.refusing = True
                raise SpoolFull(f"the durable buffer cannot be written ({exc.strerror or exc})") from None
            self._offset += len(frame)
            self._written_bytes += len(frame)
            self.pending_bytes += len(frame)
            self.pending_rows += rows
            if self.oldest_append is None:
                self.oldest_append = time.monotonic()
            ticket = self._written_bytes
            rotate = self._offset >= self.segment_bytes
        if rotate:
            # Same lock order as _sync_through, so no fsync runs on a descriptor being closed.
            with self._sync_lock, self._lock:
                if self._offset >= self.segment_bytes:
                    self._rotate_locked()
        if self.fsync_enabled:
            self._sync_through(ticket)
        else:
            with self._lock:
                self._mark_synced_locked()
        with self._lock:
            self._data_ready.notify_all()

    def _mark_synced_locked(self) -> None:
        self._synced_bytes = self._written_bytes
        self._synced_position = Position(self._segment, self._offset)

    def _sync_through(self, ticket: int) -> None:
        with self._sync_lock:
            if self._synced_bytes >= ticket:
                return
            with self._lock:
                fd = self._fd
                target_bytes = self._written_bytes
                target_position = Position(self._segment, self._offset)
            try:
                os.fdatasync(fd)
            except OSError as exc:
                raise SpoolFull(f"the durable buffer cannot be synced ({exc.strerror or exc})") from None
            with self._lock:
                self._synced_bytes = max(self._synced_bytes, target_bytes)
                self._synced_position = max(self._synced_position, target_position)

    def _rotate_locked(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._segment += 1
        self._offset = 0
        self._fd = os.open(self.directory / _segment_name(self._segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_dir(self.directory)
        # Everything in the closed segment is durable now.
        if self._synced_position.segment < self._segment:
            self._synced_bytes = self._written_bytes
            self._synced_position = Position(self._segment, 0)

    # -- reading (the flusher) ----------------------------------------------------------------

    def _frames(self, start: Position, stop: Position | None):
        """Yield (position, body, next position) for each frame from ``start`` up to ``stop``."""
        for number in self._segments():
            if number < start.segment or (stop is not None and number > stop.segment):
                continue
            path = self.directory / _segment_name(number)
            offset = start.offset if number == start.segment else 0
            limit = stop.offset if stop is not None and number == stop.segment else None
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read() if limit is None else handle.read(max(0, limit - offset))
            cursor = 0
            while cursor + _HEADER.size <= len(data):
                length, crc = _HEADER.unpack_from(data, cursor)
                body = data[cursor + _HEADER.size : cursor + _HEADER.size + length]
                if len(body) < length or zlib.crc32(body) != crc:
                    break
                here = Position(number, offset + cursor)
                cursor += _HEADER.size + length
                yield here, body, Position(number, offset + cursor)

    def wait_for_data(self, timeout: float) -> None:
        with self._lock:
            if self.pending_rows == 0 and not self.closed:
                self._data_ready.wait(timeout)

    def next_batch(self, max_rows: int) -> Batch | None:
        """The batch to send next: the one in flight (after a crash or failure), else a new one."""
        if self.in_flight is not None:
            if not self.in_flight.payload:
                parts = [body for _, body, _ in self._frames(self.in_flight.start, self.in_flight.end)]
                payload = b"".join(parts)
                self.in_flight = Batch(self.in_flight.start, self.in_flight.end, payload, payload.count(b"\n"), self.in_flight.token)
            return self.in_flight
        with self._lock:
            stop = self._synced_position if self.fsync_enabled else Position(self._segment, self._offset)
        parts: list[bytes] = []
        rows = 0
        end = self.committed
        for _, body, after in self._frames(self.committed, stop):
            parts.append(body)
            rows += body.count(b"\n")
            end = after
            if rows >= max_rows:
                break
        if not parts:
            # The committed position may sit at the end of an older segment; skip to the next.
            return None
        start = self.committed
        token = f"{self.spool_id}-{start.segment}-{start.offset}-{end.segment}-{end.offset}"
        batch = Batch(start, end, b"".join(parts), rows, token)
        self._save_checkpoint(self.committed, batch)
        self.in_flight = batch
        return batch

    def commit(self, batch: Batch) -> None:
        """Record ``batch`` as stored in ClickHouse and free the segments it finished."""
        self._save_checkpoint(batch.end, None)
        freed = batch.end.segment
        with self._lock:
            self.committed = batch.end
            self.in_flight = None
            self.refusing = False
            self.pending_rows = max(0, self.pending_rows - batch.rows)
            self.pending_bytes = max(0, self.pending_bytes - self._span_bytes(batch))
            self.oldest_append = time.monotonic() if self.pending_rows else None
            current = self._segment
        for number in self._segments():
            if number < freed and number < current:
                (self.directory / _segment_name(number)).unlink(missing_ok=True)
        self._skip_finished_segment()

    def _span_bytes(self, batch: Batch) -> int:
        if batch.start.segment == batch.end.segment:
            return batch.end.offset - batch.start.offset
        total = 0
        for number in range(batch.start.segment, batch.end.segment + 1):
            path = self.directory / _segment_name(number)
            size = path.stat().st_size if path.exists() else 0
            if number == batch.start.segment:
                total += size - batch.start.offset
            elif number == batch.end.segment:
                total += batch.end.offset
            else:
                total += size
        return total

    def _skip_finished_segment(self) -> None:
        """Move the committed position past a fully read, closed segment."""
        if self.in_flight is not None:
            return
        with self._lock:
            current = self._segment
        position = self.committed
        while position.segment < current:
            path = self.directory / _segment_name(position.segment)
            size = path.stat().st_size if path.exists() else 0
            if position.offset < size:
                return
            following = [n for n in self._segments() if n > position.segment]
            position = Position(following[0] if following else current, 0)
            with self._lock:
                self.committed = position
            self._save_checkpoint(position, None)
            path.unlink(missing_ok=True)

    def _save_checkpoint(self, committed: Position, in_flight: Batch | None) -> None:
        data: dict[str, object] = {"committed": [committed.segment, committed.offset]}
        if in_flight is not None:
            data["in_flight"] = {
                "start": [in_flight.start.segment, in_flight.start.offset],
                "end": [in_flight.end.segment, in_flight.end.offset],
                "rows": in_flight.rows,
                "token": in_flight.token,
            }
        self._checkpoint.save(data)

    def oldest_age(self) -> float:
        with self._lock:
            return 0.0 if self.oldest_append is None else time.monotonic() - self.oldest_append

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._data_ready.notify_all()
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._checkpoint.close()
        os.close(self._lock_fd)
