"""gunicorn settings for ``exporter.wsgi:app``::

    gunicorn -c python:exporter.gunicorn_conf -w 4 -b 0.0.0.0:8080 'exporter.wsgi:app'

Command-line flags override what is set here.

The master checks the configuration once, before it binds or forks, so a mistake stops the
server with one line and exit code 1. Without this file each worker finds the mistake by itself
and exits with gunicorn's boot-error code; gunicorn halts on the first such worker, but when a
second one exits while it is halting, gunicorn's arbiter raises again and prints a traceback.
"""

from __future__ import annotations

import sys

from .config import ConfigError, load_config

# Threads, not more processes, are the cheap way to wait on the spool's group fsync.
worker_class = "gthread"
threads = 8


def on_starting(server: object) -> None:
    try:
        load_config()
    except ConfigError as exc:
        print(f"usage-exporter: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
