"""The Helm chart, rendered by the real helm binary: lint, Kubernetes schemas, and what matters in it."""

from __future__ import annotations

import base64
import functools
import json
import re
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from quotad_server import __version__
from quotad_server.policy import parse_policy
from quotad_server.server import LIVENESS_SERVICE
from quotad_server.settings import Settings

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


def volumes(manifests: list[Manifest]) -> dict[str, Manifest]:
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    return {volume["name"]: volume for volume in pod["volumes"]}


def mounts(manifests: list[Manifest]) -> dict[str, Manifest]:
    return {mount["name"]: mount for mount in container(manifests)["volumeMounts"]}


def service_names(service: str = "q-quotad", namespace: str = "llm") -> list[str]:
    """Every name a client in the cluster may use for the Service."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def tls_handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> dict[str, Any]:
    """A whole TLS handshake in memory (no socket, no timing): the server certificate the client
    verified for `hostname`, decoded. Raises ssl.SSLCertVerificationError when it does not verify."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client_end = client.wrap_bio(client_in, client_out, server_hostname=hostname)
    server_end = server.wrap_bio(server_in, server_out, server_side=True)
    pending = [client_end, server_end]
    for _ in range(10):
        for end in list(pending):
            try:
                end.do_handshake()
                pending.remove(end)
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if not pending:
            break
    assert not pending, "the handshake did not finish"
    peer = client_end.getpeercert()
    assert isinstance(peer, dict)
    return dict(peer)


# -- every scenario: lint, render, schemas ---------------------------------------------------------


def test_every_scenario_is_tested() -> None:
    assert set(SCENARIOS) >= {
        "default-values.yaml",
        "external-redis-tls-values.yaml",
        "autoscaling-values.yaml",
        "metrics-off-values.yaml",
        "cert-manager-values.yaml",
        "existing-tls-mtls-tokens-values.yaml",
        "tls-off-values.yaml",
        "redis-cluster-values.yaml",
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
        if manifest["apiVersion"].startswith("cert-manager.io/"):
            validate_certificate(manifest)  # a CRD too: checked against cert-manager's v1 fields
            continue
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)  # raises on any bad field
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds
    # Values never hold a secret: the only Secret the chart renders is the certificate it generates.
    for secret in (m for m in manifests if m["kind"] == "Secret"):
        assert secret["metadata"]["name"] == "q-quotad-generated-tls"
        assert secret["type"] == "kubernetes.io/tls"
        assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}


