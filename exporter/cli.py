"""``usage-exporter``: serve, migrate, demo, sql."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any

from . import __version__
from .config import Config, ConfigError, load_config

log = logging.getLogger("exporter")


class CommandError(Exception):
    """A failure worth one line on stderr and a non-zero exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, not the usage block
        self.exit(2, f"usage-exporter: {message} (see --help)\n")


def _storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (also USAGE_EXPORTER_CONFIG)")
    parser.add_argument("--clickhouse-dsn", metavar="DSN", help="chdb:///path (embedded) or http://user:pass@host:8123/db")
    parser.add_argument("--data-dir", metavar="DIR", help="where the embedded store and the spool live (default ./data)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="usage-exporter", description="LLM gateway usage exporter: ClickHouse storage, Prometheus metrics, Grafana dashboards.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the HTTP service")
    _storage_options(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--demo", action="store_true", help="fill an empty store with demo traffic before serving")

    migrate = commands.add_parser("migrate", help="apply the ClickHouse schema and exit")
    _storage_options(migrate)

    demo = commands.add_parser("demo", help="write realistic synthetic traffic into the store")
    _storage_options(demo)
    demo.add_argument("--events", type=int, default=50_000, help="number of records (default 50000)")
    demo.add_argument("--days", type=float, default=8.0, help="spread them over this many days up to now (default 8)")
    demo.add_argument("--seed", type=int, default=42, help="random seed (default 42)")

    sql = commands.add_parser("sql", help="run read-only SQL, through a running exporter when one answers")
    _storage_options(sql)
    sql.add_argument("query", help="the SQL text; FROM requests reads the configured database")
    sql.add_argument("--format", default="PrettyCompactMonoBlock", help="ClickHouse output format (default PrettyCompactMonoBlock)")
    sql.add_argument("--url", help="the running exporter (default http://<host>:<port> from the config)")
    sql.add_argument("--key", help="viewer key with the admin role, when viewer keys are configured")
    sql.add_argument("--host", help=argparse.SUPPRESS)
    sql.add_argument("--port", type=int, help=argparse.SUPPRESS)

    tenant = commands.add_parser(
        "grafana-tenant-sql", help="print the ClickHouse SQL for one organization's read-only Grafana user (docs/grafana.md)"
    )
    _storage_options(tenant)
    tenant.add_argument("--org", required=True, help="the organization whose rows the user may read")
    tenant.add_argument("--user", help="ClickHouse user name (default grafana_<org>)")
    tenant.add_argument("--password", help="the user's password (default: a random one, printed in a comment)")

    from .integrations import aqueduct as _aqueduct  # the importer's flags live next to the importer

    importer = commands.add_parser("import", help="import request logs from a gateway's own database")
    _aqueduct.add_parser(importer.add_subparsers(dest="source", required=True, parser_class=_Parser), _storage_options)
    return parser


def _config_from(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "data_dir": args.data_dir,
        "clickhouse": {"dsn": args.clickhouse_dsn},
    }
    return load_config(args.config, overrides)


def _configure_logging(config: Config) -> None:
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = _config_from(args)
        _configure_logging(config)
        handler = {"serve": cmd_serve, "migrate": cmd_migrate, "demo": cmd_demo, "sql": cmd_sql, "import": cmd_import,
                   "grafana-tenant-sql": cmd_grafana_tenant_sql}[args.command]
        return handler(config, args)
    except (ConfigError, CommandError) as exc:
        print(f"usage-exporter: {exc}", file=sys.stderr)
        return 2
    except _storage_error_types() as exc:
        print(f"usage-exporter: {exc}", file=sys.stderr)
        return 1


def _storage_error_types() -> tuple[type[BaseException], ...]:
    from .storage import StorageError

    return (StorageError,)


def cmd_import(config: Config, args: argparse.Namespace) -> int:
    from .integrations.aqueduct import ImportFailed, run_command

    try:
        return run_command(config, args)
    except ImportFailed as exc:  # a runtime failure (database away, store locked): exit 1, not 2
        print(f"usage-exporter: {exc}", file=sys.stderr)
        return 1


def cmd_grafana_tenant_sql(config: Config, args: argparse.Namespace) -> int:
    """Print (never run) the SQL: an administrator reviews it and runs it with their own login."""
    from .storage import resolve_target
    from .tenants import render

    if not args.org:
        raise CommandError("--org must name an organization")
    if args.password is not None and not args.password:
        raise CommandError("--password must not be empty")
    try:
        script = render(resolve_target(config).database, args.org, args.user, args.password)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    sys.stdout.write(script)
    return 0


def cmd_migrate(config: Config, args: argparse.Namespace) -> int:
    from .storage import Store

    store = Store(config)
    try:
        store.migrate()
        print(f"schema applied to {store.target.display} (database {store.database})")
    finally:
        store.close()
    return 0


def write_demo(store, events: int, days: float, seed: int, chunk: int = 50_000) -> int:
    """Insert demo rows the way the writer does: de-duplicated by request_id, tokened per chunk."""
    from .demo import generate
    from .records import encode_rows
    from .writer import drop_duplicates

    now = time.time()
    rows = generate(events, days, seed, now=now)
    written = 0
    part = 0
    while batch := list(islice(rows, chunk)):
        payload, duplicates = drop_duplicates(encode_rows(batch), store.existing_request_ids)
        if payload:
            store.insert_rows(payload, f"demo-{seed}-{int(now)}-{part}")
        written += len(batch) - duplicates
        part += 1
    return written


def cmd_demo(config: Config, args: argparse.Namespace) -> int:
    from .storage import Store

    if args.events <= 0 or args.days <= 0:
        raise CommandError("--events and --days must be positive")
    store = Store(_with_demo_catalog(config))
    try:
        store.migrate()
        written = write_demo(store, args.events, args.days, args.seed)
    finally:
        store.close()
    print(f"wrote {written} demo records over the last {args.days:g} days into {store.target.display}")
    return 0


def _with_demo_catalog(config: Config) -> Config:
    """Without a configured catalog, the demo brings its own so "Requests by Model" shows zeros too."""
    import msgspec

    from .demo import catalog

    if config.models:
        return config
    return msgspec.structs.replace(config, models=catalog())


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from waitress import create_server

    from .app import create_app, runtime

    if args.demo:
        config = _with_demo_catalog(config)
    app = create_app(config)
    rt = runtime(app)
    if args.demo and not rt.store.query("SELECT count() FROM requests")[0][0]:
        log.info("the store is empty: writing demo traffic")
        write_demo(rt.store, 50_000, 8.0, 42)
    server = create_server(app, host=config.host, port=config.port, threads=config.threads, clear_untrusted_proxy_headers=True)
    stop_signals: list[int] = []

    def _request_stop(signum: int, _frame: Any) -> None:
        # Only note the request and wake the loop. An exception raised from here lands wherever
        # the main thread happens to be, and inside a waitress channel handler waitress catches
        # it, closes that one connection and keeps serving.
        stop_signals.append(signum)
        rt.draining = True
        wake = getattr(server, "pull_trigger", None)
        if wake is not None:
            wake()

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    log.info("serving on http://%s:%s (store %s)", config.host, server.effective_port, rt.store.target.display)
    _serve_until(server, lambda: bool(stop_signals))
    log.info("stopping: finishing in-flight requests and flushing the buffer")
    server.close()
    server.task_dispatcher.shutdown(cancel_pending=False, timeout=min(5.0, config.shutdown_grace_s))
    flushed = rt.shutdown()
    if not flushed:
        log.warning("grace period over with records still buffered; they stay in the spool and are sent at the next start")
    return 0


def _serve_until(server: Any, stop_requested: Callable[[], bool]) -> None:
    """waitress's ``server.run()``, one poll at a time, so that a stop request ends it."""
    # A server on several sockets keeps its socket map in ``map``; a one-socket server is an
    # asyncore dispatcher, whose map is ``_map``.
    socket_map = getattr(server, "map", None) or server._map
    while socket_map and not stop_requested():
        server.asyncore.loop(timeout=server.adj.asyncore_loop_timeout, map=socket_map,
                             use_poll=server.adj.asyncore_use_poll, count=1)


def cmd_sql(config: Config, args: argparse.Namespace) -> int:
    url = (args.url or f"http://{_connect_host(config.host)}:{config.port}").rstrip("/")
    answer = _sql_over_http(url, args.query, args.format, args.key)
    if answer is None:
        answer = _sql_direct(config, args.query, args.format)
    sys.stdout.buffer.write(answer)
    if answer and not answer.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    return 0


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _sql_over_http(url: str, query: str, fmt: str, key: str | None) -> bytes | None:
    """The exporter's answer, or None when nothing listens at ``url``."""
    from urllib.parse import urlencode

    request = urllib.request.Request(
        f"{url}/api/v1/sql?{urlencode({'format': fmt})}", data=query.encode(), method="POST",
        headers={"Content-Type": "text/plain"} | ({"Authorization": f"Bearer {key}"} if key else {}),
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        raise CommandError(f"the exporter at {url} refused the query: {message}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _sql_direct(config: Config, query: str, fmt: str) -> bytes:
    from .storage import QueryRefused, Store

    store = Store(config)
    try:
        return store.adhoc_sql(query, fmt)
    except QueryRefused as exc:
        raise CommandError(str(exc)) from None
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
