"""Every setting, its default, and where it can come from.

Precedence is flag > environment (``USAGE_EXPORTER_<KEY>``) > YAML file > default. Nested keys
map to environment names by joining their path with ``_``: ``clickhouse.dsn`` is
``USAGE_EXPORTER_CLICKHOUSE_DSN``. Environment values are read as YAML scalars or flow
collections, so ``USAGE_EXPORTER_INGEST_TOKENS='[a, b]'`` and ``USAGE_EXPORTER_PORT=9000`` work.
This is the only module that reads the environment.
"""

from __future__ import annotations

import hashlib
import os
import re
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

ENV_PREFIX = "USAGE_EXPORTER_"
DEFAULT_DATABASE = "llm_usage"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class ConfigError(Exception):
    """A configuration problem; the message is one line meant for the person running the exporter."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class ClickHouseConfig(_Section):
    dsn: str | None = None
    database: str = DEFAULT_DATABASE
    # 13 months: a year of history plus the month being compared against it.
    retention_days: Annotated[int, msgspec.Meta(ge=0)] = 395
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    query_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0


class ModelEntry(_Section, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    endpoint: Literal["completion", "embedding", "other"] = "completion"


class IngestConfig(_Section):
    tokens: list[str] = []
    max_body_bytes: Annotated[int, msgspec.Meta(gt=0)] = 16 * 1024 * 1024
    max_records: Annotated[int, msgspec.Meta(gt=0)] = 50_000
    # Bodies being decoded at once; beyond it ingest answers 503 + Retry-After immediately.
    max_inflight_bytes: Annotated[int, msgspec.Meta(gt=0)] = 64 * 1024 * 1024


class SpoolConfig(_Section):
    """The durable buffer between an acknowledged request and ClickHouse."""

    dir: str | None = None
    # Past this many unflushed bytes ingest answers 503 instead of accepting more.
    max_bytes: Annotated[int, msgspec.Meta(gt=0)] = 1024 * 1024 * 1024
    segment_bytes: Annotated[int, msgspec.Meta(gt=0)] = 64 * 1024 * 1024
    # always: fsync before every 2xx (grouped across concurrent requests); never: leave it to the OS.
    fsync: Literal["always", "never"] = "always"


class WriterConfig(_Section):
    batch_rows: Annotated[int, msgspec.Meta(gt=0)] = 100_000
    max_age_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    retry_initial_s: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    retry_max_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0


class SqlConfig(_Section):
    max_execution_time_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    max_result_rows: Annotated[int, msgspec.Meta(gt=0)] = 100_000
    max_result_bytes: Annotated[int, msgspec.Meta(gt=0)] = 64 * 1024 * 1024


class ViewerKey(_Section, kw_only=True):
    role: Literal["admin", "org", "user"]
    key: str | None = None
    key_sha256: str | None = None
    org: str | None = None
    email: str | None = None
    teams: list[str] = []

    def digest(self) -> bytes:
        """The SHA-256 of the key, which is all that is ever compared."""
        if self.key is not None:
            return hashlib.sha256(self.key.encode()).digest()
        return bytes.fromhex(self.key_sha256 or "")


class MetricsConfig(_Section):
    # Optional labels on the usage metrics; org, model, endpoint and status class are always on.
    token_name_label: bool = False
    # Per metric family, label combinations beyond this fold into the value "__other__".
    max_series: Annotated[int, msgspec.Meta(gt=0)] = 10_000


class PageConfig(_Section):
    """The built-in Usage page at ``/`` and its login session (used only when viewer keys are set)."""

    # Signs the session cookie. Unset: a random secret per process, so logins end at a restart; set it
    # when several workers serve one exporter, or each would reject the others' cookies.
    session_secret: str | None = None
    session_hours: Annotated[float, msgspec.Meta(gt=0)] = 12.0
    # Send the cookie over HTTPS only; turn on when a TLS proxy fronts the exporter.
    secure_cookie: bool = False


class AqueductConfig(_Section):
    """The Aqueduct importer (``usage-exporter import aqueduct``)."""

    # libpq DSN of Aqueduct's database; libpq's PG* variables and ~/.pgpass also apply.
    postgres_dsn: str | None = None
    # Aqueduct writes a request's row when the request starts and fills in status, latency and tokens
    # when it ends (a stream: when the stream ends). Rows younger than this wait for the next poll;
    # twice Aqueduct's default relay timeout (60 s).
    settle_s: Annotated[float, msgspec.Meta(ge=0)] = 120.0
    poll_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    batch_rows: Annotated[int, msgspec.Meta(gt=0, le=1_000_000)] = 50_000


class Config(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    data_dir: str = "./data"
    timezone: str = "UTC"
    clickhouse: ClickHouseConfig = ClickHouseConfig()
    models: list[ModelEntry] = []
    ingest: IngestConfig = IngestConfig()
    spool: SpoolConfig = SpoolConfig()
    writer: WriterConfig = WriterConfig()
    sql: SqlConfig = SqlConfig()
    viewers: list[ViewerKey] = []
    metrics: MetricsConfig = MetricsConfig()
    page: PageConfig = PageConfig()
    aqueduct: AqueductConfig = AqueductConfig()
    threads: Annotated[int, msgspec.Meta(gt=0)] = 16
    shutdown_grace_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def clickhouse_dsn(self) -> str:
        if self.clickhouse.dsn:
            return self.clickhouse.dsn
        return "chdb://" + str(Path(self.data_dir).resolve() / "clickhouse")

    @property
    def spool_dir(self) -> Path:
        return Path(self.spool.dir) if self.spool.dir else Path(self.data_dir) / "spool"


def _leaf_paths(struct_type: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every settable key path, so environment names can be matched without guessing at '_'."""
    paths = []
    for field in msgspec.structs.fields(struct_type):
        path = prefix + (field.name,)
        if isinstance(field.type, type) and issubclass(field.type, _Section):
            paths.extend(_leaf_paths(field.type, path))
        else:
            paths.append(path)
    return paths


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = {}
            tree[key] = node
        tree = node
    tree[path[-1]] = value


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in _leaf_paths(Config):
        name = ENV_PREFIX + "_".join(path).upper()
        if name in environ:
            raw = environ[name]
            try:
                value = yaml.safe_load(raw) if raw.strip() else raw
            except yaml.YAMLError:
                value = raw
            # A DSN or key that YAML reads as a number or date must stay the string it was.
            field_is_str = path[-1] in {"dsn", "database", "host", "data_dir", "timezone", "dir", "session_secret"}
            _set_path(tree, path, raw if field_is_str else value)
    return tree


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not a {type(data).__name__}")
    return data


