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

from brokers import split_urls
from courier.metrics import CourierMetrics, create_courier_metrics
from courier.settings import CourierSettings, load_courier_settings
from services.access_tokens import format_jwt_key, new_jwt_key
from services.keys import new_hmac_key
from services.passwords import HUGE_PAGES_TUNABLE
from services.tokens import format_signing_key, new_signing_key
from tests.support.certs import make_ca
from worker.app import STOP_STEPS_S
from worker.courier_relay import CourierRelayMetrics
from worker.health import LIVE_SILENCE_S, HealthState
from worker.metrics import Metrics, create_metrics
from worker.settings import (
    FILE_SUFFIX,
    Settings,
    SettingsError,
    env_name,
    load_settings,
    secret_fields,
)
from worker.sidecar import Sidecar
from worker.topology import FAST_QUEUE, PASSWORD_QUEUE

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
SLO = ROOT / "deploy" / "prometheus" / "slo.yml"
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


def load_rules(*paths: Path) -> list[dict[str, Any]]:
    """The alerting rules of `paths` (default: alerts.yml and slo.yml, which prometheus.yml
    loads); recording rules are left out."""
    rules = []
    for path in paths or (ALERTS, SLO):
        document = yaml.safe_load(path.read_text())
        assert isinstance(document, dict), f"{path.name} must be a mapping with `groups`"
        groups = document["groups"]
        assert isinstance(groups, list)
        assert groups
        for group in groups:
            assert group["name"], group
            assert group["rules"], f"group {group['name']} has no rules"
            rules.extend(rule for rule in group["rules"] if "alert" in rule)
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
        # Commands answered internal_error and session.verify's latency, by their error
        # budgets' burn rates (slo.yml's recording rules; tests/unit/test_slo.py).
        "identity:commands_failed:ratio_rate",
        "identity:session_verify_slow:ratio_rate",
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
    assert "slo.yml" in config["rule_files"]
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


def test_compose_gives_the_broker_url_as_a_file_the_broker_writes_for_that_user(
    tmp_path: Path,
) -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    script = (ROOT / "deploy" / "rabbitmq" / "compose" / "dev-passwords.sh").read_text()
    users = script.partition('users="')[2].partition('"')[0].split()
    # The script's own lines that write a user's URL file, run on a password of our own.
    writes = script.partition("    printf ")[2].partition("\ndone")[0]
    for service, user in (("worker", "identity-worker"), ("courier", "mail-sender")):
        assert user in users
        environment = services[service]["environment"]
        assert "IDENTITY_AMQP_URL" not in environment
        path = environment["IDENTITY_AMQP_URL_FILE"]
        assert path == f"/run/identity-broker/{user}.amqp-url"
        assert "broker-passwords:/run/identity-broker:ro" in services[service]["volumes"]
        assert "entrypoint" not in services[service]  # the image's own: identity-worker
        (tmp_path / user).write_text("0123abcd")
        env = {"dir": str(tmp_path), "user": user, "PATH": os.environ["PATH"]}
        subprocess.run(["/bin/sh", "-euc", "printf " + writes], env=env, check=True)
        written = tmp_path / Path(path).name
        settings = load_settings(
            {"IDENTITY_DEV_MODE": "true", "IDENTITY_AMQP_URL_FILE": str(written)}
        )
        assert settings.broker_user == user
        assert settings.amqp_url.get_secret_value() == (
            f"amqp://{user}:0123abcd@rabbitmq:5672/identity"
        )


def test_the_compose_tls_variant_verifies_the_broker_and_the_database_everywhere() -> None:
    base = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    tls = yaml.safe_load((ROOT / "compose.tls.yaml").read_text())["services"]
    assert set(tls) - set(base) == {"certs"}
    script = (ROOT / "deploy" / "rabbitmq" / "compose" / "dev-passwords.sh").read_text()
    assert """printf 'amqps://%s:%s@rabbitmq:5671/identity\\n'""" in script
    assert '> "$dir/$user.amqps-url"' in script
    for name, user in (("worker", "identity-worker"), ("courier", "mail-sender")):
        environment = tls[name]["environment"]
        assert environment["IDENTITY_AMQP_URL_FILE"] == f"/run/identity-broker/{user}.amqps-url"
        assert environment["IDENTITY_AMQP_CA_FILE"] == "/certs/ca.crt"
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