# -- the things that matter ------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["default-values.yaml", "tls-off-values.yaml"])
def test_probes_run_quotad_health_over_the_local_socket_tls_or_not(scenario: str) -> None:
    """The kubelet's gRPC probes cannot speak TLS: `quotad health` asks over a Unix socket."""
    manifests = render(scenario)
    spec = container(manifests)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert set(spec[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"exec"}, probe
        assert spec[probe]["exec"]["command"][:2] == ["quotad", "health"]
    # Liveness must not follow Redis (or a Redis outage restarts every pod); readiness must
    # (no --service: the whole server, SERVING only while Redis answers).
    assert spec["livenessProbe"]["exec"]["command"] == ["quotad", "health", "--service", LIVENESS_SERVICE]
    assert spec["startupProbe"]["exec"]["command"] == ["quotad", "health", "--service", LIVENESS_SERVICE]
    assert spec["readinessProbe"]["exec"]["command"] == ["quotad", "health"]
    # The timings are the values'.
    probes = yaml.safe_load((CHART / "values.yaml").read_text())["probes"]
    for name, values in probes.items():
        assert {key: spec[f"{name}Probe"][key] for key in values} == values
    # The socket is on a writable emptyDir: the root filesystem is read-only.
    socket = Path(env(manifests)["QUOTAD_LOCAL_SOCKET"]["value"])
    assert socket.is_absolute()
    assert mounts(manifests)["run"]["mountPath"] == str(socket.parent)
    assert "emptyDir" in volumes(manifests)["run"]
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_default_install_serves_tls_with_a_certificate_for_the_service_names(tmp_path: Path) -> None:
    manifests = render()
    variables = env(manifests)
    assert variables["QUOTAD_TLS_CERT"]["value"] == "/etc/quotad/tls/tls.crt"
    assert variables["QUOTAD_TLS_KEY"]["value"] == "/etc/quotad/tls/tls.key"
    assert "QUOTAD_TLS_CLIENT_CA" not in variables
    assert "QUOTAD_TOKENS_FILE" not in variables
    # The Secret is mounted as a directory: a subPath mount never sees the Secret change.
    assert mounts(manifests)["tls"] == {"name": "tls", "mountPath": "/etc/quotad/tls", "readOnly": True}
    secret = one(manifests, "Secret")
    assert volumes(manifests)["tls"]["secret"] == {
        "secretName": secret["metadata"]["name"],
        "defaultMode": 0o440,
    }
    assert secret["metadata"]["annotations"]["quotad/dns-names"] == ",".join(service_names())
    files = {key: base64.b64decode(value) for key, value in secret["data"].items()}
    assert b"PRIVATE KEY" not in files["ca.crt"]  # the CA's key is not kept anywhere
    (tmp_path / "tls.crt").write_bytes(files["tls.crt"])
    (tmp_path / "tls.key").write_bytes(files["tls.key"])
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    client = ssl.create_default_context(cadata=files["ca.crt"].decode())
    # A client that trusts the CA accepts the certificate under every name of the Service...
    for name in service_names():
        peer = tls_handshake(server, client, name)
        assert sorted(value for _, value in peer["subjectAltName"]) == sorted(service_names())
        assert ssl.cert_time_to_seconds(peer["notAfter"]) > time.time() + 3600 * 24 * 3000
    # ...and under no other name.
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(server, client, "quotad.example.com")
    # A mesh must not read the port as cleartext HTTP/2.
    grpc_port = one(manifests, "Service")["spec"]["ports"][0]
    assert (grpc_port["name"], grpc_port["appProtocol"]) == ("grpc", "https")


def test_extra_dns_names_and_the_cluster_domain_reach_the_generated_certificate() -> None:
    manifests = render(sets=("tls.dnsNames={quotad.example.com}", "clusterDomain=corp.internal"))
    annotation = one(manifests, "Secret")["metadata"]["annotations"]["quotad/dns-names"]
    names = [*service_names()[:3], "q-quotad.llm.svc.corp.internal", "quotad.example.com"]
    assert annotation.split(",") == names


LOOKUP = 'lookup "v1" "Secret" .Release.Namespace $name'


def copy_chart(tmp_path: Path) -> Path:
    """A copy of the chart that a test may change, to render what `helm template` cannot."""
    chart = tmp_path / "quotad"
    shutil.copytree(CHART, chart)
    return chart


def render_upgrade(
    tmp_path: Path, annotations: dict[str, str], *sets: str
) -> subprocess.CompletedProcess[str]:
    """The chart as `helm upgrade` renders it when the generated Secret exists: `helm template`
    cannot reach a cluster, so a copy of the chart answers the lookup with such a Secret."""
    chart = copy_chart(tmp_path)
    template = chart / "templates" / "tls-secret.yaml"
    existing = (
        'dict "data" (dict "ca.crt" "b2xkIGNh" "tls.crt" "b2xkIGNlcnQ=" "tls.key" "b2xkIGtleQ==")'
        f' "metadata" (dict "annotations" ({json.dumps(json.dumps(annotations))} | fromJson))'
    )
    assert template.read_text().count(LOOKUP) == 1
    template.write_text(template.read_text().replace(LOOKUP, f"({existing})"))
    args = ["template", "q", str(chart), "--namespace", "llm", "--kube-version", KUBERNETES]
    args += ["-f", str(CHART / "ci" / "default-values.yaml"), "--show-only", "templates/tls-secret.yaml"]
    for assignment in sets:
        args += ["--set", assignment]
    return run_helm(*args)


def test_an_upgrade_keeps_the_generated_certificate(tmp_path: Path) -> None:
    made_for = {"quotad/dns-names": ",".join(service_names())}
    for had in (made_for, {}):  # {}: a Secret without the annotation is kept as it is
        result = render_upgrade(tmp_path / str(len(had)), had)
        assert result.returncode == 0, result.stderr
        secret = yaml.safe_load(result.stdout)
        assert secret["data"] == {"ca.crt": "b2xkIGNh", "tls.crt": "b2xkIGNlcnQ=", "tls.key": "b2xkIGtleQ=="}
        assert secret["metadata"]["annotations"] == made_for


def test_an_upgrade_that_changes_the_names_of_a_generated_certificate_fails_and_says_what_to_do(
    tmp_path: Path,
) -> None:
    made_for = {"quotad/dns-names": ",".join(service_names())}
    result = render_upgrade(tmp_path, made_for, "tls.dnsNames={quotad.example.com}")
    assert result.returncode != 0
    assert "kubectl -n llm delete secret q-quotad-generated-tls" in result.stderr
    assert "quotad.example.com" in result.stderr


# cert-manager's Certificate (cert-manager.io/v1): the spec fields and usages its CRD accepts.
CERTIFICATE_SPEC_FIELDS = {
    "additionalOutputFormats", "commonName", "dnsNames", "duration", "emailAddresses",
    "encodeUsagesInRequest", "ipAddresses", "isCA", "issuerRef", "keystores", "literalSubject",
    "nameConstraints", "otherNames", "privateKey", "renewBefore", "renewBeforePercentage",
    "revisionHistoryLimit", "secretName", "secretTemplate", "signatureAlgorithm", "subject", "uris",
    "usages",
}  # fmt: skip
CERTIFICATE_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
}  # fmt: skip


