"""The application factory: builds the registry, the store, the spool and the writer for one app."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flask import Flask, jsonify
from prometheus_client import CollectorRegistry
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from .access import ViewerDirectory
from .admission import InflightBudget
from .config import Config
from .metrics import Metrics
from .spool import Spool
from .storage import StorageError, Store
from .writer import Writer

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The live objects of one app; views reach them through :func:`runtime`."""

    config: Config
    store: Store
    spool: Spool
    writer: Writer
    metrics: Metrics
    viewers: ViewerDirectory
    ingest_token_digests: list[bytes] = field(default_factory=list)
    inflight: InflightBudget = field(default_factory=lambda: InflightBudget(64 * 1024 * 1024))
    draining: bool = False

    def shutdown(self, grace_s: float | None = None) -> bool:
        """Stop accepting, flush the buffer within the grace period, release the store."""
        self.draining = True
        flushed = self.writer.stop(self.config.shutdown_grace_s if grace_s is None else grace_s)
        self.spool.close()
        self.store.close()
        return flushed


def runtime(app: Flask) -> Runtime:
    return app.extensions["usage_exporter"]


def create_app(
    config: Config,
    *,
    start_writer: bool = True,
    store: Store | None = None,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
) -> Flask:
    app = Flask(__name__)
    # "Now" for the usage API's windows (epoch seconds); tests pass a fixed clock.
    app.extensions["clock"] = clock
    app.config["MAX_CONTENT_LENGTH"] = config.ingest.max_body_bytes
    app.json.sort_keys = False

    store = store or Store(config)
    try:
        store.migrate()
    except StorageError as exc:
        if store.target.embedded:
            raise
        # The spool takes records while the server is away; the writer migrates before its first insert.
        log.warning("%s; accepting records into the spool and retrying", exc)
    # A multi-worker server passes Metrics in multiprocess mode (exporter.wsgi).
    metrics = metrics or Metrics(
        CollectorRegistry(auto_describe=True),
        token_name_label=config.metrics.token_name_label,
        max_series=config.metrics.max_series,
    )
    spool = Spool(config.spool_dir, config.spool.max_bytes, config.spool.segment_bytes, fsync=config.spool.fsync == "always")
    metrics.register_spool_gauges(lambda: (spool.pending_rows, spool.pending_bytes, spool.oldest_age()), config.spool.max_bytes)
    writer = Writer(
        spool,
        store,
        metrics,
        batch_rows=config.writer.batch_rows,
        max_age_s=config.writer.max_age_s,
        retry_initial_s=config.writer.retry_initial_s,
        retry_max_s=config.writer.retry_max_s,
    )
    app.extensions["usage_exporter"] = Runtime(
        config=config,
        store=store,
        spool=spool,
        writer=writer,
        metrics=metrics,
        viewers=ViewerDirectory(config.viewers),
        ingest_token_digests=[hashlib.sha256(t.encode()).digest() for t in config.ingest.tokens],
        inflight=InflightBudget(config.ingest.max_inflight_bytes),
    )

    from .web import BLUEPRINTS

    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)

    @app.errorhandler(HTTPException)
    def json_error(exc: HTTPException):
        messages = {
            404: "There is nothing at this URL.",
            405: "This URL does not accept that method.",
            413: f"The body is larger than the limit of {config.ingest.max_body_bytes} bytes.",
        }
        message = messages.get(exc.code or 500, exc.description or exc.name)
        response = jsonify(error=message)
        response.status_code = exc.code or 500
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:  # RFC 9110: a 405 names what is allowed
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        log.exception("unhandled error while serving a request")
        response = jsonify(error="The exporter failed to handle this request; see its log.")
        response.status_code = 500
        return response

    if start_writer:
        writer.start()
    return app
