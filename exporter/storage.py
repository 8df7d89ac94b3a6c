"""ClickHouse through clickhouse-connect, the same way for embedded chDB and a server.

The only place that builds clients, applies ``clickhouse/*.sql``, and knows the table names.
``chdb://path`` gives an in-process ClickHouse on disk; ``http(s)://user:pass@host:8123/db`` a
server. Nothing outside :func:`_client_for` cares which.

Three clients share one store, each with its own connection handle (chDB serialises the queries
of one handle): the writer's inserts never wait behind a dashboard query, and the ad-hoc SQL
client carries ``readonly=1`` for its whole life because a per-query ``readonly`` cannot be
lifted again on a chDB handle.
"""

from __future__ import annotations

import logging
import threading
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import clickhouse_connect
import msgspec
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from .config import Config, ModelEntry

log = logging.getLogger(__name__)

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "clickhouse"
REQUESTS_TABLE = "requests"
MODELS_TABLE = "models"
REQUEST_IDS_TABLE = "request_ids"
# Tables whose rows expire after clickhouse.retention_days, with the time column the TTL reads.
RETAINED_TABLES = {
    REQUESTS_TABLE: "timestamp",
    REQUEST_IDS_TABLE: "timestamp",
    # The usage rollups (clickhouse/040_usage_rollups.sql) expire with the rows they summarise.
    "usage_by_org_1m": "minute",
    "usage_by_token_1m": "minute",
    "usage_by_user_1m": "minute",
    "usage_by_org_1h": "hour",
    "usage_by_token_1h": "hour",
    "usage_by_user_1h": "hour",
}
# Tables that keep only recent rows whatever the retention: table -> (time column, days kept).
RECENT_TABLES = {"usage_recent_requests": ("timestamp", 8)}
# Column order of ``requests`` as the writer sends it (records.Row follows it).
STORAGE_ERRORS: tuple[type[BaseException], ...] = (ClickHouseError, OSError)


_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+[A-Za-z][A-Za-z0-9]*\s*;?\s*$", re.IGNORECASE)


class StorageError(Exception):
    """ClickHouse could not be reached or refused an operation; the message is safe to show."""


class QueryRefused(Exception):
    """ClickHouse refused an engineer's ad-hoc query; the message says why in one line."""


def _explain_refusal(exc: BaseException) -> str:
    message = _first_line(exc)
    if "readonly mode" in message or "(READONLY)" in message:
        return "The query was refused: ad-hoc SQL is read-only (no INSERT, ALTER, CREATE, DROP or SET)."
    return message


@dataclass(frozen=True)
class Target:
    """Where the store lives, with the password kept out of anything printable."""

    dsn: str
    database: str
    embedded: bool

    @property
    def display(self) -> str:
        return redact_dsn(self.dsn)