def go_duration_s(text: str) -> float:
    parts = re.findall(r"([0-9.]+)(h|m|s)", text)
    assert "".join(number + unit for number, unit in parts) == text, f"not a Go duration: {text}"
    return sum(float(number) * {"h": 3600, "m": 60, "s": 1}[unit] for number, unit in parts)


def validate_certificate(manifest: Manifest) -> None:
    assert (manifest["apiVersion"], manifest["kind"]) == ("cert-manager.io/v1", "Certificate")
    assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}
    spec = manifest["spec"]
    assert set(spec) <= CERTIFICATE_SPEC_FIELDS
    assert spec["secretName"]
    assert spec["issuerRef"]["name"]
    assert set(spec["issuerRef"]) <= {"name", "kind", "group"}
    assert set(spec["usages"]) <= CERTIFICATE_USAGES
    assert all(isinstance(name, str) and name for name in spec["dnsNames"])
    duration, renew_before = go_duration_s(spec["duration"]), go_duration_s(spec["renewBefore"])
    assert duration >= 3600  # cert-manager's minimum
    assert 300 <= renew_before < duration
    assert spec["privateKey"]["algorithm"] in {"RSA", "ECDSA", "Ed25519"}
    assert spec["privateKey"]["rotationPolicy"] in {"Always", "Never"}


