"""WSGI entry point for multi-worker servers::

    gunicorn -c python:exporter.gunicorn_conf -w 4 -b 0.0.0.0:8080 'exporter.wsgi:app'

Every worker process imports this module and builds its own app from the configuration
(``USAGE_EXPORTER_CONFIG`` and ``USAGE_EXPORTER_*``, as for ``usage-exporter serve``): its own
ClickHouse clients, its own spool slot and its own writer thread. Embedded chDB can be opened by
one process only, so more than one worker needs a ClickHouse server DSN.

Metrics are in prometheus-client's multiprocess mode, so ``/metrics`` answers the sum over workers
whichever worker serves the scrape. The value files live in
``<data_dir>/prometheus-multiproc/<server id>``, one directory per server start (the id is the
master's pid and start time), so counters of an earlier run are never added in; directories of
servers that are gone are removed at start.

Not for ``--preload``: the writer thread and the spool slot must belong to the worker, not be
inherited from the master.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
from pathlib import Path

from .config import Config, ConfigError, load_config

log = logging.getLogger("exporter")


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after the last ')' are fixed.
    return stat.rsplit(")", 1)[1].split()[19]


def server_id(pid: int | None = None) -> str:
    """``<pid>-<start ticks>`` of the server's master process (this worker's parent)."""
    pid = os.getppid() if pid is None else pid
    return f"{pid}-{_start_ticks(pid) or 0}"


def _server_alive(name: str) -> bool:
    pid, _, ticks = name.partition("-")
    if not pid.isdigit():
        return False
    return (_start_ticks(int(pid)) or "0") == ticks


def multiprocess_dir(config: Config) -> Path:
    """This server's directory for metric files; stale directories of finished servers are removed."""
    root = Path(config.data_dir) / "prometheus-multiproc"
    directory = root / server_id()
    directory.mkdir(parents=True, exist_ok=True)
    for child in root.iterdir():
        if child != directory and child.is_dir() and not _server_alive(child.name):
            shutil.rmtree(child, ignore_errors=True)  # several workers may race to remove it
    return directory


def build_app():
    """Build this worker's app; a configuration problem stops the server with one line."""
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"usage-exporter: {exc}", file=sys.stderr)
        # gunicorn stops the whole server, instead of respawning, on a worker exiting with 3.
        raise SystemExit(3) from None
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    directory = multiprocess_dir(config)
    # prometheus-client picks its value storage from this variable when it is first imported, so
    # it is set before anything below imports it.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)

    from prometheus_client import CollectorRegistry

    from .app import create_app, runtime
    from .metrics import Metrics

    metrics = Metrics(
        CollectorRegistry(auto_describe=True),
        token_name_label=config.metrics.token_name_label,
        max_series=config.metrics.max_series,
        multiprocess_dir=directory,
    )
    application = create_app(config, metrics=metrics)
    rt = runtime(application)
    metrics.start_refresh()

    def shutdown() -> None:
        # Runs when the worker exits normally (gunicorn's graceful stop or restart).
        if not rt.shutdown():
            log.warning("grace period over with records still buffered; they stay in the spool for the next worker")
        metrics.close()

    atexit.register(shutdown)
    log.info("worker %d serving (store %s, metrics in %s)", os.getpid(), rt.store.target.display, directory)
    return application


app = build_app()
