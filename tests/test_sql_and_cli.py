"""Ad-hoc SQL for engineers (POST /api/v1/sql, usage-exporter sql) and the storage commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from exporter.app import runtime

from .conftest import flush

REPO = Path(__file__).resolve().parent.parent
RECORD = {"timestamp": 1795000000, "org": "acme", "model": "gpt-4o", "status_code": 200, "input_tokens": 7}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=180, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


def test_sql_reads_the_configured_database_by_default(make_app):
    app = make_app()
    client = app.test_client()
    client.post("/v1/requests", json=[RECORD, RECORD | {"org": "globex"}])
    flush(app)
    database = runtime(app).store.database
    for query in ("SELECT org, input_tokens FROM requests ORDER BY org", f"SELECT org, input_tokens FROM {database}.requests ORDER BY org"):
        answer = client.post("/api/v1/sql", data=query, content_type="text/plain")
        assert answer.status_code == 200, answer.json
        assert answer.json["data"] == [{"org": "acme", "input_tokens": 7}, {"org": "globex", "input_tokens": 7}]
    as_json = client.post("/api/v1/sql?format=TSV", json={"query": "SELECT count() FROM requests"})
    assert as_json.data == b"2\n"
    own_format = client.post("/api/v1/sql", data="SELECT 1 AS one FORMAT CSVWithNames", content_type="text/plain")
    assert own_format.data == b'"one"\n1\n'


@pytest.mark.parametrize(
    "statement",
    ["INSERT INTO requests (org) VALUES ('x')", "DROP TABLE requests", "ALTER TABLE requests DELETE WHERE 1",
     "CREATE TABLE t (a UInt8) ENGINE = Memory", "TRUNCATE TABLE requests", "SET readonly = 0"],
)
def test_sql_refuses_writes_and_ddl_and_stays_readonly(make_app, statement):
    app = make_app()
    client = app.test_client()
    client.post("/v1/requests", json=RECORD)
    flush(app)
    answer = client.post("/api/v1/sql", data=statement, content_type="text/plain")
    assert answer.status_code == 400
    if not statement.startswith("SET"):  # a SET is refused as a syntax error (FORMAT appended), not as a write
        assert "read-only" in answer.json["error"]
    assert client.post("/api/v1/sql?format=TSV", data="SELECT count() FROM requests").data == b"1\n"
    # The ingest path still writes: the read-only setting did not leak into the writer's handle.
    client.post("/v1/requests", json=RECORD | {"org": "later"})
    flush(app)
    assert client.post("/api/v1/sql?format=TSV", data="SELECT count() FROM requests").data == b"2\n"


def test_sql_limits_result_size(make_app):
    app = make_app(sql={"max_result_rows": 10})
    answer = app.test_client().post("/api/v1/sql", data="SELECT number FROM numbers(1000)", content_type="text/plain")
    assert answer.status_code == 400
    assert "10" in answer.json["error"]


def test_sql_access_admin_keys_only(make_app):
    app = make_app(viewers=[{"role": "admin", "key": "root-key"}, {"role": "org", "key": "org-key", "org": "acme"}])
    client = app.test_client()
    query = "SELECT 1"
    assert client.post("/api/v1/sql", data=query).status_code == 401
    assert client.post("/api/v1/sql", data=query, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/api/v1/sql", data=query, headers={"Authorization": "Bearer org-key"}).status_code == 403
    assert client.post("/api/v1/sql", data=query, headers={"Authorization": "Bearer root-key"}).status_code == 200


def test_sql_without_keys_is_loopback_only(make_app):
    client = make_app().test_client()
    assert client.post("/api/v1/sql", data="SELECT 1", environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 403
    assert client.post("/api/v1/sql", data="SELECT 1", environ_base={"REMOTE_ADDR": "::1"}).status_code == 200


def test_health_and_readiness(make_app):
    client = make_app().test_client()
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    # The writer thread is off in in-process tests, so readiness names exactly that.
    assert ready.status_code == 503
    assert ready.json["problems"] == ["the writer thread is not running"]


def test_migrate_demo_and_sql_commands_on_a_fresh_directory(tmp_path):
    data = str(tmp_path / "data")
    assert cli("migrate", "--data-dir", data, cwd=tmp_path).returncode == 0
    assert cli("migrate", "--data-dir", data, cwd=tmp_path).returncode == 0  # idempotent
    demo = cli("demo", "--data-dir", data, "--events", "3000", "--days", "2", "--seed", "7", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    query = "SELECT count() AS n, uniqExact(org) AS orgs, uniqExact(model) AS models, countIf(failed) AS failed FROM requests"
    result = cli("sql", "--data-dir", data, "--format", "JSONEachRow", "--url", "http://127.0.0.1:9", query, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["n"] == 3000 and row["orgs"] == 7 and row["models"] == 11
    assert 30 <= row["failed"] <= 180  # ~3 %
    catalog = cli("sql", "--data-dir", data, "--format", "TSV", "--url", "http://127.0.0.1:9",
                  "SELECT count() FROM models", cwd=tmp_path)
    assert catalog.stdout.strip() == "13"  # 11 used + 2 configured but unused


def test_sql_command_goes_through_a_running_exporter(tmp_path, exporter_process):
    proc = exporter_process(data_dir=tmp_path / "data")
    requests.post(proc.url + "/v1/requests", json=[RECORD, RECORD], timeout=10)
    result = cli("sql", "--url", proc.url, "--format", "TSV", "SELECT count() FROM llm_usage.requests WHERE ingested_at > 0 OR 1",
                 "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    # The embedded store is locked by the running exporter, so an answer at all proves the HTTP path.
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in {"0", "1", "2"}
    refused = cli("sql", "--url", proc.url, "DROP TABLE requests", cwd=tmp_path)
    assert refused.returncode != 0
    assert "read-only" in refused.stderr