def test_cert_manager_renders_a_certificate_for_the_service_names_into_the_mounted_secret() -> None:
    manifests = render("cert-manager-values.yaml")
    certificate = one(manifests, "Certificate")
    validate_certificate(certificate)
    spec = certificate["spec"]
    assert spec["dnsNames"] == [*service_names(), "quotad.llm.example.com"]
    assert {"server auth", "client auth"} <= set(spec["usages"])
    assert spec["issuerRef"] == {"name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert (spec["duration"], spec["renewBefore"]) == ("720h", "240h")
    assert volumes(manifests)["tls"]["secret"]["secretName"] == spec["secretName"] == "q-quotad-tls"
    assert env(manifests)["QUOTAD_TLS_CERT"]["value"] == "/etc/quotad/tls/tls.crt"
    assert not [m for m in manifests if m["kind"] == "Secret"]  # cert-manager writes it, not the chart
    # RSA keys also get key encipherment (TLS 1.2 RSA key exchange); ECDSA keys do not.
    assert "key encipherment" not in spec["usages"]
    rsa = render("cert-manager-values.yaml", sets=("tls.certManager.privateKey.algorithm=RSA",))
    assert "key encipherment" in one(rsa, "Certificate")["spec"]["usages"]


def test_an_existing_secret_with_mutual_tls_and_tokens() -> None:
    manifests = render("existing-tls-mtls-tokens-values.yaml")
    variables = env(manifests)
    assert variables["QUOTAD_TLS_CERT"]["value"] == "/etc/quotad/tls/tls.crt"
    assert variables["QUOTAD_TLS_CLIENT_CA"]["value"] == "/etc/quotad/tls/ca.crt"  # the Secret's ca.crt
    assert variables["QUOTAD_TOKENS_FILE"]["value"] == "/etc/quotad/tokens/tokens"
    assert volumes(manifests)["tls"]["secret"]["secretName"] == "quotad-server-tls"
    assert volumes(manifests)["tokens"]["secret"] == {"secretName": "quotad-tokens", "defaultMode": 0o440}
    for name, path in (("tls", "/etc/quotad/tls"), ("tokens", "/etc/quotad/tokens")):
        assert mounts(manifests)[name] == {"name": name, "mountPath": path, "readOnly": True}
    assert "client-ca" not in volumes(manifests)
    assert not [m for m in manifests if m["kind"] in ("Secret", "Certificate")]
    # The policy's callers section reaches quotad, which accepts it.
    text = one(manifests, "ConfigMap", "-policy")["data"]["policy.yaml"]
    assert {rule.pattern for rule in parse_policy(text, "configmap").callers} == {
        "spiffe://cluster.local/ns/llm-gateway/sa/gateway",
        "batch-jobs",
    }


@pytest.mark.parametrize(
    ("assignment", "volume"),
    [
        (
            "tls.clientAuth.caSecret=clients-ca",
            {"secret": {"secretName": "clients-ca", "defaultMode": 0o440}},
        ),
        ("tls.clientAuth.caConfigMap=clients-ca", {"configMap": {"name": "clients-ca"}}),
    ],
)
def test_the_client_ca_may_come_from_its_own_secret_or_configmap(assignment: str, volume: Manifest) -> None:
    manifests = render(
        "existing-tls-mtls-tokens-values.yaml", sets=(assignment, "tls.clientAuth.caKey=bundle.pem")
    )
    assert env(manifests)["QUOTAD_TLS_CLIENT_CA"]["value"] == "/etc/quotad/client-ca/bundle.pem"
    assert volumes(manifests)["client-ca"] == {"name": "client-ca", **volume}
    assert mounts(manifests)["client-ca"]["mountPath"] == "/etc/quotad/client-ca"
    # The same works with the chart-generated server certificate.
    generated = render(sets=("tls.clientAuth.enabled=true", assignment))
    assert env(generated)["QUOTAD_TLS_CLIENT_CA"]["value"] == "/etc/quotad/client-ca/ca.crt"


def test_tls_off_serves_plaintext_with_no_certificate_anywhere() -> None:
    manifests = render("tls-off-values.yaml")
    assert not [name for name in env(manifests) if name.startswith("QUOTAD_TLS")]
    assert "tls" not in volumes(manifests)
    assert "tls" not in mounts(manifests)
    assert not [m for m in manifests if m["kind"] in ("Secret", "Certificate")]
    assert one(manifests, "Service")["spec"]["ports"][0]["appProtocol"] == "grpc"
    assert env(manifests)["QUOTAD_LOCAL_SOCKET"]["value"] == "/run/quotad/quotad.sock"


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


def test_a_redis_cluster_by_its_seed_nodes_uses_the_cluster_client() -> None:
    variables = env(render("redis-cluster-values.yaml"))
    seeds = [f"redis-cluster-{i}.redis-cluster-headless.redis.svc.cluster.local:6379" for i in range(3)]
    assert variables["QUOTAD_REDIS_URL"]["value"] == "rediss://" + ",".join(seeds)
    assert variables["QUOTAD_REDIS_CLUSTER"]["value"] == "true"
    assert variables["QUOTAD_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "quotad-redis",
        "key": "redis-password",
    }
    assert variables["QUOTAD_REDIS_TLS_CA_FILE"]["value"] == "/etc/quotad/redis-tls/ca.crt"
    # quotad accepts what the chart renders.
    settings = Settings.from_env(
        {
            "QUOTAD_POLICY": "p.yaml",
            **{k: v.get("value", "x") for k, v in variables.items() if k.startswith("QUOTAD_REDIS")},
        }
    )
    assert settings.redis_cluster == "true"


def test_by_default_quotad_finds_a_cluster_itself() -> None:
    assert env(render())["QUOTAD_REDIS_CLUSTER"]["value"] == "auto"


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
    assert {"name": "run", "mountPath": "/run/quotad"} in container(manifests)["volumeMounts"]


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


def render_notes(tmp_path: Path, scenario: str) -> str:
    """NOTES.txt as `helm install` prints it: `helm template` does not render it, so a copy of the
    chart renders it into a ConfigMap."""
    chart = copy_chart(tmp_path)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "test.notes" -}}\n' + notes + "{{- end }}")
    (chart / "templates" / "notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata: {notes: {{ include "test.notes" . | quote }}}\n'
    )
    result = run_helm(
        "template", "q", str(chart), "--namespace", "llm", "--kube-version", KUBERNETES,
        "-f", str(CHART / "ci" / scenario), "--show-only", "templates/notes.yaml",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text: str = yaml.safe_load(result.stdout)["data"]["notes"]
    return text


def test_notes_say_how_to_fetch_the_ca_and_check_health(tmp_path: Path) -> None:
    notes = render_notes(tmp_path, "default-values.yaml")
    fetch = "kubectl -n llm get secret q-quotad-generated-tls -o jsonpath='{.data.ca\\.crt}' | base64 -d > quotad-ca.crt"
    assert fetch in notes
    assert "kubectl -n llm port-forward svc/q-quotad 50051:50051 &" in notes
    check = "grpcurl -cacert quotad-ca.crt -authority q-quotad.llm.svc localhost:50051 grpc.health.v1.Health/Check"
    assert check in notes
    assert "-plaintext" not in notes
    assert "kubectl -n llm exec deploy/q-quotad -- quotad health" in notes
    mtls = render_notes(tmp_path / "mtls", "existing-tls-mtls-tokens-values.yaml")
    assert "-cert client.crt -key client.key localhost:50051 grpc.health.v1.Health/Check" in mtls
    assert "authorization: Bearer $QUOTAD_TOKEN" in mtls
    plaintext = render_notes(tmp_path / "off", "tls-off-values.yaml")
    assert "grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check" in plaintext
    assert "-cacert" not in plaintext


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
        ("redis.seeds[0]=redis-0.redis:6379", "not both"),  # default-values.yaml sets redis.url
        (
            "redis.url=,redis.seeds[0]=redis-0.redis:6379,redis.cluster=false",
            "redis.cluster must be auto or true",
        ),
        ("redis.url=,redis.seeds[0]=redis://redis-0.redis:6379", "/redis/seeds/0"),
        ("redis.url=,redis.seeds[0]=redis-0.redis:6379,redis.tls.existingSecret=t", "set redis.seedsTls"),
        ("redis.cluster=sometimes", "/redis/cluster"),
        ("redis.passwordSecret=s", "needs redis.passwordSecretKey"),
        ("redis.passwordSecretKey=k", "needs redis.passwordSecret"),
        ("terminationGracePeriodSeconds=10", "terminationGracePeriodSeconds"),
        ("metrics.port=50051", "metrics.port"),
        ("redis.tls.existingSecret=tls", "rediss://"),
        ("metrics.enabled=false", "dashboard.enabled needs metrics.enabled"),
        ("tls.enabled=yes", "/tls/enabled"),
        ("tls.certManager.enabled=true", "needs tls.certManager.issuerRef.name"),
        ("tls.existingSecret=s,tls.certManager.enabled=true,tls.certManager.issuerRef.name=i", "not both"),
        ("tls.certManager.duration=90 days", "/tls/certManager/duration"),
        ("tls.certManager.privateKey.size=1024", "/tls/certManager/privateKey/size"),
        ("tls.dnsNames[0]=not a name", "/tls/dnsNames/0"),
        ("tls.clientAuth.enabled=true", "needs tls.clientAuth.caSecret or caConfigMap"),
        ("tls.enabled=false,tls.clientAuth.enabled=true", "needs tls.enabled"),
        ("tls.clientAuth.caSecret=a,tls.clientAuth.caConfigMap=b", "not both"),
        ("auth.tokens.key=", "/auth/tokens/key"),
        ("auth.token.existingSecret=t", "token"),  # a misspelt key is refused, not ignored
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
      - {name: rpm-new, metric: requests, limit: 5, period: 10s, algorithm: sliding_window, shadow: true}
  premium: {priority: high, limits: [{name: tpm, metric: total_tokens, limit: 10000, period: 1m}]}
tenants:
  "*": {limits: [{name: monthly, metric: cost_usd, limit: 500, period: month, admission: {low: 0.5}}]}
global:
  limits:
    - {name: provider-tpm, metric: total_tokens, limit: 800000, period: 1m, model: gpt-4o}
unknown_tenants: shared
callers:
  "spiffe://cluster.local/ns/gateway/sa/*": {tenants: {"*": {tiers: [free, premium]}}}
  batch-jobs: {tenants: {research: {tier: free}}, methods: [reserve, settle, read, accuracy]}
envoy:
  domains:
    gw: {tenant: x-tenant, subject: user_id, tier: tier, model: model, priority: priority, default_tier: free}
    gw-tokens: {tenant: x-tenant, default_subject: "-", hits: tokens}
  store_unavailable: over_limit
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
