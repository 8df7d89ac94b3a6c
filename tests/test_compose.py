"""docker-compose.yml checked offline: Debian's docker-compose validates it against the compose
schema (no engine needed), and every file it mounts or builds from exists in the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from .grafana_macros import PLUGIN_VERSION

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    """The configuration as docker-compose resolves it (defaults filled in, paths made absolute)."""
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose is missing: scripts/setup --test installs Debian's package"
    env = {"PATH": "/usr/bin:/bin"}  # no stray COMPOSE_* or secret variables from the caller
    checked = subprocess.run([tool, "-f", str(COMPOSE_FILE), "config", "-q"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    resolved = subprocess.run([tool, "-f", str(COMPOSE_FILE), "config"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60, check=True)
    return yaml.safe_load(resolved.stdout)


def mounts(service: dict) -> list[dict]:
    """Volumes in long form; docker-compose 1.29 prints the short ``source:target[:mode]`` one."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            volume = {"type": "bind" if source.startswith("/") else "volume", "source": source, "target": target}
        found.append(volume)
    return found


def test_every_bind_mount_and_build_context_exists_in_the_repo(compose: dict) -> None:
    binds = []
    for name, service in compose["services"].items():
        for volume in mounts(service):
            if volume["type"] == "bind":
                binds.append((name, Path(volume["source"]), volume["target"]))
            else:
                assert volume["source"] in compose["volumes"], f"{name}: volume {volume['source']} is not declared"
        if "build" in service:
            context = Path(service["build"]["context"])
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file(), name
    assert binds
    for name, source, target in binds:
        assert source.is_relative_to(REPO), f"{name} mounts {source}, outside the repository"
        assert source.exists(), f"{name} mounts {source.relative_to(REPO)} at {target}, which does not exist"


def test_every_service_is_pinned_health_checked_and_keeps_its_state_in_named_volumes(compose: dict) -> None:
    assert set(compose["services"]) == {"clickhouse", "exporter", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        image = service["image"]
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"{name}: {image} is not pinned"
        assert service["healthcheck"]["test"], name
    named = {v["source"] for s in compose["services"].values() for v in mounts(s) if v["type"] == "volume"}
    assert named == {"clickhouse-data", "exporter-data", "prometheus-data", "grafana-data"}
    # Grafana waits for ClickHouse and Prometheus to answer; the exporter for ClickHouse.
    assert compose["services"]["grafana"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    assert compose["services"]["exporter"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"


def test_grafana_gets_the_plugin_the_tests_model_and_every_provisioning_variable(compose: dict) -> None:
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_PLUGINS_PREINSTALL_SYNC"] == f"grafana-clickhouse-datasource@{PLUGIN_VERSION}"
    provisioning = (REPO / "grafana/provisioning/datasources/datasources.yml").read_text()
    needed = set(re.findall(r"\$\{(\w+)\}", provisioning))
    assert needed and needed <= set(env), needed - set(env)
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/llm-usage.json"
    assert (REPO / "grafana/dashboards/llm-usage.json").is_file()


def test_clickhouse_users_and_the_exporter_dsn_agree(compose: dict) -> None:
    clickhouse = compose["services"]["clickhouse"]["environment"]
    exporter = compose["services"]["exporter"]["environment"]
    grafana = compose["services"]["grafana"]["environment"]
    dsn = urlsplit(exporter["USAGE_EXPORTER_CLICKHOUSE_DSN"])
    assert (dsn.hostname, dsn.port, dsn.username, dsn.password) == ("clickhouse", 8123, clickhouse["CLICKHOUSE_USER"], clickhouse["CLICKHOUSE_PASSWORD"])
    database = dsn.path.strip("/")
    assert database == grafana["CLICKHOUSE_DATABASE"] == clickhouse["CLICKHOUSE_DB"]

    users = ET.parse(REPO / "grafana/clickhouse/users.d/grafana-reader.xml").getroot()
    user = users.find(f"users/{grafana['CLICKHOUSE_GRAFANA_USER']}")
    assert user is not None
    assert user.find("password").get("from_env") in clickhouse
    assert clickhouse[user.find("password").get("from_env")] == grafana["CLICKHOUSE_GRAFANA_PASSWORD"]
    assert [q.text for q in user.findall("grants/query")] == [f"GRANT SELECT ON {database}.*"]
    assert users.find(f"profiles/{user.find('profile').text}/readonly").text == "2"


def test_prometheus_scrapes_the_exporter_service_and_loads_the_rules(compose: dict) -> None:
    prometheus = compose["services"]["prometheus"]
    config_mount = next(v for v in mounts(prometheus) if v["target"] == "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load(Path(config_mount["source"]).read_text())
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    port = compose["services"]["exporter"]["ports"][0]
    exporter_port = port["target"] if isinstance(port, dict) else int(port.split("/")[0].rsplit(":", 1)[1])
    assert f"exporter:{exporter_port}" in targets, targets
    rules_mount = next(v for v in mounts(prometheus) if v["target"] == "/etc/prometheus/rules")
    assert list(Path(rules_mount["source"]).glob("*.yml"))
    # Relative rule paths resolve against the config file's folder, where the rules are mounted.
    assert [str(Path("/etc/prometheus") / p) for p in config["rule_files"]] == ["/etc/prometheus/rules/*.yml"]

    # Apart from the target, the compose copy is the project's Prometheus configuration.
    reference = yaml.safe_load((REPO / "prometheus/prometheus.yml").read_text())
    for job in reference["scrape_configs"] + config["scrape_configs"]:
        job.pop("static_configs")
    assert config == {k: v for k, v in reference.items() if k != "alerting"}


def test_the_image_copies_only_what_exists_and_is_not_ignored() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = [src for line in dockerfile.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]]
    assert copied
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for source in copied:
        assert (REPO / source).exists(), source
        assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
    # clickhouse/*.sql is read next to the package, which the editable install keeps.
    assert "COPY clickhouse ./clickhouse" in dockerfile and "pip install --no-deps -e ." in dockerfile
