"""The files under deploy/ agree with the worker: every metric an alert or a dashboard panel
queries is one the worker really exposes, and every alert has what an on-call needs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from courier.metrics import CourierMetrics, create_courier_metrics
from courier.settings import CourierSettings
from services.passwords import HUGE_PAGES_TUNABLE
from worker.health import LIVE_SILENCE_S, HealthState
from worker.metrics import Metrics, create_metrics
from worker.sidecar import Sidecar

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
METRIC_NAME = re.compile(r"\bidentity_[a-z_]+")
JOB = "identity-worker"
COURIER_JOB = "identity-courier"


def _exposition_names(metrics: Metrics | CourierMetrics) -> set[str]:
    """Sample names of a fresh /metrics text, every labelled metric touched once (a labelled
    metric shows no series until a label set is used)."""
    for name in type(metrics).__dataclass_fields__:
        metric = getattr(metrics, name)
        # prometheus_client has no public accessor for a metric's label names.
        labels = getattr(metric, "_labelnames", ())
        if labels:
            metric.labels(*["x"] * len(labels))
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}


def exposed_names() -> set[str]:
    """Sample names of a fresh worker's /metrics text."""
    return _exposition_names(create_metrics())


@pytest.fixture(scope="module")
def exposed() -> set[str]:
    return exposed_names()


@pytest.fixture(scope="module")
def exposed_by_courier() -> set[str]:
    """Sample names of the mail sender's /metrics text (its own sidecar and scrape job)."""
    return _exposition_names(create_courier_metrics())


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    assert isinstance(document, dict), "alerts.yml must be a mapping with `groups`"
    groups = document["groups"]
    assert isinstance(groups, list)
    assert groups
    rules = []
    for group in groups:
        assert group["name"], group
        assert group["rules"], f"group {group['name']} has no rules"
        rules.extend(group["rules"])
    return rules


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def runbook_anchors() -> set[str]:
    """GitHub's anchors for the runbook's headings: lower case, spaces to dashes, no punctuation."""
    headings = re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    return {
        re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-") for heading in headings
    }


def test_the_exposition_has_the_suffixed_series_the_rules_rely_on(exposed: set[str]) -> None:
    assert {
        "identity_commands_total",
        "identity_command_duration_seconds_bucket",
        "identity_dead_letters_total",
        "identity_ready",
    } <= exposed


def test_every_alert_has_an_expression_a_duration_a_severity_and_a_runbook() -> None:
    anchors = runbook_anchors()
    for rule in load_rules():
        name = rule["alert"]
        assert rule["expr"].strip(), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), f"{name}: `for` must be a duration"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        anchor = annotations["runbook_url"].partition("docs/runbook.md#")[2]
        assert anchor in anchors, f"{name}: no runbook section #{anchor}"


def test_alert_expressions_name_only_metrics_the_worker_exposes(
    exposed: set[str], exposed_by_courier: set[str]
) -> None:
    named = {name for rule in load_rules() for name in METRIC_NAME.findall(rule["expr"])}
    assert named, "no alert looks at a worker metric"
    known = exposed | exposed_by_courier
    assert named <= known, f"unknown metrics in alerts.yml: {sorted(named - known)}"
    assert named & exposed_by_courier, "no alert looks at the mail sender"


def test_the_alerts_cover_the_states_an_operator_must_hear_about() -> None:
    exprs = " ".join(rule["expr"] for rule in load_rules())
    for needed in (
        f'up{{job="{JOB}"}} == 0',
        "identity_ready == 0",
        "increase(identity_dead_letters_total[10m])",
        "identity_outbox_oldest_age_seconds",
        'outcome="internal_error"',
        "histogram_quantile(0.99",
        "identity_broker_connected == 0",
        "identity_database_up == 0",
        # The mail sender: down, its SMTP server, its failures, the courier queue's backlog.
        f'up{{job="{COURIER_JOB}"}} == 0',
        "identity_courier_smtp_up == 0",
        "identity_courier_ready == 0",
        "rate(identity_courier_failed_total",
        'identity_courier_failed_total{reason="expired"}',
        "max(identity_courier_queue_messages)",
    ):
        assert needed in exprs, needed


