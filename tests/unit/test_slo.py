"""The service-level objectives (deploy/prometheus/slo.yml): promtool accepts the rules, its
unit tests (slo_test.yml) prove each alert fires on a synthetic burn and stays quiet when the
objective is met, and every series the rules read is one the worker exports.

promtool comes from the Debian package `prometheus`; `make test` installs it when missing
(scripts/ensure-tools.sh). Without it these tests fail, never skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_deploy import METRIC_NAME, exposed_names, runbook_anchors
from worker.metrics import LATENCY_BUCKETS, OUTCOMES

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
SLO = PROMETHEUS_DIR / "slo.yml"
SLO_TEST = PROMETHEUS_DIR / "slo_test.yml"
# The objectives the runbook documents: session.verify within 50 ms for 99%, and 99.9% of
# commands answered without internal_error.
VERIFY_THRESHOLD_S = 0.05
VERIFY_BUDGET = 0.01
SUCCESS_BUDGET = 0.001
# Burn rates and windows of the multi-window alerts: (factor, long window, short window).
PAGE = {(14.4, "1h", "5m"), (6.0, "6h", "30m")}
TICKET = {(3.0, "1d", "2h"), (1.0, "3d", "6h")}
RECORDED = re.compile(r"identity:[a-z_]+:ratio_rate(\w+)")


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: run scripts/ensure-tools.sh (make test does), which installs "
            "the Debian package prometheus",
            pytrace=False,
        )
    return found


def run(promtool: str, *args: str) -> str:
    done = subprocess.run(
        [promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def groups() -> list[dict[str, Any]]:
    document = yaml.safe_load(SLO.read_text())
    found: list[dict[str, Any]] = document["groups"]
    return found


def recording_rules() -> dict[str, str]:
    return {r["record"]: r["expr"] for g in groups() for r in g["rules"] if "record" in r}


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in groups() for r in g["rules"] if "alert" in r}


def test_promtool_accepts_the_rules_and_the_configuration_that_loads_them(promtool: str) -> None:
    checked = run(promtool, "check", "rules", "slo.yml", "alerts.yml")
    assert f"SUCCESS: {sum(len(g['rules']) for g in groups())} rules found" in checked
    config = run(promtool, "check", "config", "prometheus.yml")
    assert "slo.yml" in config
    assert "SUCCESS" in config


def test_the_alerts_fire_on_synthetic_burns_and_not_on_healthy_traffic(promtool: str) -> None:
    assert "SUCCESS" in run(promtool, "test", "rules", SLO_TEST.name)


def test_the_promtool_tests_cover_every_alert_firing_and_quiet() -> None:
    document = yaml.safe_load(SLO_TEST.read_text())
    assert document["rule_files"] == [SLO.name]
    fired, quiet = set(), set()
    for case in document["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fired == set(alerts()), "an alert no test makes fire"
    assert quiet == set(alerts()), "an alert no test shows quiet"


def test_the_rules_read_only_series_the_worker_exports() -> None:
    exposed = exposed_names()
    named = {name for expr in recording_rules().values() for name in METRIC_NAME.findall(expr)}
    assert named == {
        "identity_command_duration_seconds_bucket",
        "identity_command_duration_seconds_count",
        "identity_commands_total",
    }
    assert named <= exposed
    # The latency threshold is a bucket boundary, as the worker writes it, so the ratio is
    # exact rather than interpolated.
    assert VERIFY_THRESHOLD_S in LATENCY_BUCKETS
    for expr in recording_rules().values():
        if "duration" in expr:
            assert f'le="{VERIFY_THRESHOLD_S}"' in expr
            assert 'command="session.verify"' in expr
        else:
            assert 'outcome="internal_error"' in expr
    assert "internal_error" in OUTCOMES


def test_each_window_has_its_recording_rule_and_each_alert_uses_both_of_a_pair() -> None:
    recorded = recording_rules()
    windows = {w for pair in PAGE | TICKET for w in pair[1:]}
    for sli in ("session_verify_slow", "commands_failed"):
        assert {f"identity:{sli}:ratio_rate{w}" for w in windows} <= set(recorded)
        for window in windows:
            expr = recorded[f"identity:{sli}:ratio_rate{window}"]
            assert expr.count(f"[{window}]") == 2, window  # numerator and denominator
    for name, rule in alerts().items():
        budget = VERIFY_BUDGET if "Verify" in name else SUCCESS_BUDGET
        pairs = PAGE if name.endswith("Fast") else TICKET
        for factor, long, short in pairs:
            for window in (long, short):
                needle = f"ratio_rate{window} > ({factor:g} * {budget:g})"
                assert needle in rule["expr"], f"{name}: {needle}"
        used = set(RECORDED.findall(rule["expr"]))
        assert used == {w for pair in pairs for w in pair[1:]}, name


def test_each_alert_pages_or_tickets_and_has_its_runbook_section() -> None:
    anchors = runbook_anchors()
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] == ("critical" if name.endswith("Fast") else "warning")
        assert rule["labels"]["slo"] in {"session-verify-latency", "command-success"}
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        anchor = rule["annotations"]["runbook_url"].partition("docs/runbook.md#")[2]
        assert anchor in anchors, f"{name}: no runbook section #{anchor}"
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    assert "## Service-level objectives" in runbook
