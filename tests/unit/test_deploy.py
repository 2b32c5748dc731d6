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

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from prometheus_client import generate_latest

from courier.metrics import CourierMetrics, create_courier_metrics
from courier.settings import CourierSettings, load_courier_settings
from services.passwords import HUGE_PAGES_TUNABLE
from tests.support.certs import make_ca
from worker.app import STOP_STEPS_S
from worker.courier_relay import CourierRelayMetrics
from worker.health import LIVE_SILENCE_S, HealthState
from worker.metrics import Metrics, create_metrics
from worker.settings import Settings, SettingsError, load_settings
from worker.sidecar import Sidecar
from worker.topology import FAST_QUEUE, PASSWORD_QUEUE

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
    courier = CourierRelayMetrics.on(metrics.registry)  # registered beside them by build()
    courier.relayed_total.labels("x")
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


def test_the_compose_tls_variant_verifies_the_broker_and_the_database_everywhere() -> None:
    base = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    tls = yaml.safe_load((ROOT / "compose.tls.yaml").read_text())["services"]
    assert set(tls) - set(base) == {"certs"}
    for name in ("worker", "courier"):
        (command,) = [part for part in tls[name]["entrypoint"] if "IDENTITY_AMQP_URL" in part]
        assert "amqps://" in command, name
        assert "@rabbitmq:5671/" in command, name
        assert tls[name]["environment"]["IDENTITY_AMQP_CA_FILE"] == "/certs/ca.crt"
    urls = [
        tls["worker"]["environment"]["IDENTITY_DATABASE_URL"],
        *tls["migrate"]["environment"].values(),
    ]
    assert all("sslmode=verify-full&sslrootcert=/certs/ca.crt" in url for url in urls)
    assert "ssl=on" in tls["postgres"]["command"]
    conf = (ROOT / "deploy" / "rabbitmq" / "compose" / "tls.conf").read_text()
    assert "listeners.ssl.default = 5671" in conf
    assert "ssl_options.cacertfile = /certs/ca.crt" in conf
    for name in ("rabbitmq", "postgres"):
        assert tls[name]["depends_on"]["certs"]["condition"] == "service_completed_successfully"


# -- Kubernetes (deploy/k8s) -------------------------------------------------------------------

K8S = ROOT / "deploy" / "k8s"
BENCH_RESULT = ROOT / "bench" / "results" / "2026-12-02-7ce46c6.json"
# Kinds that are not in Kubernetes' own schemas: checked field by field below instead.
KEDA_API = "keda.sh/v1alpha1"
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
# The fields KEDA 2.x documents for a ScaledObject (reference/scaledobject-spec), its
# triggers, and the rabbitmq scaler's metadata (scalers/rabbitmq-queue).
SCALED_OBJECT_SPEC = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
}  # fmt: skip
SCALE_TARGET_REF = {"apiVersion", "kind", "name", "envSourceContainerName"}
ADVANCED = {"restoreToOriginalReplicaCount", "horizontalPodAutoscalerConfig", "scalingModifiers"}
HPA_CONFIG = {"name", "behavior"}
TRIGGER = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
RABBITMQ_METADATA = {
    "host", "hostFromEnv", "protocol", "mode", "value", "activationValue", "queueName",
    "vhostName", "useRegex", "pageSize", "operation", "timeout", "excludeUnacknowledged",
    "unsafeSsl",
}  # fmt: skip
TRIGGER_AUTHENTICATION_SPEC = {"secretTargetRef", "env", "podIdentity", "hashiCorpVault"}


def k8s_documents(*names: str) -> list[dict[str, Any]]:
    """Every YAML document in deploy/k8s (or in the files named)."""
    paths = [K8S / name for name in names] if names else sorted(K8S.glob("*.yaml"))
    assert paths, "no manifests in deploy/k8s"
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(deployment: str) -> dict[str, Any]:
    spec: dict[str, Any] = k8s_object("Deployment", deployment)["spec"]["template"]["spec"]
    return spec


def container(deployment: str) -> dict[str, Any]:
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1
    first: dict[str, Any] = containers[0]
    return first


def env_of(deployment: str) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity.removesuffix(suffix)) * factor
    raise AssertionError(f"memory quantity in an unexpected unit: {quantity}")


def test_kubernetes_validate_works_offline_from_its_own_schemas() -> None:
    versions = all_versions()
    assert versions, "kubernetes-validate ships no schemas"
    broken = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
              "spec": {"ports": [{"port": "not a number"}]}}  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, versions[-1], strict=True)


