"""The Helm chart, rendered by the real helm binary: lint, Kubernetes schemas, and what matters in it."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from quotad_server import __version__
from quotad_server.policy import parse_policy
from quotad_server.server import LIVENESS_SERVICE, SERVICE_NAME

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "quotad"
SCENARIOS = sorted(path.name for path in (CHART / "ci").glob("*-values.yaml"))
KUBERNETES = "1.33.0"  # validated against this version's OpenAPI schemas (kubernetes-validate ships them)
EXAMPLE_POLICY = ROOT / "server" / "quotad_server" / "examples" / "policy.yaml"
Manifest = dict[str, Any]


@functools.cache
def helm() -> str:
    found = shutil.which("helm") or str(ROOT / ".tools" / "bin" / "helm")
    if not Path(found).exists():
        pytest.fail("helm is not installed: `make tools` installs it into .tools/bin")
    return found


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=60, check=False)


@functools.cache
def _render(values: tuple[str, ...], sets: tuple[str, ...]) -> tuple[Manifest, ...]:
    args = ["template", "q", str(CHART), "--namespace", "llm", "--kube-version", KUBERNETES]
    for path in values:
        args += ["-f", path]
    for assignment in sets:
        args += ["--set", assignment]
    result = run_helm(*args)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(
    scenario: str = "default-values.yaml", *extra: str | Path, sets: tuple[str, ...] = ()
) -> list[Manifest]:
    files = (str(CHART / "ci" / scenario), *(str(path) for path in extra))
    return list(_render(files, sets))


def one(manifests: list[Manifest], kind: str, suffix: str = "") -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{len(found)} {kind} named *{suffix}"
    return found[0]


def container(manifests: list[Manifest]) -> Manifest:
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    found: Manifest = pod["containers"][0]
    return found


def env(manifests: list[Manifest]) -> dict[str, Manifest]:
    return {entry["name"]: entry for entry in container(manifests)["env"]}


# -- every scenario: lint, render, schemas ---------------------------------------------------------


def test_every_scenario_is_tested() -> None:
    assert set(SCENARIOS) >= {
        "default-values.yaml",
        "external-redis-tls-values.yaml",
        "autoscaling-values.yaml",
        "metrics-off-values.yaml",
    }


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_passes_strictly(scenario: str) -> None:
    result = run_helm("lint", "--strict", str(CHART), "-f", str(CHART / "ci" / scenario))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_manifests_are_valid_kubernetes(scenario: str) -> None:
    manifests = render(scenario)
    kinds = set()
    for manifest in manifests:
        kinds.add(manifest["kind"])
        if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            # A CRD, not in the Kubernetes schemas: check the fields prometheus-operator needs.
            assert manifest["kind"] == "ServiceMonitor"
            assert manifest["spec"]["endpoints"][0]["port"] == "metrics"
            assert manifest["spec"]["selector"]["matchLabels"]
            continue
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)  # raises on any bad field
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds
    assert "Secret" not in kinds  # the chart never holds a secret: it only references them


# -- the things that matter ------------------------------------------------------------------------


def test_probes_are_native_grpc_on_health_names_the_server_serves() -> None:
    spec = container(render())
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert set(spec[probe]) >= {"grpc"}, probe
        assert spec[probe]["grpc"]["port"] == 50051
        assert "httpGet" not in spec[probe]
        assert "exec" not in spec[probe]
    # Liveness must not follow Redis (or a Redis outage restarts every pod); readiness must.
    assert spec["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert spec["startupProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert spec["readinessProbe"]["grpc"]["service"] == SERVICE_NAME


def test_the_policy_checksum_rolls_pods_only_when_asked(tmp_path: Path) -> None:
    def checksum(manifests: list[Manifest]) -> str | None:
        annotations = one(manifests, "Deployment")["spec"]["template"]["metadata"].get("annotations") or {}
        found: str | None = annotations.get("checksum/policy")
        return found

    default = checksum(render())
    assert default is not None
    assert re.fullmatch(r"[0-9a-f]{64}", default)
    changed = tmp_path / "changed.yaml"
    policy = yaml.safe_load((CHART / "values.yaml").read_text())["policy"]
    policy["tiers"]["free"]["limits"][0]["limit"] = 11
    changed.write_text(yaml.safe_dump({"policy": policy}))
    assert checksum(render("default-values.yaml", changed)) not in (None, default)
    assert checksum(render("default-values.yaml", sets=("redis.keyPrefix=other",))) == default
    # Hot reload only: no checksum, so a policy change restarts nothing.
    assert checksum(render("metrics-off-values.yaml")) is None
    assert checksum(render(sets=("policyExistingConfigMap=my-policy",))) is None


def test_the_policy_configmap_is_a_policy_quotad_accepts_and_is_mounted_as_a_directory() -> None:
    manifests = render()
    text = one(manifests, "ConfigMap", "-policy")["data"]["policy.yaml"]
    policy = parse_policy(text, "configmap")
    assert policy.tier_limits == parse_policy(EXAMPLE_POLICY.read_text(), "example").tier_limits
    assert env(manifests)["QUOTAD_POLICY"]["value"] == "/etc/quotad/policy/policy.yaml"
    mount = next(m for m in container(manifests)["volumeMounts"] if m["name"] == "policy")
    assert mount["mountPath"] == "/etc/quotad/policy"
    assert "subPath" not in mount  # a subPath mount never sees ConfigMap updates
    mine = render(sets=("policyExistingConfigMap=my-policy",))
    assert not [m for m in mine if m["kind"] == "ConfigMap" and m["metadata"]["name"].endswith("-policy")]
    volumes = one(mine, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "policy", "configMap": {"name": "my-policy"}} in volumes


def test_no_secret_value_is_inlined() -> None:
    manifests = render("external-redis-tls-values.yaml")
    variables = env(manifests)
    for name in ("QUOTAD_REDIS_URL", "QUOTAD_REDIS_PASSWORD"):
        assert "value" not in variables[name]
        assert variables[name]["valueFrom"]["secretKeyRef"]["name"] == "quotad-redis"
    assert variables["QUOTAD_REDIS_TLS_CA_FILE"]["value"] == "/etc/quotad/redis-tls/ca.crt"
    assert variables["QUOTAD_REDIS_TLS_KEY_FILE"]["value"] == "/etc/quotad/redis-tls/tls.key"
    volumes = one(manifests, "Deployment")["spec"]["template"]["spec"]["volumes"]
    tls = {"name": "redis-tls", "secret": {"secretName": "quotad-redis-tls", "defaultMode": 0o440}}
    assert tls in volumes
    # A password in the URL is refused at install, naming the field.
    result = run_helm(
        "template",
        "q",
        str(CHART),
        "--kube-version",
        KUBERNETES,
        "--set",
        "redis.url=redis://:hunter2@r:6379/0",
    )
    assert result.returncode != 0
    assert "/redis/url" in result.stderr
    # Nothing in any scenario looks like a credential.
    for scenario in SCENARIOS:
        for entry in env(render(scenario)).values():
            assert not re.search(r"://[^/@\s]*:[^/@\s]*@", str(entry.get("value", "")))


def test_security_context_is_non_root_read_only_and_matches_the_image_user() -> None:
    manifests = render()
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    context = container(manifests)["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # The uid the pod asks for is the one the Dockerfile creates and runs as.
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert user is not None
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        int(user.group(1)),
        int(user.group(2)),
    )
    assert {"name": "tmp", "mountPath": "/tmp"} in container(manifests)["volumeMounts"]


def test_defaults_spread_two_replicas_and_drain_before_the_kubelet_kills() -> None:
    manifests = render()
    deployment = one(manifests, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert (
        term["podAffinityTerm"]["labelSelector"]["matchLabels"]
        == deployment["spec"]["selector"]["matchLabels"]
    )
    spec = container(manifests)
    assert set(spec["resources"]) == {"requests", "limits"}
    assert spec["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    variables = env(manifests)
    budget = 5 + int(variables["QUOTAD_SHUTDOWN_DRAIN_MS"]["value"]) / 1000
    budget += int(variables["QUOTAD_SHUTDOWN_GRACE_S"]["value"])
    assert pod["terminationGracePeriodSeconds"] > budget
    assert one(manifests, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    service = one(manifests, "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 50051, "metrics": 9090}
    assert variables["QUOTAD_METRICS_LISTEN"]["value"] == "0.0.0.0:9090"


def test_the_image_tag_defaults_to_the_app_version_which_is_the_servers() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
    assert container(render())["image"] == f"quotad:{__version__}"
    assert container(render(sets=("image.tag=0.2.0-rc1",)))["image"] == "quotad:0.2.0-rc1"


def test_autoscaling_replaces_the_replica_count() -> None:
    manifests = render("autoscaling-values.yaml")
    assert "replicas" not in one(manifests, "Deployment")["spec"]
    hpa = one(manifests, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(manifests, "Deployment")["metadata"]["name"]
    assert one(manifests, "ServiceMonitor")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    required = one(manifests, "Deployment")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in required


def test_metrics_off_removes_the_port_the_setting_and_the_dashboard() -> None:
    manifests = render("metrics-off-values.yaml")
    assert [p["name"] for p in one(manifests, "Service")["spec"]["ports"]] == ["grpc"]
    assert "QUOTAD_METRICS_LISTEN" not in env(manifests)
    assert not [m for m in manifests if m["metadata"]["name"].endswith("-dashboard")]
    password = env(manifests)["QUOTAD_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password == {"name": "quotad-redis", "key": "password"}


def test_the_dashboard_configmap_carries_the_sidecar_label_and_the_shipped_json() -> None:
    dashboard = one(render("autoscaling-values.yaml"), "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "quotad"}
    shipped = json.loads((CHART / "dashboards" / "quotad.json").read_text())
    assert json.loads(dashboard["data"]["quotad.json"]) == shipped


def test_network_policy_admits_only_the_named_clients() -> None:
    policy = one(render("external-redis-tls-values.yaml"), "NetworkPolicy")
    grpc_rule = policy["spec"]["ingress"][0]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert grpc_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llm-gateway"}}}
    ]


def test_notes_show_the_grpcurl_health_check() -> None:
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    assert "grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check" in notes
    assert 'port-forward svc/{{ include "quotad.fullname" . }}' in notes


# -- wrong values fail at install --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("replicaCount=two", "/replicaCount"),
        ("replicaCount=0", "/replicaCount"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("redis.url=localhost:6379", "/redis/url"),
        ("redis.timeoutMs=0", "/redis/timeoutMs"),
        ("logLevel=loud", "/logLevel"),
        ("podAntiAffinity=strict", "/podAntiAffinity"),
        ("replicas=3", "replicas"),  # a misspelt key is refused, not ignored
        ("policy.tiers.free.limits[0].metric=tokens", "/policy/tiers/free/limits/0/metric"),
        ("policy.tiers.free.limits[0].period=1 hour", "/policy/tiers/free/limits/0/period"),
        ("policy.retention=forever", "/policy/retention"),
        ("redis.existingSecret=s", "not both"),
        ("redis.passwordSecret=s", "needs redis.passwordSecretKey"),
        ("redis.passwordSecretKey=k", "needs redis.passwordSecret"),
        ("terminationGracePeriodSeconds=10", "terminationGracePeriodSeconds"),
        ("metrics.port=50051", "metrics.port"),
        ("redis.tls.existingSecret=tls", "rediss://"),
        ("metrics.enabled=false", "dashboard.enabled needs metrics.enabled"),
    ],
)
def test_a_wrong_value_fails_and_names_it(assignment: str, message: str) -> None:
    result = run_helm(
        "template",
        "q",
        str(CHART),
        "--kube-version",
        KUBERNETES,
        "-f",
        str(CHART / "ci" / "default-values.yaml"),
        "--set",
        assignment,
    )
    assert result.returncode != 0, f"{assignment} was accepted"
    assert message in result.stderr


def test_a_missing_redis_fails_with_what_to_set() -> None:
    result = run_helm("template", "q", str(CHART), "--kube-version", KUBERNETES)
    assert result.returncode != 0
    assert "set redis.url" in result.stderr


def test_the_values_schema_for_the_policy_accepts_what_quotad_accepts() -> None:
    """The schema's policy part must not drift from quotad's own validation (policy.py)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    policy_schema = {**schema["definitions"]["policy"], "definitions": schema["definitions"]}
    example = yaml.safe_load(EXAMPLE_POLICY.read_text())
    jsonschema.validate(example, policy_schema)  # the shipped example passes the chart's schema
    values_policy = yaml.safe_load((CHART / "values.yaml").read_text())["policy"]
    assert values_policy == example  # and the chart's default policy is that example
    broken = json.loads(json.dumps(example))
    broken["tiers"]["free"]["limits"][0]["algorithm"] = "leaky_bucket"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, policy_schema)


