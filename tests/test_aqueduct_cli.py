"""``usage-exporter import aqueduct`` as operators run it: backfill, --follow, SIGTERM, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg

from .aqueduct_db import AqueductDB
from .conftest import REPO
from .pg_support import postgres_cluster  # noqa: F401  (the session fixture)
from .test_aqueduct_import import seed_gateway


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "exporter.cli", *args]


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("USAGE_EXPORTER_")}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)


def watermark(data: Path) -> int:
    files = list((data / "importers").glob("aqueduct-*.json"))
    return json.loads(files[0].read_text())["last_id"] if files else 0


def add_rows(dsn: str, token_id: int, n: int) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return AqueductDB(conn).add_requests(
            [{"token_id": token_id, "timestamp": datetime.now(timezone.utc) - timedelta(seconds=1), "model": "gpt-4o",
              "status_code": 200, "response_time_ms": 10, "input_tokens": 1, "output_tokens": 1}] * n
        )


def test_backfill_follow_stop_and_resume(postgres_cluster, tmp_path, exporter_process):  # noqa: F811
    dsn = postgres_cluster.create_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        AqueductDB(conn).create_schema()
    gateway = seed_gateway(dsn, rows=300)
    token = next(iter(gateway.tokens.values())).id
    data = tmp_path / "data"
    common = ("import", "aqueduct", "--postgres-dsn", dsn, "--data-dir", str(data), "--settle", "0")

    backfill = run(*common, "--batch-rows", "100")
    assert backfill.returncode == 0, backfill.stderr
    assert backfill.stdout.startswith("imported 300 Aqueduct requests from 127.0.0.1:")
    assert "] 300/300 rows (100%)" in backfill.stderr  # the progress bar's last line
    assert watermark(data) == max(r["id"] for r in gateway.rows)

    follower = subprocess.Popen(cli(*common, "--follow", "--poll-interval", "0.1"), cwd=REPO, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = follower.stdout.readline()  # the backfill pass is over: nothing new yet
        assert first.startswith("imported 0 Aqueduct requests"), first
        new = add_rows(dsn, token, 5)
        deadline = time.monotonic() + 30
        while watermark(data) != max(new):
            assert follower.poll() is None, follower.communicate()
            assert time.monotonic() < deadline, "the follower did not import the new rows"
            time.sleep(0.1)
        follower.send_signal(signal.SIGTERM)
        out, err = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, err
    assert "imported 5 new requests" in err

    later = add_rows(dsn, token, 4)
    resumed = run(*common)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("imported 4 Aqueduct requests") and "(0 already there)" in resumed.stdout
    assert watermark(data) == max(later)

    proc = exporter_process(data_dir=data)
    rows = proc.sql("SELECT count() AS n, uniqExact(request_id) AS ids, countIf(status_code = 0) AS unknown FROM requests")[0]
    assert (int(rows["n"]), int(rows["ids"])) == (309, 309)
    assert int(rows["unknown"]) == sum(1 for r in gateway.rows if r["status_code"] is None)

    # The embedded store opens in one process at a time: while the exporter runs, the importer says so.
    locked = run(*common)
    assert locked.returncode == 1
    # (chDB itself prints its lock error first; our line is the last one.)
    last = locked.stderr.strip().splitlines()[-1]
    assert last.startswith("usage-exporter: cannot ") and last.endswith("is an exporter running on it? the embedded store opens in one process at a time)")


def test_operator_mistakes_exit_non_zero_with_one_line(tmp_path):
    missing = run("import", "aqueduct", "--data-dir", str(tmp_path / "d"))
    assert missing.returncode == 1
    assert missing.stderr == "usage-exporter: give Aqueduct's database with --postgres-dsn or aqueduct.postgres_dsn\n"
    down = run("import", "aqueduct", "--postgres-dsn", "postgresql://u:hunter2@127.0.0.1:1/aqueduct", "--data-dir", str(tmp_path / "d"))
    assert down.returncode == 1 and down.stderr.count("\n") == 1
    assert down.stderr.startswith("usage-exporter: cannot connect to Aqueduct's PostgreSQL at 127.0.0.1:1/aqueduct: ")
    assert "hunter2" not in down.stderr
    bad_since = run("import", "aqueduct", "--postgres-dsn", "postgresql://127.0.0.1:1/x", "--since", "last tuesday")
    assert bad_since.returncode == 1 and "neither an ISO date/time nor a span" in bad_since.stderr
    bad_flag = run("import", "aqueduct", "--batch-rows", "many")
    assert bad_flag.returncode == 2 and bad_flag.stderr.count("\n") == 1
