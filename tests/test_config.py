"""Configuration: flag > environment > file > default, and one clear line for every mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from exporter.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_without_file_or_environment():
    config = load_config(None, environ={})
    assert (config.host, config.port, config.timezone) == ("127.0.0.1", 8080, "UTC")
    assert config.clickhouse.database == "llm_usage"
    assert config.clickhouse_dsn.startswith("chdb://") and config.clickhouse_dsn.endswith("/data/clickhouse")
    assert config.ingest.tokens == [] and config.viewers == []


def test_precedence_flag_over_environment_over_file_over_default(tmp_path):
    path = write(tmp_path, {"port": 1111, "host": "0.0.0.0", "timezone": "Europe/Vienna",
                            "writer": {"batch_rows": 10, "max_age_s": 2.5}})
    environ = {"USAGE_EXPORTER_PORT": "2222", "USAGE_EXPORTER_WRITER_BATCH_ROWS": "20"}
    config = load_config(path, {"port": 3333}, environ=environ)
    assert config.port == 3333  # flag
    assert config.writer.batch_rows == 20  # environment over file
    assert config.writer.max_age_s == 2.5  # file over default
    assert config.host == "0.0.0.0" and config.timezone == "Europe/Vienna"
    assert config.writer.retry_max_s == 30.0  # default
    assert load_config(path, {"port": None}, environ=environ).port == 2222  # an absent flag does not count


def test_environment_values_are_yaml_so_lists_work_and_dsns_stay_strings(tmp_path):
    environ = {
        "USAGE_EXPORTER_INGEST_TOKENS": "[tok-a, tok-b]",
        "USAGE_EXPORTER_CLICKHOUSE_DSN": "http://u:p@h:8123/db",
        "USAGE_EXPORTER_CLICKHOUSE_DATABASE": "usage2",
    }
    config = load_config(None, environ=environ)
    assert config.ingest.tokens == ["tok-a", "tok-b"]
    assert config.clickhouse.dsn == "http://u:p@h:8123/db"
    assert config.clickhouse.database == "usage2"


def test_config_file_named_by_environment(tmp_path):
    path = write(tmp_path, {"port": 4444})
    assert load_config(None, environ={"USAGE_EXPORTER_CONFIG": str(path)}).port == 4444


@pytest.mark.parametrize(
    ("content", "mentions"),
    [
        ({"prot": 80}, "prot"),
        ({"port": "eighty"}, "port"),
        ({"port": 70000}, "port"),
        ({"writer": {"batch_rows": 0}}, "writer.batch_rows"),
        ({"clickhouse": {"database": "bad-name; DROP"}}, "clickhouse.database"),
        ({"clickhouse": {"dsn": "mysql://x"}}, "clickhouse.dsn"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"models": [{"name": "m", "endpoint": "chat"}]}, "endpoint"),
        ({"models": [{"name": "m"}, {"name": "m"}]}, "listed twice"),
        ({"viewers": [{"role": "org", "key": "k"}]}, "needs an org"),
        ({"viewers": [{"role": "admin"}]}, "exactly one of key or key_sha256"),
        ({"viewers": [{"role": "admin", "key_sha256": "abc"}]}, "64 hex digits"),
        ({"viewers": [{"role": "user", "key": "k", "org": "o"}]}, "needs an email"),
        ({"spool": {"fsync": "sometimes"}}, "spool.fsync"),
        ("port: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "mapping"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, content, mentions):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, content), environ={})
    message = str(caught.value)
    assert mentions in message
    assert "\n" not in message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_bad_environment_value_is_reported():
    with pytest.raises(ConfigError, match="port"):
        load_config(None, environ={"USAGE_EXPORTER_PORT": "many"})


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


def test_cli_bad_config_exits_nonzero_with_one_line(tmp_path):
    result = run_cli("migrate", "--config", str(write(tmp_path, {"writer": {"batch_rows": -1}})), cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "writer.batch_rows" in lines[0]


def test_cli_bad_flag_exits_nonzero_with_one_line(tmp_path):
    result = run_cli("serve", "--no-such-flag", cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--no-such-flag" in result.stderr


@pytest.mark.parametrize("command", [[], ["serve"], ["migrate"], ["demo"], ["sql"]])
def test_every_command_has_help(tmp_path, command):
    result = run_cli(*command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "usage: usage-exporter" in result.stdout
