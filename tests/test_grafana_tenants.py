"""`usage-exporter grafana-tenant-sql`: a read-only ClickHouse user per organization, row policy on org.

Embedded ClickHouse (chDB) has no writable user directory, so CREATE USER cannot run here; what
can run does: every printed statement goes through ClickHouse's own parser (formatQuery), the
row-policy condition is evaluated against real rows with awkward organization names, and the
list of filtered tables is checked against the live schema.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from exporter.app import runtime
from exporter.cli import main
from exporter.tenants import org_condition, quote_identifier, render, tenant_sql, tenant_tables

from .conftest import flush

REPO = Path(__file__).resolve().parent.parent
AWKWARD = ["acme", "O'Hara & Sons", "back\\slash", "tick`org", "quote\"org", "ünïcødé 組織", "it's\\'tricky"]


def test_every_statement_parses_in_clickhouse_and_keeps_the_org_exact(make_app) -> None:
    app = make_app()
    reader = runtime(app).store.reader
    for org in AWKWARD:
        statements, password = tenant_sql("llm_usage", org, user=f"grafana {org}", password="p'w\\d")
        assert password == "p'w\\d"
        for statement in statements:
            formatted = reader.query("SELECT formatQuery({q:String})", parameters={"q": statement}).result_rows[0][0]
            assert formatted, statement
        policies = [s for s in statements if s.startswith("CREATE ROW POLICY OR REPLACE")]
        assert len(policies) == len(tenant_tables().filtered)
        assert all(s.endswith(f"USING {org_condition(org)} TO {quote_identifier(f'grafana {org}')}") for s in policies)
        # The literal ClickHouse reads back is the org itself, byte for byte.
        [[literal]] = reader.query(f"SELECT {org_condition(org).removeprefix('org = ')}").result_rows
        assert literal == org


def test_the_policy_condition_selects_exactly_one_orgs_rows(make_app) -> None:
    app = make_app()
    # An hour ago: inside every table's window, usage_recent_requests' 8 days included.
    now = int(time.time())
    records = [{"timestamp": now - 3600 + i, "org": org, "model": "m", "status_code": 200}
               for i, org in enumerate(AWKWARD * 3)]
    assert app.test_client().post("/v1/requests", json=records).status_code == 202
    flush(app)
    store = runtime(app).store
    for org in AWKWARD:
        for table in tenant_tables().filtered:
            rows = store.query(f"SELECT DISTINCT org, count() OVER () FROM {table} WHERE {org_condition(org)}")
            assert {row[0] for row in rows} == {org}, (table, org)
        [[count]] = store.query(f"SELECT count() FROM requests WHERE {org_condition(org)}")
        assert count == 3


def test_filtered_tables_are_every_table_with_an_org_column(make_app) -> None:
    store = runtime(make_app()).store
    rows = store.query(
        "SELECT table FROM system.columns WHERE database = {db:String} AND name = 'org' "
        "AND table IN (SELECT name FROM system.tables WHERE database = {db:String} AND engine NOT IN ('MaterializedView', 'View'))",
        {"db": store.database},
    )
    assert set(tenant_tables().filtered) == {row[0] for row in rows}
    assert "request_ids" not in tenant_tables().filtered + tenant_tables().shared  # other orgs' request ids stay hidden


def test_everyone_else_keeps_seeing_all_rows() -> None:
    """A policy on a table hides every row from users it does not name, so the script adds one for them."""
    statements, _ = tenant_sql("llm_usage", "acme")
    for table in tenant_tables().filtered:
        assert (f"CREATE ROW POLICY IF NOT EXISTS `llm_usage_all_rows` ON `llm_usage`.`{table}` "
                f"FOR SELECT USING 1 TO ALL EXCEPT `llm_usage_tenant`") in statements
    assert "GRANT `llm_usage_tenant` TO `grafana_acme`" in statements
    assert any(s.startswith("CREATE USER IF NOT EXISTS `grafana_acme` IDENTIFIED WITH sha256_password BY '")
               and s.endswith("DEFAULT DATABASE `llm_usage` SETTINGS readonly = 2") for s in statements)


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> Done:
    """The command in-process (main() as the console script calls it), without a config file or environment."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["grafana-tenant-sql", *args])
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
    return Done(code, out.getvalue(), err.getvalue())


def test_cli_prints_the_script_for_the_configured_database() -> None:
    done = run_cli("--org", "O'Hara & Sons", "--password", "s3cret", "--clickhouse-dsn", "http://u:p@ch:8123/usage_prod")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[2] == "-- Grafana datasource for this organization: username grafana_o_hara_sons, password s3cret"
    body = [line for line in lines if not line.startswith("--")]
    assert all(line.endswith(";") for line in body)
    assert body == [s + ";" for s in render("usage_prod", "O'Hara & Sons", password="s3cret").splitlines()[3:] for s in [s[:-1]]]
    assert any("USING org = 'O\\'Hara & Sons'" in line for line in body)
    # Without --password a random one is made and shown once, in the comment.
    generated = run_cli("--org", "acme").stdout
    password = re.search(r"password (\S+)$", generated.splitlines()[2]).group(1)
    assert len(password) >= 20 and f"BY '{password}'" in generated


@pytest.mark.parametrize("args, message", [
    ((), "--org"),
    (("--org", "acme", "--user", "a\nb"), "control characters"),
    (("--org", "acme", "--password", ""), "--password must not be empty"),
])
def test_cli_refuses_bad_input_with_one_line(args: tuple[str, ...], message: str) -> None:
    done = run_cli(*args)
    assert done.returncode == 2 and done.stdout == ""
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
