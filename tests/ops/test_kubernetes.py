"""The Kubernetes manifests (docker/kubernetes): rendered, validated against the Kubernetes schemas, and checked
against the image, the app's routes, its settings and the metrics it exports.

Rendering uses the small renderer in tests/ops/kustomize.py, compared with `kubectl kustomize` where kubectl is
installed; the PromQL checks use promtool where it is installed. Everything else runs offline in seconds.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from service.app import build_app
from service.metrics import Metrics
from service.settings import Settings
from tests.ops.kustomize import Unsupported, render

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "docker/kubernetes"
DOCKERFILE = (ROOT / "docker/Dockerfile").read_text()
# The oldest Kubernetes the manifests are checked against, and the newest whose schemas the package carries.
KUBERNETES_VERSIONS = ("1.28", kubernetes_validate.latest_version())
OPTIONAL_COMPONENTS = ("ingress", "servicemonitor", "checkpoint-volume")
KUBECTL = shutil.which("kubectl")
PROMTOOL = shutil.which("promtool")
CRD_API_VERSIONS = {"keda.sh/v1alpha1", "monitoring.coreos.com/v1"}


class ManifestSettings(Settings):
    """The app's settings from the values given only: this process's own DDSNET_* variables are not read."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **sources):
        return (init_settings,)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The kustomizations rendered: the two overlays, and the CPU one with every optional component, as an
    operator's own overlay would list them."""
    options = tmp_path_factory.mktemp("options")
    relative = Path(os.path.relpath(KUBERNETES, options))
    (options / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "ddsnet",
        "resources": [str(relative / "overlays/cpu")],
        "components": [str(relative / "components" / name) for name in OPTIONAL_COMPONENTS]}))
    return {"cpu": KUBERNETES / "overlays/cpu", "gpu": KUBERNETES / "overlays/gpu", "cpu+options": options}


@pytest.fixture(scope="module")
def rendered(sources) -> dict[str, list[dict]]:
    return {name: render(path) for name, path in sources.items()}


def one(objects: list[dict], kind: str) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[dict]) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def server(objects: list[dict]) -> dict:
    return next(c for c in pod_spec(objects)["containers"] if c["name"] == "ddsnet")


def environment(container: dict) -> dict[str, str]:
    return {entry["name"]: entry["value"] for entry in container.get("env", [])}


def dockerfile_env() -> dict[str, str]:
    """The image's ENV, from every ENV instruction of the Dockerfile (continuation lines joined)."""
    joined = DOCKERFILE.replace("\\\n", " ")
    found = {}
    for line in joined.splitlines():
        if line.startswith("ENV "):
            found.update(item.split("=", 1) for item in shlex.split(line[4:]))
    return found


def image_port() -> int:
    """The port the image serves on: its CMD's --port, which its EXPOSE must name too."""
    command = json.loads(re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.M).group(1))
    port = int(command[command.index("--port") + 1])
    assert re.search(rf"^EXPOSE {port}$", DOCKERFILE, re.M)
    return port


def effective_settings(container: dict) -> Settings:
    """The settings the app in ``container`` runs with: the image's ENV overridden by the container's."""
    values = {**dockerfile_env(), **environment(container)}
    return ManifestSettings(**{name.removeprefix("DDSNET_").lower(): value for name, value in values.items()
                               if name.startswith("DDSNET_")})


def cpu_count(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_the_renderer_matches_kubectl_kustomize(sources, rendered):
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the renderer is not compared with kustomize here")
    for name, path in sources.items():
        out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60,
                             check=True).stdout
        theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out)}
        ours = {(o["kind"], o["metadata"]["name"]): o for o in rendered[name]}
        assert ours == theirs, name


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\nconfigMapGenerator: [{name: g}]\n")
    with pytest.raises(Unsupported, match="configMapGenerator"):
        render(tmp_path)
    base = os.path.relpath(KUBERNETES / "base", tmp_path)
    patch = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ddsnet"},
             "spec": {"template": {"spec": {"containers": [{"name": "ddsnet", "ports": [{"containerPort": 1}]}]}}}}
    (tmp_path / "patch.yaml").write_text(yaml.safe_dump(patch))
    (tmp_path / "kustomization.yaml").write_text(f"resources: [{base}]\npatches: [{{path: patch.yaml}}]\n")
    with pytest.raises(Unsupported, match="containers.*ports"):
        render(tmp_path)
    patch["spec"]["template"]["spec"] = {"$patch": "replace"}
    (tmp_path / "patch.yaml").write_text(yaml.safe_dump(patch))
    with pytest.raises(Unsupported, match=r"\$patch"):
        render(tmp_path)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_core_object_is_valid(rendered, version):
    checked = set()
    for name, objects in rendered.items():
        for obj in objects:
            if obj["apiVersion"] in CRD_API_VERSIONS:
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name}: {obj['kind']} {obj['metadata']['name']}: {error.message} at "
                            f"{'.'.join(map(str, error.path))}")
            checked.add(obj["kind"])
    assert checked == {"Namespace", "Deployment", "Service", "PodDisruptionBudget", "Ingress"}