def secret_mounts(deployment: str) -> dict[str, str]:
    """Where each Secret volume of `deployment` is mounted: mount path -> Secret name."""
    volumes = {
        v["name"]: v["secret"]["secretName"]
        for v in pod_spec(deployment)["volumes"]
        if "secret" in v
    }
    return {
        m["mountPath"]: volumes[m["name"]]
        for m in container(deployment)["volumeMounts"]
        if m["name"] in volumes
    }


# Settings of their own whose names end in _FILE (paths of PEM files), not secrets from files.
PATH_SETTINGS = {
    env_name(field) for cls in (Settings, CourierSettings) for field in cls.model_fields
}


def secret_files(deployment: str) -> dict[str, tuple[str, str]]:
    """Every `IDENTITY_X_FILE` of `deployment`: variable -> (Secret name, key in it)."""
    mounts = secret_mounts(deployment)
    found = {}
    for name, value in env_of(deployment).items():
        if name in PATH_SETTINGS:
            continue
        if name.endswith(FILE_SUFFIX) and name.startswith("IDENTITY_"):
            directory, _, key = str(value).rpartition("/")
            assert directory in mounts, f"{deployment}: {name} is not in a mounted Secret"
            found[name] = (mounts[directory], key)
    return found


@pytest.mark.parametrize(
    ("deployment", "settings_cls"),
    [("identity-worker", Settings), ("identity-courier", CourierSettings)],
)
def test_every_secret_comes_from_a_file_of_the_secret_the_example_defines(
    deployment: str, settings_cls: type[Settings] | type[CourierSettings]
) -> None:
    example = {
        d["metadata"]["name"]: set(d["stringData"]) for d in k8s_documents("secrets.example.yaml")
    }
    files = secret_files(deployment)
    for secret, key in files.values():
        assert key in example[secret], f"{deployment}: {secret} has no key {key}"
    # Every secret setting is given as a file (the migration URL excepted: the worker does not
    # hold the owner's password), none in the environment, and the Secret has nothing unused.
    wanted = {env_name(f) + FILE_SUFFIX for f in secret_fields(settings_cls)}
    wanted -= {"IDENTITY_MIGRATION_DATABASE_URL_FILE", "IDENTITY_COURIER_TAG_KEY_FILE"}
    assert set(files) == wanted
    assert not set(env_of(deployment)) & {env_name(f) for f in secret_fields(settings_cls)}
    assert "envFrom" not in container(deployment)
    (secret,) = {name for name, _ in files.values()}
    assert {key for _, key in files.values()} == example[secret]
    for volume in pod_spec(deployment)["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] == 0o440
    assert pod_spec(deployment)["securityContext"]["fsGroup"] == 10001
    for mount in container(deployment)["volumeMounts"]:
        if mount["mountPath"] in secret_mounts(deployment):
            assert mount["readOnly"] is True
    # Nothing secret in plain env.
    for name, value in env_of(deployment).items():
        assert not re.search(r"://[^/@]+:[^/@]+@", str(value)), f"{deployment}: {name}"


def test_the_keda_trigger_reads_the_secret_the_example_defines() -> None:
    example = {
        d["metadata"]["name"]: set(d["stringData"]) for d in k8s_documents("secrets.example.yaml")
    }
    auth = k8s_object("TriggerAuthentication", "identity-keda-rabbitmq")
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["key"] in example[ref["name"]]


def test_the_workers_manifest_starts_in_production_with_its_secret_files(tmp_path: Path) -> None:
    """The manifest's environment, its Secret's files filled with real keys, loads in
    production mode: nothing it needs is missing."""
    values = {
        # Production refuses plain text to these hosts: TLS, as secrets.example.yaml has it.
        "amqp-url": "amqps://identity-worker:pw@rabbitmq-0.rabbitmq:5671/identity",
        "database-url": "postgresql://identity:pw@postgres-a:5432/identity?sslmode=verify-full",
        "signing-keys": format_signing_key(new_signing_key()),
        "hmac-key": new_hmac_key(),
        "jwt-keys": format_jwt_key(new_jwt_key()),
    }
    env = {name: str(value) for name, value in env_of("identity-worker").items()}
    for name, (_, key) in secret_files("identity-worker").items():
        (tmp_path / key).write_text(values[key] + "\n")
        env[name] = str(tmp_path / key)
    # The CA the identity-tls Secret would mount.
    (tmp_path / "ca.crt").write_bytes(make_ca("deploy-ca").pem())
    env["IDENTITY_AMQP_CA_FILE"] = str(tmp_path / "ca.crt")
    settings = load_settings(env)
    assert settings.dev_mode is False
    assert settings.broker_user == "identity-worker"
    # The caller policy names the broker users the shipped definitions create.
    definitions = json.loads((ROOT / "deploy" / "rabbitmq" / "definitions.json").read_text())
    assert settings.caller_policy().users <= {user["name"] for user in definitions["users"]}
    assert not settings.caller_policy().is_open


def _deployed_env(deployment: str, directory: Path) -> dict[str, str]:
    """What the deployment's process sees: its plain env, the example Secret's values as the
    files it reads them from, and a real CA file where the mounted one would be."""
    example = {
        d["metadata"]["name"]: d["stringData"] for d in k8s_documents("secrets.example.yaml")
    }
    env = {name: str(value) for name, value in env_of(deployment).items()}
    for name, (secret, key) in secret_files(deployment).items():
        (directory / key).write_text(example[secret][key])
        env[name] = str(directory / key)
    ca = env["IDENTITY_AMQP_CA_FILE"]
    directory_, _, key = ca.rpartition("/")
    assert secret_mounts(deployment)[directory_] == "identity-tls"
    assert key in example["identity-tls"]
    (directory / "ca.crt").write_bytes(make_ca("deploy-ca").pem())
    env["IDENTITY_AMQP_CA_FILE"] = str(directory / "ca.crt")
    return env


def test_the_manifests_reach_the_broker_and_the_database_over_verified_tls(
    tmp_path: Path,
) -> None:
    worker_env = _deployed_env("identity-worker", tmp_path)
    # Production mode (no IDENTITY_DEV_MODE): the transit rules apply. Keys are not the point
    # (the example's are placeholders).
    for key in ("SIGNING_KEYS", "HMAC_KEY", "JWT_KEYS"):
        del worker_env[f"IDENTITY_{key}_FILE"]
    settings = load_settings(worker_env, keys_needed=False)
    assert settings.dev_mode is False
    amqp_urls = settings.amqp_url.get_secret_value().split(",")
    assert all(url.startswith("amqps://") for url in amqp_urls)
    database_url = settings.database_url.get_secret_value()
    assert f"sslmode=verify-full&sslrootcert={ENV_CA}" in database_url
    courier_env = _deployed_env("identity-courier", tmp_path)
    courier = load_courier_settings(courier_env)
    assert courier.dev_mode is False
    assert courier.amqp_url.get_secret_value().startswith("amqps://")

    plain = ",".join(url.replace("amqps://", "amqp://") for url in amqp_urls)
    with pytest.raises(SettingsError, match=r"^IDENTITY_AMQP_URL: plain-text"):
        load_settings(
            {"IDENTITY_AMQP_URL": plain, "IDENTITY_DATABASE_URL": database_url},
            keys_needed=False,
        )


# Where both deployments mount the identity-tls Secret's CA.
ENV_CA = "/etc/identity/tls/ca.crt"


def test_the_courier_runs_the_mail_sender_with_its_settings() -> None:
    assert container("identity-courier")["args"] == ["courier"]
    assert container("identity-worker")["args"] == ["run"]
    assert {"IDENTITY_SMTP_URL_FILE", "IDENTITY_MAIL_FROM"} <= set(env_of("identity-courier"))


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


# -- the example Secrets, as written, start both in production --------------------------------

# What replaces the example's key placeholders: each deployment makes its own keys.
FRESH_KEYS = {
    "signing-keys": lambda: format_signing_key(new_signing_key()),
    "hmac-key": new_hmac_key,
    "jwt-keys": lambda: format_jwt_key(new_jwt_key()),
}


def test_the_manifests_with_the_example_secrets_as_written_load_in_production(
    tmp_path: Path,
) -> None:
    """Everything as secrets.example.yaml writes it (URLs, schemes, hosts), but for the key
    placeholders, replaced by keys made here: the worker loads with its keys checked, in
    production mode, and both see the cluster forms of contract v2, section 3."""
    worker_env = _deployed_env("identity-worker", tmp_path)
    for name, (_, key) in secret_files("identity-worker").items():
        if key in FRESH_KEYS:
            (tmp_path / key).write_text(FRESH_KEYS[key]())
            worker_env[name] = str(tmp_path / key)

    settings = load_settings(worker_env)

    assert settings.dev_mode is False
    assert len(split_urls(settings.amqp_url.get_secret_value())) == 3
    assert "target_session_attrs=read-write" in settings.database_url.get_secret_value()
    courier = load_courier_settings(_deployed_env("identity-courier", tmp_path))
    assert len(split_urls(courier.amqp_url.get_secret_value())) == 3