def redact_dsn(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def resolve_target(config: Config) -> Target:
    """The DSN's own database wins for server DSNs (``http://host:8123/dbname``), as the contract says."""
    dsn = config.clickhouse_dsn
    if dsn.startswith("chdb://"):
        return Target(dsn=dsn, database=config.clickhouse.database, embedded=True)
    parts = urlsplit(dsn)
    database = unquote(parts.path.strip("/")) or config.clickhouse.database
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", database):
        raise StorageError(f"the database {database!r} in the ClickHouse DSN is not a plain identifier")
    return Target(dsn=urlunsplit(parts._replace(path="")), database=database, embedded=False)


def _client_for(target: Target, config: Config, settings: Mapping[str, Any] | None = None) -> Client:
    kwargs: dict[str, Any] = {"dsn": target.dsn, "settings": dict(settings or {})}
    if not target.embedded:
        # Sessions would serialise the threads that share this client.
        kwargs.update(
            autogenerate_session_id=False,
            connect_timeout=config.clickhouse.connect_timeout_s,
            send_receive_timeout=config.clickhouse.query_timeout_s,
            query_retries=0,
        )
    try:
        return clickhouse_connect.get_client(**kwargs)
    except STORAGE_ERRORS as exc:
        raise StorageError(f"cannot connect to ClickHouse at {target.display}: {_first_line(exc)}") from None
    except Exception as exc:  # chDB raises its own errors for a locked or unreadable directory
        raise StorageError(f"cannot open ClickHouse at {target.display}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _render(sql: str, database: str, retention_days: int) -> str:
    ttl = (
        f"TTL toDateTime(timestamp) + toIntervalDay({retention_days})"
        if retention_days > 0
        else ""
    )
    return string.Template(sql).substitute(database=database, retention_ttl=ttl)


def schema_statements(database: str, retention_days: int, schema_dir: Path = SCHEMA_DIR) -> list[str]:
    """Every statement of ``clickhouse/*.sql`` in file-name order, ready to run."""
    statements = []
    for path in sorted(schema_dir.glob("*.sql")):
        text = _render(path.read_text(encoding="utf-8"), database, retention_days)
        for statement in _split_statements(text):
            statements.append(statement)
    return statements


def _split_statements(text: str) -> Iterable[str]:
    """Statements end with ';' at the end of a line (a ';' inside a COMMENT string stays)."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    for chunk in re.split(r";[ \t]*$", "\n".join(lines), flags=re.MULTILINE):
        if chunk.strip():
            yield chunk.strip()


# Settings of every insert into ``requests`` (the writer's and the importer's).
REQUESTS_INSERT_SETTINGS: Mapping[str, Any] = {
    # A batch may span any of the ~1200 months validation allows (backfills do); past the default
    # cap of 100 partitions per block ClickHouse would refuse it on every retry.
    "max_partitions_per_insert_block": 0,
    # The rollups' and request_ids' engines would merge the rows of a key inside the insert;
    # background merges do that anyway and every read sums or DISTINCTs, so leaving it to them
    # makes the insert cheaper (docs/benchmarks.md).
    "optimize_on_insert": 0,
}


class _Timestamp(msgspec.Struct):
    timestamp: str = ""


_timestamp_decoder = msgspec.json.Decoder(_Timestamp)


def partition_of(line: bytes) -> str:
    """The ``requests`` partition (``PARTITION BY toYYYYMM(timestamp)``) of one JSONEachRow line."""
    stamp = _timestamp_decoder.decode(line).timestamp  # 'YYYY-MM-DD hh:mm:ss.mmm', as records encode it
    return stamp[0:4] + stamp[5:7]


class Store:
    """The store: a writer client, a reader client, and (lazily) a read-only ad-hoc SQL client."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.target = resolve_target(config)
        self.database = self.target.database
        # Clients are built on first use: a ClickHouse server that is down at start-up must not
        # keep the exporter from accepting records into its spool.
        self._writer: Client | None = None
        self._reader: Client | None = None
        self._sql: Client | None = None
        self._lock = threading.Lock()
        self.migrated = False

    @property
    def writer(self) -> Client:
        with self._lock:
            if self._writer is None:
                self._writer = _client_for(
                    self.target,
                    self.config,
                    # Rollup tables must drop a replayed block exactly when the raw table does.
                    {"deduplicate_blocks_in_dependent_materialized_views": 1},
                )
            return self._writer

    @property
    def reader(self) -> Client:
        with self._lock:
            if self._reader is None:
                client = _client_for(self.target, self.config)
                client.database = self.database
                self._reader = client
            return self._reader

    def migrate(self, catalog: bool = True) -> None:
        """Apply the schema (idempotent), the retention TTL, and (unless ``catalog`` is False) the
        model catalog. Tools that only add rows (importers) leave the catalog to serve/migrate,
        which run with the deployment's config."""
        config = self.config
        writer = self.writer
        try:
            for statement in schema_statements(self.database, config.clickhouse.retention_days):
                writer.command(statement)
            self._apply_retention(config.clickhouse.retention_days)
            if catalog:
                self.sync_models(config.models)
        except STORAGE_ERRORS as exc:
            raise StorageError(f"cannot apply the schema to {self.target.display}: {_first_line(exc)}") from None
        writer.database = self.database
        self.migrated = True

    def ensure_migrated(self) -> None:
        if not self.migrated:
            self.migrate()

    def _apply_retention(self, days: int) -> None:
        """CREATE IF NOT EXISTS keeps an old TTL, so a changed retention is applied here."""
        targets = [(table, column, days) for table, column in RETAINED_TABLES.items()]
        targets += [(table, column, min(days, cap) if days > 0 else cap) for table, (column, cap) in RECENT_TABLES.items()]
        for table, column, table_days in targets:
            name = f"{self.database}.{table}"
            create = str(self.writer.command(f"SHOW CREATE TABLE {name}"))
            has_ttl = "TTL " in create
            if table_days > 0 and f"toIntervalDay({table_days})" not in create:
                self.writer.command(f"ALTER TABLE {name} MODIFY TTL toDateTime({column}) + toIntervalDay({table_days})")
            elif table_days <= 0 and has_ttl:  # a TTL already at the configured days stays
                self.writer.command(f"ALTER TABLE {name} REMOVE TTL")

    def sync_models(self, models: Sequence[ModelEntry]) -> None:
        """Make ``models`` hold exactly the configured catalog."""
        table = f"{self.database}.{MODELS_TABLE}"
        names = [m.name for m in models]
        current = {
            (row[0], row[1])
            for row in self.writer.query(f"SELECT model, endpoint FROM {table}").result_rows
        }
        wanted = {(m.name, m.endpoint) for m in models}
        if current == wanted:
            return
        stale = [name for name, _ in current - wanted]
        if stale:
            self.writer.command(
                f"DELETE FROM {table} WHERE model IN {{stale:Array(String)}}",
                parameters={"stale": stale},
            )
        missing = sorted(wanted - current)
        if missing:
            self.writer.insert(table, [list(pair) for pair in missing], column_names=["model", "endpoint"])
        log.info("model catalog holds %d models", len(names))

    def insert_rows(self, payload: bytes, dedup_token: str, fmt: str = "JSONEachRow",
                    column_names: Sequence[str] | None = None, retry: bool = False) -> None:
        """Insert rows (``JSONEachRow`` lines, or ``fmt`` in ``column_names`` order) into ``requests``.

        The token names the batch: it is stored with every row (``ingest_batch``) and lets the
        views' tables drop blocks they already hold. ``retry`` says an earlier attempt with this
        token may have landed (it failed, or the process died during it): the partitions of
        ``requests`` that already hold the batch are then left out, since ``requests`` itself
        keeps no de-duplication window (see clickhouse/010_requests.sql).
        """
        if retry:
            landed = self.batch_partitions(dedup_token)
            if landed:
                if fmt != "JSONEachRow":
                    raise ValueError("only JSONEachRow batches can be resumed partition by partition")
                payload = b"".join(line for line in payload.splitlines(keepends=True) if partition_of(line) not in landed)
                log.warning("batch %s was already stored in partitions %s; sending the rest", dedup_token, sorted(landed))
                if not payload:
                    return
        self.writer.raw_insert(
            f"{self.database}.{REQUESTS_TABLE}",
            list(column_names) if column_names else None,
            payload,
            fmt=fmt,
            settings={"insert_deduplication_token": dedup_token, **REQUESTS_INSERT_SETTINGS},
        )

    def batch_partitions(self, dedup_token: str) -> set[str]:
        """The partitions of ``requests`` that hold rows of the batch ``dedup_token``."""
        result = self.writer.query(
            f"SELECT DISTINCT _partition_id FROM {self.database}.{REQUESTS_TABLE} WHERE ingest_batch = {{batch:String}}",
            parameters={"batch": dedup_token},
        )
        return {row[0] for row in result.result_rows}

    def existing_request_ids(self, request_ids: Sequence[str]) -> set[str]:
        """The ids among ``request_ids`` that ``requests`` holds.

        ``request_ids`` is filled by a view, which may have received a batch whose own insert
        into ``requests`` was cut by a crash; an id counts only when its batch is in ``requests``.
        """
        if not request_ids:
            return set()
        result = self.writer.query(
            f"SELECT DISTINCT request_id, ingest_batch, toString(toYYYYMM(timestamp)) FROM {self.database}.{REQUEST_IDS_TABLE} "
            # A subquery over arrayJoin, not a literal IN-list: chDB plans a 50,000-id literal
            # list slowly (seconds to a minute), the subquery in a fraction of a second.
            "WHERE request_id IN (SELECT arrayJoin({ids:Array(String)}))",
            parameters={"ids": list(request_ids)},
        )
        found = result.result_rows
        named = [(batch, partition) for _, batch, partition in found if batch]
        confirmed: set[tuple[str, str]] = set()
        if named:
            # Per batch and partition: a crash between the parts of a multi-month batch leaves some.
            confirmed = set(self.writer.query(
                f"SELECT DISTINCT ingest_batch, _partition_id FROM {self.database}.{REQUESTS_TABLE} "
                "WHERE ingest_batch IN {batches:Array(String)} AND _partition_id IN {partitions:Array(String)}",
                parameters={"batches": sorted({b for b, _ in named}), "partitions": sorted({p for _, p in named})},
            ).result_rows)
        # Ids stored without a batch name (older rows, other writers) cannot be checked: trusted.
        return {rid for rid, batch, partition in found if not batch or (batch, partition) in confirmed}

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return self.reader.query(sql, parameters=dict(parameters or {})).result_rows

    def ping(self) -> str | None:
        """None when ClickHouse answers, else why not."""
        try:
            self.reader.command("SELECT 1")
            return None
        except StorageError as exc:
            return str(exc)
        except STORAGE_ERRORS as exc:
            return f"ClickHouse at {self.target.display} does not answer: {_first_line(exc)}"

    def adhoc_sql(self, sql: str, fmt: str) -> bytes:
        """Run an engineer's query read-only, within the configured time and size limits."""
        with self._lock:
            self._build_sql_client()
        # A query that names its own FORMAT keeps it; appending a second one is a syntax error.
        own_format = _TRAILING_FORMAT.search(sql)
        assert self._sql is not None
        try:
            return self._sql.raw_query(sql.rstrip().rstrip(";") if own_format else sql, fmt=None if own_format else fmt)
        except ClickHouseError as exc:
            raise QueryRefused(_explain_refusal(exc)) from None

    def _build_sql_client(self) -> None:
        if self._sql is None:
            limits = self.config.sql
            self._sql = _client_for(
                self.target,
                self.config,
                {
                    "max_execution_time": limits.max_execution_time_s,
                    "max_result_rows": limits.max_result_rows,
                    "max_result_bytes": limits.max_result_bytes,
                    "result_overflow_mode": "throw",
                    # Last: once set, no further setting can change, including itself.
                    "readonly": 1,
                },
            )
            self._sql.database = self.database

    def close(self) -> None:
        for client in (self._sql, self._reader, self._writer):
            if client is not None:
                try:
                    client.close()
                except STORAGE_ERRORS:
                    pass