# KEDA's and the Prometheus Operator's CRDs are not in the core schemas. These are the parts of their CRDs
# (KEDA 2.x ScaledObject, monitoring.coreos.com/v1 ServiceMonitor) that the manifests use, with the fields
# the CRDs require; any field not listed is refused, so a misspelt one fails.
LABEL_SELECTOR = {"type": "object", "additionalProperties": False, "required": ["matchLabels"],
                  "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}}
METADATA = {"type": "object", "required": ["name", "namespace"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                           "labels": {"type": "object", "additionalProperties": {"type": "string"}}}}
SCALED_OBJECT = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"}, "metadata": METADATA,
        "spec": {"type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
                 "properties": {
                     "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                        "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                       "name": {"type": "string"}}},
                     "minReplicaCount": {"type": "integer", "minimum": 0},
                     "maxReplicaCount": {"type": "integer", "minimum": 1},
                     "pollingInterval": {"type": "integer", "minimum": 1},
                     "cooldownPeriod": {"type": "integer", "minimum": 0},
                     "advanced": {"type": "object", "additionalProperties": False, "properties": {
                         "restoreToOriginalReplicaCount": {"type": "boolean"},
                         "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                           "properties": {"name": {"type": "string"},
                                                                          "behavior": {"type": "object"}}}}},
                     "triggers": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                         "properties": {
                             "type": {"type": "string"}, "name": {"type": "string"},
                             "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                             "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                             "authenticationRef": {"type": "object", "required": ["name"]}}}}}}}}
# KEDA's Prometheus scaler: the metadata it requires and the optional keys it reads.
PROMETHEUS_TRIGGER = {"type": "object", "required": ["serverAddress", "query", "threshold"],
                      "additionalProperties": False,
                      "properties": {key: {"type": "string"} for key in (
                          "serverAddress", "query", "threshold", "activationThreshold", "namespace",
                          "customHeaders", "ignoreNullValues", "queryParameters", "unsafeSsl", "authModes")}}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
SERVICE_MONITOR = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"}, "metadata": METADATA,
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector"], "properties": {
            "selector": LABEL_SELECTOR, "jobLabel": {"type": "string"},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False,
                "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                               "scheme": {"enum": ["http", "https"]}, "interval": DURATION,
                               "scrapeTimeout": DURATION}}}}}}}


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_scaled_object_is_valid(rendered, name):
    scaled = one(rendered[name], "ScaledObject")
    jsonschema.validate(scaled, SCALED_OBJECT)
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    jsonschema.validate(trigger["metadata"], PROMETHEUS_TRIGGER)
    assert re.match(r"^https?://[^/\s]+", trigger["metadata"]["serverAddress"])
    # The behaviour goes into the HPA that KEDA makes: validate it as that HPA.
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": scaled["metadata"]["name"], "namespace": scaled["metadata"]["namespace"]},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                       "name": spec["scaleTargetRef"]["name"]},
                    "minReplicas": spec["minReplicaCount"], "maxReplicas": spec["maxReplicaCount"],
                    "behavior": spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]}}
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(hpa, version, strict=True)


def test_the_service_monitor_is_valid_and_selects_the_service(rendered):
    objects = rendered["cpu+options"]
    monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    jsonschema.validate(monitor, SERVICE_MONITOR)
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The dashboard's process panels select job="ddsnet"; a ServiceMonitor's job is its Service's name.
    dashboard = (ROOT / "docker/grafana/dashboards/ddsnet.json").read_text()
    jobs = set(re.findall(r'job=\\"([^\\"]+)\\"', dashboard))
    assert jobs == {service["metadata"]["name"]} and "jobLabel" not in monitor["spec"]


