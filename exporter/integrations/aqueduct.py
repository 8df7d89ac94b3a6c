"""Import the request log of an Aqueduct gateway (TU-Wien-dataLAB/aqueduct) from its PostgreSQL.

Aqueduct logs every API request as a row of ``management_request`` that points at a
``management_token``; the token belongs to a Django user (``auth_user``, whose
``management_userprofile`` names the org) and, for service-account tokens, to a
``management_serviceaccount`` of a ``management_team`` of an org. One SQL statement joins them and
lets PostgreSQL render each row as the ``JSONEachRow`` line of our ``requests`` table, streamed out
with ``COPY ... TO STDOUT``: Python never touches a single field, which is what keeps the backfill
near the speed of a plain ``COPY`` (see docs/benchmarks.md).

How fields map (the contract's record on the left):

- ``org``: the service account's team's org for service-account tokens, else the token user's
  profile org; ``(unknown)`` when neither exists (a user without a profile, or a row whose token is
  gone in a database without foreign keys).
- ``token_name``, ``token_owner`` (the token user's email; empty for service-account tokens, as the
  contract says), ``service_account``, ``team`` (the service account's team), ``user_id``, ``path``,
  ``method``, ``model``, tokens: as stored. ``endpoint`` is derived from ``path`` by the contract's
  rule, which is also how Aqueduct's page splits completion and embedding latency.
- ``status_code``: NULL (a request that never finished) becomes 0, "unknown", which counts as a
  request but not as a failure; ``response_time_ms`` NULL stays NULL.
- ``request_id``: ``aqueduct-<row id>``, so any re-import is dropped by the store's de-duplication.

Rows are read in id order above a watermark (the last imported id), which is saved after every
chunk under ``<data_dir>/importers/`` so ``--follow`` and re-runs resume where they stopped. Aqueduct
inserts a row when a request starts and updates it when the request ends, so only rows older than
``settle_s`` (by the database's clock) are imported; younger ones wait for the next poll.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import argparse

    import psycopg

    from ..config import Config

log = logging.getLogger(__name__)

REQUEST_ID_PREFIX = "aqueduct-"
UNKNOWN_ORG = "(unknown)"
LOOKUP_SLICE = 10_000
REQUIRED_TABLES = (
    "management_request", "management_token", "auth_user", "management_userprofile",
    "management_org", "management_serviceaccount", "management_team",
)


class ImportFailed(Exception):
    """The import cannot go on; the message is one sentence for the operator."""


# Each column of ``requests`` (records.Row's fields, in order) as an expression over Aqueduct's tables.
# {user_id} is the column, or '' for Aqueduct databases from before migration 0007 added it;
# COALESCE(r.model, '') covers those from before migration 0009 made model NOT NULL.
COLUMNS: dict[str, str] = {
    # UTC as 'YYYY-MM-DD hh:mm:ss[.ffffff]' (DateStyle ISO, set per connection). ClickHouse keeps the
    # milliseconds and truncates the rest, so no row moves into the next minute of Aqueduct's buckets.
    "timestamp": """r."timestamp" AT TIME ZONE 'UTC'""",
    "org": "COALESCE(sa_org.name, profile_org.name, {unknown_org})",
    "model": "COALESCE(r.model, '')",
    # The contract's rule, and the split Aqueduct's page makes with path__icontains.
    "endpoint": "CASE WHEN r.path ILIKE '%completion%' THEN 'completion' "
                "WHEN r.path ILIKE '%embedding%' THEN 'embedding' ELSE 'other' END",
    "status_code": "COALESCE(r.status_code, 0)",
    "path": "r.path",
    "method": "r.method",
    "response_time_ms": "r.response_time_ms",
    "input_tokens": "r.input_tokens",
    "output_tokens": "r.output_tokens",
    "token_name": "COALESCE(t.name, '(deleted token ' || r.token_id || ')')",
    "token_owner": "CASE WHEN t.service_account_id IS NULL THEN COALESCE(u.email, '') ELSE '' END",
    "service_account": "COALESCE(sa.name, '')",
    "team": "COALESCE(team.name, '')",
    "user_id": "{user_id}",
    "request_id": "{prefix} || r.id",
}
_FROM = """
FROM management_request r
LEFT JOIN management_token t ON t.id = r.token_id
LEFT JOIN auth_user u ON u.id = t.user_id
LEFT JOIN management_userprofile p ON p.user_id = t.user_id
LEFT JOIN management_org profile_org ON profile_org.id = p.org_id
LEFT JOIN management_serviceaccount sa ON sa.id = t.service_account_id
LEFT JOIN management_team team ON team.id = sa.team_id
LEFT JOIN management_org sa_org ON sa_org.id = team.org_id
WHERE r.id > {after} AND r.id <= {last} {since_filter}
ORDER BY r.id
"""
_SELECT = "SELECT " + ",\n       ".join(COLUMNS.values()) + _FROM


@dataclass(frozen=True)
class ImportSettings:
    postgres_dsn: str
    since: datetime | None = None
    settle_s: float = 120.0
    batch_rows: int = 50_000
    poll_interval_s: float = 5.0


class AqueductSource:
    """Reads Aqueduct's tables; one autocommit connection, reopened after a failure."""

    def __init__(self, dsn: str, connect_timeout_s: float = 10.0) -> None:
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self._conn: psycopg.Connection | None = None
        self._has_user_id = True

    @property
    def display(self) -> str:
        """Host, port and database, never the password."""
        if "://" in self.dsn:
            parts = urlsplit(self.dsn)
            return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"
        fields = dict(re.findall(r"(\w+)\s*=\s*'?([^'\s]*)'?", self.dsn))
        return f"{fields.get('host', 'localhost')}:{fields.get('port', 5432)}/{fields.get('dbname', '')}"

    def _connection(self) -> psycopg.Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            import psycopg
        except ImportError:
            raise ImportFailed("the Aqueduct importer needs psycopg: pip install 'llm-usage-exporter[postgres]'") from None
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self.connect_timeout_s)),
                                   application_name="usage-exporter import aqueduct", client_encoding="UTF8")
            conn.execute("SET DateStyle = 'ISO, YMD'")  # the text form of timestamps ClickHouse reads
        except psycopg.Error as exc:
            raise ImportFailed(f"cannot connect to Aqueduct's PostgreSQL at {self.display}: {_first_line(exc)}") from None
        except Exception as exc:  # libpq rejects a malformed DSN with its own ProgrammingError/ValueError
            raise ImportFailed(f"cannot use the PostgreSQL DSN for {self.display}: {_first_line(exc)}") from None
        missing = [t for t in REQUIRED_TABLES if conn.execute("SELECT to_regclass(%s)", [t]).fetchone()[0] is None]
        if missing:
            conn.close()
            raise ImportFailed(f"the database at {self.display} has no {', '.join(missing)} table: is it Aqueduct's database?")
        self._has_user_id = conn.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_name = 'management_request' AND column_name = 'user_id'"
            " AND table_schema = ANY(current_schemas(false))"
        ).fetchone() is not None
        self._conn = conn
        return conn

    def connect(self) -> None:
        self._connection()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _scalar(self, query: str, params: list[Any]) -> Any:
        row = self._connection().execute(query, params).fetchone()
        return row[0] if row else None

    def first_id_since(self, since: datetime) -> int:
        """The watermark that starts an import at ``since``: the id before the first row at or after it."""
        first = self._scalar('SELECT min(id) FROM management_request WHERE "timestamp" >= %s', [since])
        return (first - 1) if first is not None else self.max_id()

    def max_id(self) -> int:
        return int(self._scalar("SELECT COALESCE(max(id), 0) FROM management_request", []))

    def settled_bound(self, after_id: int, settle_s: float) -> int:
        """Rows with ``after_id < id < bound`` are settled: older than ``settle_s`` and no younger row below them.

        Ids come from a sequence when a request starts, so the first young row is where the settled
        part ends; younger rows, and any row behind them, wait for a later pass.
        """
        first_young = self._scalar(
            'SELECT min(id) FROM management_request WHERE id > %s AND "timestamp" > now() - make_interval(secs => %s)',
            [after_id, settle_s],
        )
        return int(first_young) if first_young is not None else self.max_id() + 1

    def count(self, after_id: int, bound: int, since: datetime | None) -> int:
        query = "SELECT count(*) FROM management_request WHERE id > %s AND id < %s"
        params: list[Any] = [after_id, bound]
        if since is not None:
            query += ' AND "timestamp" >= %s'
            params.append(since)
        return int(self._scalar(query, params))

    def chunk_end(self, after_id: int, bound: int, rows: int, since: datetime | None) -> int | None:
        """The id of the last row of the next chunk of at most ``rows`` rows, or None when none is left."""
        since_filter = 'AND "timestamp" >= %s' if since is not None else ""
        params: list[Any] = [after_id, bound] + ([since] if since is not None else []) + [rows]
        last = self._scalar(
            f"SELECT max(id) FROM (SELECT id FROM management_request WHERE id > %s AND id < %s {since_filter}"
            " ORDER BY id LIMIT %s) AS chunk",
            params,
        )
        return int(last) if last is not None else None

    def rows(self, after_id: int, last_id: int, since: datetime | None) -> bytes:
        """The rows with ``after_id < id <= last_id`` as TabSeparated lines in :data:`COLUMNS` order.

        PostgreSQL's COPY text format and ClickHouse's TabSeparated agree: tab-separated, one row a
        line, ``\\N`` for NULL, and the same backslash escapes for backslash, tab, newline, CR and
        the other control characters; so the bytes go to ClickHouse as they come.
        """
        from psycopg import sql

        statement = sql.SQL(_SELECT).format(
            unknown_org=sql.Literal(UNKNOWN_ORG),
            user_id=sql.SQL("r.user_id") if self._has_user_id else sql.Literal(""),
            prefix=sql.Literal(REQUEST_ID_PREFIX),
            after=sql.Literal(after_id),
            last=sql.Literal(last_id),
            since_filter=sql.SQL('AND r."timestamp" >= {}').format(sql.Literal(since)) if since is not None else sql.SQL(""),
        )
        chunks: list[bytes] = []
        with self._connection().cursor() as cur:
            with cur.copy(sql.SQL("COPY ({}) TO STDOUT").format(statement)) as copy:
                for block in copy:
                    chunks.append(bytes(block))
        return b"".join(chunks)


