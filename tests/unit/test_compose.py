"""deploy/compose.yaml, prometheus.yml and Grafana's provisioning agree with each other,
with the images and with the app: service names, ports, mounted files, the dashboard.
(No Docker engine here: the stack is never started; this is what can be checked.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.app import create_app
from server.settings import Settings
from tests.unit.test_dockerfiles import args_of

DEPLOY = Path(__file__).parents[2] / "deploy"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load(DEPLOY / "compose.yaml")
    return data


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    result: dict[str, Any] = compose["services"][name]
    return result


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a named volume, or a path relative to deploy/)."""
    out = {}
    for entry in svc.get("volumes", []):
        source, target, *_mode = entry.split(":")
        out[target] = source
    return out


def bind_source(source: str) -> Path:
    assert source.startswith("."), f"{source} is a named volume, not a file of the repo"
    return (DEPLOY / source).resolve()


def published(svc: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """Container port -> (host address, host port)."""
    out = {}
    for entry in svc.get("ports", []):
        address, host, container = str(entry).split(":")
        out[int(container)] = (address, int(host))
    return out


def env_default(value: str) -> str:
    """`${VAR:-default}` -> default; a literal stays as it is."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
    return match.group(1) if match else value


def test_server_port_matches_image_and_prometheus(compose: dict[str, Any]) -> None:
    server = service(compose, "loraswap")
    port = int(env_default(server["environment"]["LORASWAP_PORT"]))
    assert published(server)[port][1] == port
    dockerfile = (DEPLOY / server["build"]["context"] / server["build"]["dockerfile"]).resolve()
    assert args_of(dockerfile, "EXPOSE") == [str(port)]

    prometheus = load(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = prometheus["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"loraswap:{port}"]}]
    assert "loraswap" in compose["services"]
    # The scraped path is a real route of the app.
    app = create_app(Settings())
    assert job["metrics_path"] in {getattr(route, "path", None) for route in app.routes}


def test_admin_key_is_required_and_ports_stay_local(compose: dict[str, Any]) -> None:
    env = service(compose, "loraswap")["environment"]
    assert env["LORASWAP_ADMIN_KEY"].startswith("${LORASWAP_ADMIN_KEY:?")
    for name, svc in compose["services"].items():
        for address, _ in published(svc).values():
            assert address == "127.0.0.1", f"{name} published beyond loopback"


def test_prometheus_scrapes_with_the_metrics_key(compose: dict[str, Any]) -> None:
    """/metrics refuses a scrape without the key: Prometheus sends the server's one."""
    env = service(compose, "loraswap")["environment"]
    assert env["LORASWAP_METRICS_KEY"].startswith("${LORASWAP_METRICS_KEY:?")
    (job,) = load(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    assert job["authorization"]["type"] == "Bearer"
    path = job["authorization"]["credentials_file"]
    (mounted,) = [c for c in service(compose, "prometheus")["configs"] if c["target"] == path]
    content = compose["configs"][mounted["source"]]["content"]
    assert content.startswith("${LORASWAP_METRICS_KEY:?")


def test_builds_use_files_of_the_repo() -> None:
    for path in (DEPLOY / "compose.yaml", DEPLOY / "compose.cuda.yaml"):
        build = load(path)["services"]["loraswap"]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert (context / "pyproject.toml").exists()
        assert (context / build["dockerfile"]).is_file(), path


def test_every_mount_exists_and_every_volume_is_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    for name, svc in compose["services"].items():
        for target, source in mounts(svc).items():
            if source.startswith("."):
                assert bind_source(source).exists(), f"{name}: {source} -> {target}"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
    # The server keeps its state (registry, demo assets) in a volume at LORASWAP_HOME.
    assert "/data" in mounts(service(compose, "loraswap"))


def test_prometheus_reads_the_mounted_config(compose: dict[str, Any]) -> None:
    prometheus = service(compose, "prometheus")
    config = next(a.split("=", 1)[1] for a in prometheus["command"] if "--config.file=" in a)
    source = bind_source(mounts(prometheus)[config])
    assert source == (DEPLOY / "prometheus" / "prometheus.yml").resolve()
    storage = next(a.split("=", 1)[1] for a in prometheus["command"] if "tsdb.path=" in a)
    assert storage in mounts(prometheus)


def test_grafana_provisioning_and_dashboard(compose: dict[str, Any]) -> None:
    grafana = service(compose, "grafana")
    grafana_mounts = mounts(grafana)
    provisioning = bind_source(grafana_mounts["/etc/grafana/provisioning"])

    # The data source is the compose file's Prometheus, on its port.
    (datasource,) = load(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    (prom_port,) = published(service(compose, "prometheus"))
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://prometheus:{prom_port}"
    scrape = load(DEPLOY / "prometheus" / "prometheus.yml")["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape

    # The dashboard provider's folder is a mount of deploy/grafana/dashboards.
    (provider,) = load(provisioning / "dashboards" / "loraswap.yaml")["providers"]
    folder = provider["options"]["path"]
    dashboards = bind_source(grafana_mounts[folder])
    assert (dashboards / "loraswap.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(folder + "/")
    assert (dashboards / home.removeprefix(folder + "/")).is_file()

    # The dashboard's data source variable defaults to this data source.
    dashboard = json.loads((dashboards / "loraswap.json").read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == datasource["uid"]
    assert variable["query"] == datasource["type"]