def _check(config: Config) -> list[str]:
    problems = []
    if not _IDENTIFIER.match(config.clickhouse.database):
        problems.append(f"clickhouse.database {config.clickhouse.database!r} is not a plain identifier")
    try:
        zoneinfo.ZoneInfo(config.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        problems.append(f"timezone {config.timezone!r} is not an IANA time zone name")
    dsn = config.clickhouse_dsn
    if not dsn.startswith(("chdb://", "http://", "https://", "clickhouse://", "clickhouse+http://")):
        problems.append("clickhouse.dsn must start with chdb://, http:// or https://")
    seen_models = set()
    for entry in config.models:
        if entry.name in seen_models:
            problems.append(f"model {entry.name!r} is listed twice in models")
        seen_models.add(entry.name)
    for index, viewer in enumerate(config.viewers):
        where = f"viewers[{index}]"
        if (viewer.key is None) == (viewer.key_sha256 is None):
            problems.append(f"{where} needs exactly one of key or key_sha256")
        if viewer.key_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", viewer.key_sha256):
            problems.append(f"{where}.key_sha256 must be 64 hex digits")
        if viewer.role in ("org", "user") and not viewer.org:
            problems.append(f"{where} has role {viewer.role} and needs an org")
        if viewer.role == "user" and not viewer.email:
            problems.append(f"{where} has role user and needs an email")
    if config.writer.retry_max_s < config.writer.retry_initial_s:
        problems.append("writer.retry_max_s must not be below writer.retry_initial_s")
    if any(not token for token in config.ingest.tokens):
        problems.append("ingest.tokens must not contain an empty token")
    if config.page.session_secret is not None and len(config.page.session_secret) < 16:
        problems.append("page.session_secret must be at least 16 characters")
    return problems


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration from the file, the environment and flag ``overrides``.

    ``overrides`` is a nested mapping (``{"clickhouse": {"dsn": ...}}``) of values given as flags;
    ``None`` values mean "flag not given".
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_PREFIX + "CONFIG"):
        path = environ[ENV_PREFIX + "CONFIG"]
    tree: dict[str, Any] = _read_file(path) if path is not None else {}
    tree = _merge(tree, _env_overrides(environ))
    tree = _merge(tree, _drop_none(overrides or {}))
    try:
        config = msgspec.convert(tree, Config, str_keys=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_describe(exc)}") from None
    problems = _check(config)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return config


def _describe(exc: msgspec.ValidationError) -> str:
    """msgspec says '... - at `$.writer.batch_rows`'; people think in dotted keys."""
    text = str(exc)
    match = re.search(r" - at `\$(.*)`$", text)
    if not match:
        return text
    where = match.group(1).lstrip(".")
    message = text[: match.start()]
    message = message.replace("Object contains unknown field", "unknown key")
    return f"{where or 'top level'}: {message}" if where else message


def _drop_none(tree: Mapping[str, Any]) -> dict[str, Any]:
    result = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            nested = _drop_none(value)
            if nested:
                result[key] = nested
        elif value is not None:
            result[key] = value
    return result