def test_the_scrape_config_loads_the_rules_under_the_job_they_expect() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert "alerts.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs[JOB]["metrics_path"] == "/metrics"
    assert jobs[COURIER_JOB]["metrics_path"] == "/metrics"
    courier_port = str(CourierSettings.model_fields["http_port"].default)
    assert jobs[COURIER_JOB]["static_configs"][0]["targets"][0].endswith(":" + courier_port)


def test_dashboard_queries_name_only_metrics_the_worker_exposes(exposed: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    named: set[str] = set()
    for panel in dashboard_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            found = set(METRIC_NAME.findall(target["expr"]))
            assert found or "process_" in target["expr"] or "up{" in target["expr"], panel
            named |= found
    assert named <= exposed, f"unknown metrics in dashboard.json: {sorted(named - exposed)}"
    # Every worker metric has a panel, so a new one is not forgotten here.
    families = {
        n.removesuffix("_bucket")
        for n in exposed
        if n.startswith("identity_") and not n.endswith(("_created", "_sum", "_count"))
    }
    missing = families - {n.removesuffix("_bucket") for n in named}
    assert not missing, f"metrics without a panel: {sorted(missing)}"


def test_dashboard_has_a_datasource_variable_and_unique_panel_ids() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    panels = list(dashboard_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["title"], panel["id"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_container_and_make_run_start_the_worker_with_huge_pages_for_argon2() -> None:
    final_stage = (ROOT / "Dockerfile").read_text().rpartition("\nFROM ")[2]
    env_lines = [line for line in final_stage.splitlines() if line.startswith("ENV ")]
    assert any(f"GLIBC_TUNABLES={HUGE_PAGES_TUNABLE}" in line.split() for line in env_lines)
    run_target = (ROOT / "Makefile").read_text().partition("\nrun:")[2].partition("\n\n")[0]
    # The caller's own tunables come after the default, so an explicit value wins.
    prefixed = f"GLIBC_TUNABLES={HUGE_PAGES_TUNABLE}$${{GLIBC_TUNABLES:+:$$GLIBC_TUNABLES}}"
    assert f"{prefixed} $(BIN)/identity-worker run" in run_target


def test_the_image_healthcheck_asks_the_sidecar_on_the_configured_port() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    command = dockerfile.partition("HEALTHCHECK")[2].partition('CMD python -c "')[2]
    snippet = command.partition('"\n')[0]
    clock = [1000.0]
    health = HealthState(clock=lambda: clock[0])
    sidecar = Sidecar("127.0.0.1", 0, create_metrics().registry, health)
    port = sidecar.start()
    try:

        def check() -> int:
            env = {**os.environ, "IDENTITY_HTTP_PORT": str(port)}
            return subprocess.run([sys.executable, "-c", snippet], env=env, check=False).returncode

        assert check() == 0
        health.beat()
        clock[0] += LIVE_SILENCE_S  # the event loop stopped turning
        assert check() != 0
    finally:
        sidecar.stop()


def test_only_make_run_and_compose_set_dev_mode_and_compose_ships_no_key() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    worker, migrate = services["worker"]["environment"], services["migrate"]["environment"]
    assert worker["IDENTITY_DEV_MODE"] == "true"
    assert migrate["IDENTITY_DEV_MODE"] == "true"
    assert not any(name.endswith("_KEYS") or name.endswith("_KEY") for name in worker)
    run_target = (ROOT / "Makefile").read_text().partition("\nrun:")[2].partition("\n\n")[0]
    assert "IDENTITY_DEV_MODE=true" in run_target
    assert "IDENTITY_DEV_MODE" not in (ROOT / "Dockerfile").read_text()


def test_compose_runs_the_worker_as_its_own_role_and_migrates_as_the_owner() -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    worker, migrate = services["worker"], services["migrate"]
    assert "identity_worker:" in worker["environment"]["IDENTITY_DATABASE_URL"]
    assert "IDENTITY_MIGRATION_DATABASE_URL" not in worker["environment"]
    assert worker["environment"]["IDENTITY_MIGRATE_ON_START"] == "false"
    assert migrate["command"] == ["migrate"]
    assert "identity_owner:" in migrate["environment"]["IDENTITY_MIGRATION_DATABASE_URL"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    init = " ".join(services["postgres"]["volumes"])
    assert "deploy/postgres/init-roles.sh:/docker-entrypoint-initdb.d/" in init