class Sink(Protocol):
    """The store, as the importer uses it (exporter.storage.Store)."""

    database: str

    def insert_rows(self, payload: bytes, dedup_token: str, fmt: str = ..., column_names: Sequence[str] | None = ...) -> None: ...

    def existing_request_ids(self, request_ids: list[str]) -> set[str]: ...

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]: ...


def insert_tsv(store: Sink, payload: bytes, dedup_token: str) -> None:
    """Insert TabSeparated rows in :data:`COLUMNS` order into ``requests``, as the writer inserts."""
    store.insert_rows(payload, dedup_token, fmt="TabSeparated", column_names=COLUMNS)


def _request_ids(payload: bytes) -> list[bytes]:
    """The request_id (last column) of every TSV line."""
    return [line[line.rindex(b"\t") + 1:] for line in payload.splitlines()]


class Watermark:
    """The last imported Aqueduct id, in a small JSON file written atomically after every chunk."""

    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.source = source

    def load(self) -> int | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return int(data["last_id"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ImportFailed(f"the watermark file {self.path} is unreadable ({exc}); delete it to resume from the store") from None

    def save(self, last_id: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        body = {"source": self.source, "last_id": last_id, "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        temporary.write_text(json.dumps(body) + "\n", encoding="utf-8")
        os.replace(temporary, self.path)


def watermark_for(data_dir: str | Path, source: AqueductSource, store_display: str, database: str) -> Watermark:
    """One watermark per (Aqueduct database, our store): importing elsewhere starts its own."""
    key = hashlib.sha256(f"{source.display}\n{store_display}\n{database}".encode()).hexdigest()[:16]
    return Watermark(Path(data_dir) / "importers" / f"aqueduct-{key}.json", source.display)


def stored_watermark(store: Sink) -> int:
    """The highest Aqueduct id already in the store: where to resume when the watermark file is lost."""
    from ..storage import REQUEST_IDS_TABLE

    rows = store.query(
        f"SELECT max(toUInt64OrZero(substring(request_id, {len(REQUEST_ID_PREFIX) + 1}))) FROM {REQUEST_IDS_TABLE} "
        "WHERE startsWith(request_id, {prefix:String})",
        {"prefix": REQUEST_ID_PREFIX},
    )
    return int(rows[0][0] or 0) if rows else 0


@dataclass
class PassResult:
    written: int = 0
    duplicates: int = 0
    last_id: int = 0


ProgressFn = Callable[[int, int], None]


class AqueductImporter:
    def __init__(self, source: AqueductSource, store: Sink, watermark: Watermark, settings: ImportSettings,
                 progress: ProgressFn | None = None) -> None:
        self.source = source
        self.store = store
        self.watermark = watermark
        self.settings = settings
        self.progress = progress
        self._last_id: int | None = None
        self._stored_high = 0  # the highest Aqueduct id in the store when this importer started
        self._random = random.Random()

    def _drop_stored(self, payload: bytes) -> tuple[bytes, int]:
        """Remove the lines whose request_id the store already holds, asked in slices of 10,000 ids:
        the lookup's cost grows faster than its list (25,000 ids 0.26 s, 100,000 ids 2.7 s)."""
        ids = _request_ids(payload)
        wanted = [rid.decode() for rid in ids]
        stored: set[str] = set()
        for start in range(0, len(wanted), LOOKUP_SLICE):
            stored |= self.store.existing_request_ids(wanted[start:start + LOOKUP_SLICE])
        if not stored:
            return payload, 0
        kept = [line for line, rid in zip(payload.splitlines(keepends=True), wanted, strict=True) if rid not in stored]
        return b"".join(kept), len(ids) - len(kept)

    def resume_point(self) -> int:
        """Where the next pass starts: the saved watermark, else what the store holds, else ``--since``."""
        if self._last_id is not None:
            return self._last_id
        self._stored_high = stored_watermark(self.store)
        saved = self.watermark.load()
        if saved is None and self._stored_high:
            saved = self._stored_high
            log.info("no watermark file; resuming after Aqueduct id %d, the highest one in the store", saved)
        if not saved and self.settings.since is not None:
            saved = self.source.first_id_since(self.settings.since)
        self._last_id = saved or 0
        return self._last_id

    def _fetch(self, after: int, bound: int) -> tuple[int | None, bytes]:
        """The next chunk after ``after``: its last id (None: nothing left) and its rows."""
        last = self.source.chunk_end(after, bound, self.settings.batch_rows, self.settings.since)
        return last, (self.source.rows(after, last, self.settings.since) if last is not None else b"")

    def run_once(self, stop: threading.Event | None = None) -> PassResult:
        """Import every settled row above the watermark, in chunks; stop early (between chunks) on ``stop``.

        While ClickHouse takes one chunk, PostgreSQL already renders the next (one worker thread
        owns the PostgreSQL connection), so the pass runs at the speed of the slower side.
        """
        from concurrent.futures import ThreadPoolExecutor

        settings = self.settings
        after = self.resume_point()
        bound = self.source.settled_bound(after, settings.settle_s)
        total = self.source.count(after, bound, settings.since) if self.progress else 0
        result = PassResult(last_id=after)
        done = 0
        if self.progress and total:
            self.progress(0, total)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="aqueduct-read") as reader:
            pending = reader.submit(self._fetch, after, bound)
            while True:
                last, payload = pending.result()
                if last is None or (stop is not None and stop.is_set()):
                    break
                pending = reader.submit(self._fetch, last, bound)
                rows = payload.count(b"\n")
                duplicates = 0
                # Above the highest id the store held when this importer started, nobody else writes
                # (one importer per Aqueduct database), so only a re-read below it needs the lookup.
                if after < self._stored_high:
                    payload, duplicates = self._drop_stored(payload)
                if payload:
                    digest = hashlib.sha256(payload).hexdigest()[:16]
                    insert_tsv(self.store, payload, f"{REQUEST_ID_PREFIX}{after + 1}-{last}-{digest}")
                self.watermark.save(last)
                self._last_id = after = last
                result.written += rows - duplicates
                result.duplicates += duplicates
                result.last_id = last
                done += rows
                if self.progress and total:
                    self.progress(min(done, total), total)
            if not pending.done():
                pending.cancel()
        return result

    def follow(self, stop: threading.Event, on_pass: Callable[[PassResult], None] | None = None) -> None:
        """Poll for new rows until ``stop`` is set; failures are logged and retried with backoff."""
        from ..storage import STORAGE_ERRORS, StorageError

        failures = 0
        while not stop.is_set():
            try:
                result = self.run_once(stop)
                failures = 0
                if on_pass is not None:
                    on_pass(result)
                delay = self.settings.poll_interval_s
            except (ImportFailed, StorageError, *STORAGE_ERRORS, *_source_errors()) as exc:
                failures += 1
                self.source.close()  # a broken connection is reopened on the next pass
                delay = self._random.uniform(0, min(60.0, self.settings.poll_interval_s * 2 ** min(failures, 6)))
                log.warning("import pass failed (attempt %d, retrying in %.1fs): %s", failures, delay, _first_line(exc))
            stop.wait(delay)


def _source_errors() -> tuple[type[BaseException], ...]:
    try:
        import psycopg
    except ImportError:
        return ()
    return (psycopg.Error,)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``2026-11-01``, ``2026-11-01T08:00:00+01:00`` (no offset: UTC), or a span back from now: ``7d``, ``12h``."""
    now = now or datetime.now(timezone.utc)
    match = _RELATIVE.match(text.strip())
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ImportFailed(f"--since {text!r} is neither an ISO date/time nor a span like 7d or 12h") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


class ProgressBar:
    """A one-line bar on a terminal; elsewhere (logs, CI) a line every few seconds."""

    def __init__(self, stream: TextIO = sys.stderr, interval_s: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval_s = interval_s
        self._started = 0.0
        self._last_print = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == 0:
            self._started = self._last_print = now
            return
        finished = done >= total
        if not finished and now - self._last_print < (0.2 if self.tty else self.interval_s):
            return
        self._last_print = now
        rate = done / max(now - self._started, 1e-9)
        width = 30
        filled = int(width * done / total)
        text = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} rows ({100 * done / total:.0f}%), {rate:,.0f} rows/s"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if finished else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def add_parser(sources: argparse._SubParsersAction, storage_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """``usage-exporter import aqueduct``'s flags; the CLI calls this so they live next to their meaning."""
    parser = sources.add_parser(
        "aqueduct", help="import an Aqueduct gateway's request log from its PostgreSQL",
        description="Backfill Aqueduct's management_request rows into the store, then with --follow keep polling for new ones.",
    )
    storage_options(parser)
    parser.add_argument("--postgres-dsn", metavar="DSN",
                        help="Aqueduct's database, e.g. postgresql://user@host:5432/aqueduct (also aqueduct.postgres_dsn; libpq's PG* variables apply)")
    parser.add_argument("--since", metavar="T", help="import only requests at or after T: 2026-11-01, an ISO date-time, or a span like 7d (first run only)")
    parser.add_argument("--follow", action="store_true", help="after the backfill, keep polling for new rows until SIGTERM/SIGINT")
    parser.add_argument("--settle", type=float, metavar="SECONDS", help="import rows only once they are this old (default aqueduct.settle_s, 120)")
    parser.add_argument("--poll-interval", type=float, metavar="SECONDS", help="--follow: seconds between polls (default aqueduct.poll_interval_s, 5)")
    parser.add_argument("--batch-rows", type=int, metavar="N", help="rows per chunk (default aqueduct.batch_rows, 50000)")


def settings_from(config: Config, args: argparse.Namespace) -> ImportSettings:
    """Flags win over the config's ``aqueduct`` section (which already folds in the environment)."""
    section = config.aqueduct
    dsn = args.postgres_dsn or section.postgres_dsn
    if not dsn:
        raise ImportFailed("give Aqueduct's database with --postgres-dsn or aqueduct.postgres_dsn")
    settle = section.settle_s if args.settle is None else args.settle
    poll = section.poll_interval_s if args.poll_interval is None else args.poll_interval
    batch = section.batch_rows if args.batch_rows is None else args.batch_rows
    if settle < 0 or poll <= 0 or not 0 < batch <= 1_000_000:
        raise ImportFailed("--settle must be >= 0, --poll-interval > 0 and --batch-rows between 1 and 1000000")
    since = parse_since(args.since) if args.since else None
    return ImportSettings(postgres_dsn=dsn, since=since, settle_s=settle, batch_rows=batch, poll_interval_s=poll)


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM/SIGINT finish the chunk in hand (its watermark saved), then exit cleanly."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())


def run_command(config: Config, args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """``usage-exporter import aqueduct``: backfill, then follow when asked. Returns the exit code."""
    from ..storage import StorageError, Store

    settings = settings_from(config, args)
    source = AqueductSource(settings.postgres_dsn)
    source.connect()
    store = Store(config)
    try:
        store.migrate(catalog=False)  # the first use opens the store
    except StorageError as exc:
        store.close()
        source.close()
        hint = " (is an exporter running on it? the embedded store opens in one process at a time)" if config.clickhouse_dsn.startswith("chdb://") else ""
        raise ImportFailed(f"{exc}{hint}") from None
    if stop is None:
        stop = threading.Event()
        _stop_on_signals(stop)
    try:
        watermark = watermark_for(config.data_dir, source, store.target.display, store.database)
        importer = AqueductImporter(source, store, watermark, settings, progress=ProgressBar())
        started = time.monotonic()
        result = importer.run_once(stop)
        elapsed = time.monotonic() - started
        print(
            f"imported {result.written} Aqueduct requests from {source.display} into {store.target.display} in {elapsed:.1f}s"
            f" ({result.duplicates} already there); last id {result.last_id}",
            flush=True,
        )
        if args.follow and not stop.is_set():
            log.info("following %s every %gs (rows settle for %gs)", source.display, settings.poll_interval_s, settings.settle_s)
            importer.follow(stop, on_pass=lambda r: r.written and log.info("imported %d new requests; last id %d", r.written, r.last_id))
    finally:
        source.close()
        store.close()
    return 0


__all__ = [
    "AqueductImporter", "AqueductSource", "ImportFailed", "ImportSettings", "ProgressBar", "REQUEST_ID_PREFIX",
    "UNKNOWN_ORG", "Watermark", "add_parser", "parse_since", "run_command", "stored_watermark",
    "watermark_for",
]