@pytest.mark.parametrize("version", ["oldest", "newest"])
def test_every_kubernetes_manifest_validates_against_the_schemas(version: str) -> None:
    versions = all_versions()
    wanted = versions[0] if version == "oldest" else versions[-1]
    validated = set()
    for doc in k8s_documents():
        if doc["apiVersion"] in (KEDA_API, KUSTOMIZE_API):
            continue  # custom resources: test_the_scaled_object_... and the kustomization test
        # strict: an unknown or misspelt field fails too.
        kubernetes_validate.validate(doc, wanted, strict=True)
        validated.add(doc["kind"])
    assert validated == {"Deployment", "Service", "PodDisruptionBudget", "Secret"}


def test_the_kustomization_lists_every_manifest_but_the_example_secrets() -> None:
    (kustomization,) = k8s_documents("kustomization.yaml")
    assert kustomization["apiVersion"] == KUSTOMIZE_API
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secrets.example.yaml"}


@pytest.mark.parametrize("deployment", ["identity-worker", "identity-courier"])
def test_pods_run_locked_down_as_the_image_user(deployment: str) -> None:
    uid = int(re.search(r"useradd [^\n]*--uid (\d+)", (ROOT / "Dockerfile").read_text())[1])
    pod = pod_spec(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    security = container(deployment)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert env_of(deployment)["PYTHONDONTWRITEBYTECODE"] == "1"


@pytest.mark.parametrize("deployment", ["identity-worker", "identity-courier"])
def test_probes_ask_the_sidecar_on_its_port(deployment: str) -> None:
    box = container(deployment)
    port = int(env_of(deployment)["IDENTITY_HTTP_PORT"])
    assert {p["name"]: p["containerPort"] for p in box["ports"]} == {"http": port}
    assert box["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert box["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # Liveness gives a stalled loop longer than the sidecar takes to call it stalled.
    liveness = box["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= LIVE_SILENCE_S


def test_the_worker_gets_longer_to_stop_than_its_drain_takes() -> None:
    grace = float(env_of("identity-worker")["IDENTITY_SHUTDOWN_GRACE_S"])
    assert grace == Settings.model_fields["shutdown_grace_s"].default
    assert pod_spec("identity-worker")["terminationGracePeriodSeconds"] > grace + STOP_STEPS_S
    assert pod_spec("identity-courier")["terminationGracePeriodSeconds"] > grace + STOP_STEPS_S


def test_worker_resources_come_from_the_benchmark() -> None:
    median = json.loads(BENCH_RESULT.read_text())["median"]
    resources = container("identity-worker")["resources"]
    assert mebibytes(resources["requests"]["memory"]) >= median["rss_default_mib"]
    assert mebibytes(resources["limits"]["memory"]) >= 1.25 * median["rss_large_mib"]
    # One argon2 thread per requested core, as the benchmark's pool (one per core).
    hash_workers = int(env_of("identity-worker")["IDENTITY_HASH_WORKERS"])
    assert hash_workers == median["argon2_ceiling"]["pool_workers"]
    assert float(resources["requests"]["cpu"]) == hash_workers
    assert "cpu" not in resources["limits"]
    text = (K8S / "worker.yaml").read_text()
    assert BENCH_RESULT.name in text, "say where the resource figures come from"


def test_secrets_are_read_from_the_secrets_the_example_defines() -> None:
    example = {
        d["metadata"]["name"]: set(d["stringData"]) for d in k8s_documents("secrets.example.yaml")
    }
    worker = container("identity-worker")
    (source,) = worker["envFrom"]
    assert example[source["secretRef"]["name"]] == {
        "IDENTITY_AMQP_URL", "IDENTITY_DATABASE_URL", "IDENTITY_SIGNING_KEYS",
    }  # fmt: skip
    courier = env_of("identity-courier")
    for name in ("IDENTITY_AMQP_URL", "IDENTITY_SMTP_URL"):
        ref = courier[name]["secretKeyRef"]
        assert ref["key"] in example[ref["name"]]
    auth = k8s_object("TriggerAuthentication", "identity-keda-rabbitmq")
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["key"] in example[ref["name"]]
    # Nothing secret in plain env.
    for deployment in ("identity-worker", "identity-courier"):
        for name, value in env_of(deployment).items():
            assert not re.search(r"://[^/@]+:[^/@]+@", str(value)), f"{deployment}: {name}"


def _deployed_env(deployment: str, secret: str, ca_file: Path) -> dict[str, str]:
    """What the deployment's process sees: its plain env, the example Secret's values, and
    a real CA file where the mounted one would be."""
    example = {
        d["metadata"]["name"]: d["stringData"] for d in k8s_documents("secrets.example.yaml")
    }
    env = {name: value for name, value in env_of(deployment).items() if isinstance(value, str)}
    env.update(example[secret])
    mounted = env["IDENTITY_AMQP_CA_FILE"]
    assert mounted == "/etc/identity/tls/ca.crt"
    assert f"sslrootcert={mounted}" in env.get("IDENTITY_DATABASE_URL", f"sslrootcert={mounted}")
    env["IDENTITY_AMQP_CA_FILE"] = str(ca_file)
    return env


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca.crt"
    path.write_bytes(make_ca("deploy-ca").pem())
    return path


def test_the_manifests_reach_the_broker_and_the_database_over_verified_tls(
    ca_file: Path,
) -> None:
    worker_env = _deployed_env("identity-worker", "identity-worker", ca_file)
    # Production mode (no IDENTITY_DEV_MODE): the transit rules apply. Keys are not the point
    # (the example's are placeholders).
    del worker_env["IDENTITY_SIGNING_KEYS"]
    settings = load_settings(worker_env, keys_needed=False)
    assert settings.dev_mode is False
    assert all(url.startswith("amqps://") for url in worker_env["IDENTITY_AMQP_URL"].split(","))
    assert "sslmode=verify-full" in worker_env["IDENTITY_DATABASE_URL"]
    courier_env = _deployed_env("identity-courier", "identity-courier", ca_file)
    assert load_courier_settings(courier_env).dev_mode is False

    plain = worker_env["IDENTITY_AMQP_URL"].replace("amqps://", "amqp://")
    with pytest.raises(SettingsError, match=r"^IDENTITY_AMQP_URL: plain-text"):
        load_settings(
            {**worker_env, "IDENTITY_AMQP_URL": plain, "IDENTITY_AMQP_CA_FILE": ""},
            keys_needed=False,
        )


def test_the_courier_runs_the_mail_sender_with_its_settings() -> None:
    assert container("identity-courier")["args"] == ["courier"]
    assert container("identity-worker")["args"] == ["run"]
    assert {"IDENTITY_SMTP_URL", "IDENTITY_MAIL_FROM"} <= set(env_of("identity-courier"))


@pytest.mark.parametrize("deployment", ["identity-worker", "identity-courier"])
def test_each_deployment_has_a_disruption_budget_that_selects_its_pods(deployment: str) -> None:
    budget = k8s_object("PodDisruptionBudget", deployment)["spec"]
    spec = k8s_object("Deployment", deployment)["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert budget["maxUnavailable"] == 1
    assert spec["replicas"] >= 2, "one pod and a budget of one: a drain takes it all"


def test_the_metrics_service_reaches_the_worker_sidecar() -> None:
    service = k8s_object("Service", "identity-worker-metrics")
    labels = k8s_object("Deployment", "identity-worker")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    assert service["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def test_the_scaled_object_scales_the_worker_on_both_command_queues() -> None:
    scaled = k8s_object("ScaledObject", "identity-worker")
    assert scaled["apiVersion"] == KEDA_API
    spec = scaled["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC, set(spec) - SCALED_OBJECT_SPEC
    assert set(spec["scaleTargetRef"]) <= SCALE_TARGET_REF
    assert spec["scaleTargetRef"]["name"] == "identity-worker"
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    for field in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec[field], int), field
    assert 2 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    assert (
        spec["minReplicaCount"]
        > k8s_object("PodDisruptionBudget", "identity-worker")["spec"]["maxUnavailable"]
    )
    assert set(spec["fallback"]) == {"failureThreshold", "replicas"}
    assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    assert set(spec["advanced"]) <= ADVANCED
    assert set(spec["advanced"]["horizontalPodAutoscalerConfig"]) <= HPA_CONFIG
    queues = set()
    for trigger in spec["triggers"]:
        assert set(trigger) <= TRIGGER, set(trigger) - TRIGGER
        assert trigger["type"] == "rabbitmq"
        metadata = trigger["metadata"]
        assert set(metadata) <= RABBITMQ_METADATA, set(metadata) - RABBITMQ_METADATA
        # KEDA's metadata is a map of strings: a bare number is refused by the CRD.
        assert all(isinstance(v, str) for v in metadata.values()), metadata
        assert metadata["mode"] == "QueueLength"
        assert int(metadata["value"]) > 0
        # http (the management API) counts the messages the workers hold unacked, too.
        assert metadata["protocol"] == "http"
        assert "host" not in metadata, "the URL has a password: TriggerAuthentication"
        auth = k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert auth["apiVersion"] == KEDA_API
        assert set(auth["spec"]) <= TRIGGER_AUTHENTICATION_SPEC
        assert [r["parameter"] for r in auth["spec"]["secretTargetRef"]] == ["host"]
        queues.add(metadata["queueName"])
    assert queues == {FAST_QUEUE, PASSWORD_QUEUE}