# Every feature of the policy file at once: what quotad accepts, the chart's schema must accept too.
FULL_POLICY = """
version: 1
defaults: {tenant: default, tier: free}
leases: {default: 60s, min: 1s, max: 15m}
retention: 24h
admission: {low: 0.6, normal: 0.85, high: 1.0}
waiting: {max_wait: 30s, max_line: 1000, aging: 30s, heartbeat: 1s}
models:
  gpt-4o: {price: {input: 2.50, cached_input: 1.25, output: 10.00}, output_estimate: learned}
  claude-sonnet: {encoding: cl100k_base, calibration: 1.15, price: {input: 3, cached_input: 0.30, output: 15}}
tiers:
  free:
    priority: low
    limits:
      - {name: rpm, metric: requests, limit: 10, period: 1m, algorithm: sliding_window}
      - {name: dollars-per-day, metric: cost_usd, limit: 0.5, period: day}
      - {name: input-tpm, metric: input_tokens, limit: 30000, period: 1m, exclude_cached: true}
      - {name: in-flight, metric: concurrent, limit: 2}
  premium: {priority: high, limits: [{name: tpm, metric: total_tokens, limit: 10000, period: 1m}]}
tenants:
  "*": {limits: [{name: monthly, metric: cost_usd, limit: 500, period: month, admission: {low: 0.5}}]}
global:
  limits:
    - {name: provider-tpm, metric: total_tokens, limit: 800000, period: 1m, model: gpt-4o}
"""


def test_the_values_schema_accepts_every_policy_feature() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    policy_schema = {**schema["definitions"]["policy"], "definitions": schema["definitions"]}
    parse_policy(FULL_POLICY, "full.yaml")  # quotad accepts it...
    jsonschema.validate(yaml.safe_load(FULL_POLICY), policy_schema)  # ...and so does the chart


def test_the_packaged_chart_renders_with_its_dashboard(tmp_path: Path) -> None:
    """`helm package` keeps what the templates read (.helmignore drops only ci/ and editor files)."""
    packaged = run_helm("package", str(CHART), "--destination", str(tmp_path))
    assert packaged.returncode == 0, packaged.stderr
    archive = tmp_path / f"quotad-{yaml.safe_load((CHART / 'Chart.yaml').read_text())['version']}.tgz"
    result = run_helm(
        "template", "q", str(archive), "--kube-version", KUBERNETES, "--set", "redis.url=redis://r:6379/0"
    )
    assert result.returncode == 0, result.stderr
    dashboard = next(
        doc
        for doc in yaml.safe_load_all(result.stdout)
        if doc and doc["metadata"]["name"].endswith("-dashboard")
    )
    assert json.loads(dashboard["data"]["quotad.json"])["uid"] == "quotad-overview"
