"""ClickHouse SQL that gives one organization a read-only login seeing only its own rows.

Grafana has no row-level security of its own, so "a standard user sees their own organization"
is enforced one layer down: each Grafana organization gets its own ClickHouse datasource whose
user carries a row policy ``USING org = '<org>'`` on every table that holds an ``org`` column.
See docs/grafana.md for the recipe around it.

A row policy on a table hides all rows from every user it does not name, so the statements also
create a role for tenant users and an "all rows" policy for everyone else (the exporter, the
admin's Grafana user), which keeps the existing logins working.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from .storage import MODELS_TABLE, SCHEMA_DIR, schema_statements

_CREATE_TABLE = re.compile(r"^CREATE TABLE IF NOT EXISTS\s+[^.\s]+\.(\w+)\s*\((.*)\)\s*ENGINE", re.S | re.I)
_ORG_COLUMN = re.compile(r"^\s*org\s", re.M)
_SAFE_NAME = re.compile(r"[^a-z0-9_]+")


def quote_identifier(name: str) -> str:
    """A backquoted ClickHouse identifier; backslash and backquote are escaped with a backslash."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quote_string(value: str) -> str:
    """A single-quoted ClickHouse string literal; ClickHouse reads backslash escapes inside quotes."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def org_condition(org: str) -> str:
    """The row-policy condition for one organization."""
    return f"org = {quote_string(org)}"


def default_user(org: str) -> str:
    """``grafana_<org>`` with the org reduced to lower-case letters, digits and underscores."""
    slug = _SAFE_NAME.sub("_", org.lower()).strip("_") or "org"
    return f"grafana_{slug}"[:64]


@dataclass(frozen=True)
class TenantTables:
    """Which tables a tenant may read: those with an ``org`` column get a row policy."""

    filtered: tuple[str, ...]
    shared: tuple[str, ...]


def tenant_tables(schema_dir: Path = SCHEMA_DIR) -> TenantTables:
    """Read the schema files: every table with an ``org`` column is tenant data.

    The model catalog holds no tenant data and is shared; anything else without an ``org``
    column (the request-id index) is not granted at all, because it would leak other
    organizations' request ids.
    """
    filtered: list[str] = []
    for statement in schema_statements("db", 0, schema_dir):
        match = _CREATE_TABLE.match(statement)
        if match and _ORG_COLUMN.search(match.group(2)):
            filtered.append(match.group(1))
    return TenantTables(filtered=tuple(filtered), shared=(MODELS_TABLE,))


def tenant_sql(
    database: str,
    org: str,
    user: str | None = None,
    password: str | None = None,
    tables: TenantTables | None = None,
) -> tuple[list[str], str]:
    """The statements for ``org``'s read-only user, and the password they set.

    Every statement is idempotent (IF NOT EXISTS / OR REPLACE), so running the output again, or
    for a second organization, is safe.
    """
    tables = tables or tenant_tables()
    user = user or default_user(org)
    password = password if password is not None else secrets.token_urlsafe(18)
    # Both also appear in the script's comment lines, where a line break would end the comment.
    if any(ord(ch) < 32 for ch in user + password):
        raise ValueError("the user name and password must not contain control characters such as line breaks")
    role = quote_identifier(f"{database}_tenant")
    db = quote_identifier(database)
    everyone_else = quote_identifier(f"{database}_all_rows")
    who = quote_identifier(user)
    policy = quote_identifier(f"{user}_org")

    statements = [f"CREATE ROLE IF NOT EXISTS {role}"]
    for table in tables.filtered + tables.shared:
        statements.append(f"GRANT SELECT ON {db}.{quote_identifier(table)} TO {role}")
    for table in tables.filtered:
        statements.append(
            f"CREATE ROW POLICY IF NOT EXISTS {everyone_else} ON {db}.{quote_identifier(table)} "
            f"FOR SELECT USING 1 TO ALL EXCEPT {role}"
        )
    statements.append(
        f"CREATE USER IF NOT EXISTS {who} IDENTIFIED WITH sha256_password BY {quote_string(password)} "
        f"DEFAULT DATABASE {db} SETTINGS readonly = 2"
    )
    statements.append(f"GRANT {role} TO {who}")
    for table in tables.filtered:
        statements.append(
            f"CREATE ROW POLICY OR REPLACE {policy} ON {db}.{quote_identifier(table)} "
            f"FOR SELECT USING {org_condition(org)} TO {who}"
        )
    return statements, password


def render(database: str, org: str, user: str | None = None, password: str | None = None) -> str:
    """The SQL script the ``grafana-tenant-sql`` command prints."""
    statements, password_used = tenant_sql(database, org, user, password)
    user = user or default_user(org)
    header = [
        f"-- Read-only ClickHouse user {user} for organization {org!r} (database {database}).",
        "-- Run as a ClickHouse user with access management, e.g. clickhouse-client --multiquery < this.sql",
        f"-- Grafana datasource for this organization: username {user}, password {password_used}",
    ]
    return "\n".join(header + [s + ";" for s in statements]) + "\n"