def exported_metrics() -> dict[str, str]:
    """Each series name the service exports, with its metric type, read from a fresh registry."""
    names = {}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    for family in Metrics().registry.collect():
        for suffix in suffixes.get(family.type, [""]):
            names[family.name + suffix] = family.type
    return names


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_autoscaler_scales_on_the_backlog_gauge_the_service_exports(rendered, name):
    scaled = one(rendered[name], "ScaledObject")
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    named = set(re.findall(r"\bddsnet_[a-z0-9_]+\b", query))
    exported = exported_metrics()
    assert named and named <= exported.keys(), f"{named - exported.keys()} are not exported"
    # A sum of gauges: a counter or a histogram would need rate() to mean a load.
    assert {exported[metric] for metric in named} == {"gauge"} and "ddsnet_backlog_seconds" in named
    namespaces = set(re.findall(r'namespace="([^"]+)"', query))
    assert namespaces == {scaled["metadata"]["namespace"]}, "the query must select the pods it scales"
    assert "by (pod)" in query


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_threshold_is_half_the_latency_target(rendered, name):
    scaled = one(rendered[name], "ScaledObject")
    trigger = scaled["spec"]["triggers"][0]
    target_seconds = effective_settings(server(rendered[name])).latency_target_ms / 1000
    assert target_seconds > 0, "the controller must be on for the backlog to mean waiting"
    # metricType AverageValue: replicas = ceil(sum of the backlog / threshold).
    assert trigger["metricType"] == "AverageValue"
    assert float(trigger["metadata"]["threshold"]) == pytest.approx(target_seconds / 2)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_the_query_sums_one_series_per_pod_of_its_namespace(rendered, tmp_path):
    query = one(rendered["cpu"], "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    # Pod a is scraped twice (pod annotations and a ServiceMonitor), pod c is another namespace's.
    series = [('{job="ddsnet",namespace="ddsnet",pod="a"}', "0.5"), ('{job="pods",namespace="ddsnet",pod="a"}', "0.5"),
              ('{job="ddsnet",namespace="ddsnet",pod="b"}', "2"), ('{job="ddsnet",namespace="other",pod="c"}', "9")]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": []}))
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yaml"], "evaluation_interval": "15s",
        "tests": [{"interval": "15s",
                   "input_series": [{"series": f"ddsnet_backlog_seconds{labels}", "values": f"{value}x4"}
                                    for labels, value in series],
                   "promql_expr_test": [{"expr": query, "eval_time": "30s",
                                         "exp_samples": [{"labels": "{}", "value": 2.5}]}]}]}))
    result = subprocess.run([PROMTOOL, "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@functools.cache
def answers(path: str) -> int:
    """The status the app answers ``GET path`` with before its model is loaded (no lifespan runs), as a probe
    would see it during start-up if the port were open."""
    return TestClient(build_app(ManifestSettings())).get(path).status_code


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_probes_hit_the_apps_routes_on_its_port(rendered, name):
    container = server(rendered[name])
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/readyz"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in probes.values():
        assert ports[probe["port"]] == image_port()
    # Alive at once, ready only once the model is loaded and warmed up.
    assert answers(probes["livenessProbe"]["path"]) == 200
    assert answers(probes["readinessProbe"]["path"]) == answers(probes["startupProbe"]["path"]) == 503
    assert answers("/no-such-route") == 404


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_container_the_service_and_the_scrape_use_the_images_port(rendered, name):
    objects = rendered[name]
    container = server(objects)
    assert [port["containerPort"] for port in container["ports"]] == [image_port()]
    assert "command" not in container and "args" not in container, "the image's CMD sets the port"
    named = {port["name"]: port["containerPort"] for port in container["ports"]}
    for port in one(objects, "Service")["spec"]["ports"]:
        target = port["targetPort"]
        assert named.get(target, target) == image_port()
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == image_port()
    assert answers(annotations["prometheus.io/path"]) == 200


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_startup_allows_a_cold_engine_build(rendered, name):
    startup = server(rendered[name])["startupProbe"]
    cold = json.loads((ROOT / "benchmarks/results/speed_cold.json").read_text())["serve_ready_seconds"]["cold"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 2 * cold
    assert "initialDelaySeconds" not in startup


@pytest.mark.parametrize("name", ["cpu", "gpu", "cpu+options"])
def test_every_container_is_locked_down(rendered, name):
    pod = pod_spec(rendered[name])
    uid = int(re.search(r"useradd .*--uid (\d+)", DOCKERFILE).group(1))
    assert re.search(r"^USER ddsnet$", DOCKERFILE, re.M)
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": uid,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    containers = pod["containers"] + pod["initContainers"]
    assert len(containers) == 2
    for container in containers:
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                "capabilities": {"drop": ["ALL"]}}, container["name"]
        assert {"requests", "limits"} <= container["resources"].keys()
    namespace = one(rendered[name], "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("name", ["cpu", "gpu", "cpu+options"])
def test_what_the_app_writes_is_a_volume_and_the_cache_starts_from_the_images(rendered, name):
    pod = pod_spec(rendered[name])
    container = server(rendered[name])
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    for mount in mounts.values():
        if not mount.get("readOnly"):
            assert "emptyDir" in volumes[mount["name"]], f"{mount['mountPath']} must be a scratch volume"
    assert "/tmp" in mounts
    image_cache = dockerfile_env()["DDSNET_CACHE_DIR"]
    settings = effective_settings(container)
    assert settings.cache and str(settings.engine_cache_dir()) == image_cache
    cache_volume = mounts[image_cache]["name"]
    (init,) = pod["initContainers"]
    assert init["image"] == container["image"]
    (init_mount,) = init["volumeMounts"]
    assert init_mount["name"] == cache_volume
    assert init["command"] == ["cp", "-R", f"{image_cache}/.", f"{init_mount['mountPath']}/"]


@pytest.mark.parametrize("name", ["cpu", "gpu", "cpu+options"])
def test_the_checkpoint_is_the_images_or_on_a_mounted_volume(rendered, name):
    container = server(rendered[name])
    checkpoint = effective_settings(container).checkpoint
    baked = dockerfile_env()["DDSNET_CHECKPOINT"]
    copied = dict((destination, source) for source, destination in re.findall(r"^COPY (\S+) (\S+)$", DOCKERFILE, re.M))
    assert (ROOT / copied[baked]).is_file(), "the image's DDSNET_CHECKPOINT is a file it copies in"
    if checkpoint == baked:
        assert name != "cpu+options"
        return
    mount = next(m for m in container["volumeMounts"] if checkpoint.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod_spec(rendered[name])["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    assert name == "cpu+options"


@pytest.mark.parametrize("name", ["cpu", "gpu", "cpu+options"])
def test_every_setting_is_one_the_app_reads_and_fits_the_pod(rendered, name):
    container = server(rendered[name])
    fields = Settings.model_fields
    for variable in environment(container):
        assert variable.startswith("DDSNET_") and variable.removeprefix("DDSNET_").lower() in fields, variable
    settings = effective_settings(container)  # raises on a value the app would refuse
    limits = container["resources"]["limits"]
    assert settings.torch_threads == cpu_count(limits["cpu"]) == cpu_count(container["resources"]["requests"]["cpu"])
    pod = pod_spec(rendered[name])
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= pause + settings.request_timeout_s
    if name == "cpu":
        assert f"--build-arg TORCH_THREADS={settings.torch_threads}" in (KUBERNETES / "overlays/cpu/kustomization.yaml"
                                                                         ).read_text()


def test_the_gpu_overlay_asks_for_one_nvidia_gpu_and_runs_on_it(rendered):
    gpu, cpu = server(rendered["gpu"]), server(rendered["cpu"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in gpu["resources"]["requests"], "an extended resource's request is its limit"
    assert effective_settings(gpu).device == "cuda" and effective_settings(cpu).device == "cpu"
    assert effective_settings(gpu).max_batch_tiles > effective_settings(cpu).max_batch_tiles
    pod = pod_spec(rendered["gpu"])
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert not any("nvidia.com/gpu" in str(c.get("resources")) for c in pod_spec(rendered["cpu"])["containers"])
    assert "nodeSelector" not in pod_spec(rendered["cpu"])
    assert gpu["image"] != cpu["image"] and gpu["image"].endswith("-cuda")


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_rollouts_and_disruptions_keep_capacity(rendered, name):
    objects = rendered[name]
    deployment, budget, scaled = one(objects, "Deployment"), one(objects, "PodDisruptionBudget"), one(
        objects, "ScaledObject")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert scaled["spec"]["minReplicaCount"] > budget["spec"]["maxUnavailable"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], budget["spec"]["selector"]["matchLabels"],
                     one(objects, "Service")["spec"]["selector"]):
        assert selector.items() <= labels.items()
    namespaces = {obj["metadata"].get("namespace") for obj in objects if obj["kind"] != "Namespace"}
    assert namespaces == {one(objects, "Namespace")["metadata"]["name"]}


def test_the_ingress_reaches_the_service_within_the_apps_limits(rendered):
    objects = rendered["cpu+options"]
    ingress, service = one(objects, "Ingress"), one(objects, "Service")
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}
    settings = effective_settings(server(objects))
    annotations = ingress["metadata"]["annotations"]
    body = re.fullmatch(r"(\d+)m", annotations["nginx.ingress.kubernetes.io/proxy-body-size"])
    assert int(body.group(1)) * 1024 * 1024 > settings.max_upload_bytes
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > settings.request_timeout_s
    proxies = settings.trusted_proxies.split(",")
    assert proxies and all(ipaddress.ip_network(proxy) for proxy in proxies)
    assert effective_settings(server(rendered["cpu"])).trusted_proxies == ""


def test_the_docs_name_every_overlay_and_component():
    operations = (ROOT / "docs/OPERATIONS.md").read_text()
    for folder in sorted((KUBERNETES / "overlays").iterdir()) + sorted((KUBERNETES / "components").iterdir()):
        assert f"{folder.parent.name}/{folder.name}" in operations, folder
