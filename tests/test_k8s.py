"""docker/k8s: the kustomization renders, its core resources are valid Kubernetes objects, its
KEDA ScaledObjects hold to KEDA's documented schema, and the manifests agree with the code they run
(settings names, ports, probe paths, the worker's stop bound, the exporter's metric).

Offline: the core resources are validated with ``kubernetes-validate`` (the API's published
OpenAPI schemas, strict: an unknown field fails), for the oldest and the newest Kubernetes minor it
ships. KEDA's CRD is not in those schemas; the ScaledObjects are checked against a JSON Schema
written here from KEDA's own definition of them (cited at ``SCALED_OBJECT_SCHEMA``). Nothing here
talks to a cluster: see docker/k8s/README.md for what was and was not run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer.catalog import parse_model_map
from queuebert.settings import ExporterSettings, GatewaySettings, WorkerSettings, env_name
from worker.probes import LIVE_PATH, READY_PATH

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

K8S = Path(__file__).resolve().parent.parent / "docker" / "k8s"
NAMESPACE = "queuebert"


def render() -> list[dict[str, Any]]:
    """``kubectl kustomize docker/k8s`` (kustomize built into kubectl); without kubectl, the
    listed resources as they are (this kustomization only adds a namespace, labels and image tags)."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(K8S)], check=True, capture_output=True, text=True,
                             timeout=60).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def resources() -> list[dict[str, Any]]:
    return render()


def of_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_every_manifest_is_in_the_kustomization() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_kustomize_renders_every_resource_into_the_namespace(resources: list[dict[str, Any]]) -> None:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl (kustomize) not installed: the namespace is kustomize's to set")
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == sorted(["Namespace", "Service", "Service", "Service", "StatefulSet", "Deployment", "Deployment",
                            "Deployment", "Deployment", "PodDisruptionBudget", "PodDisruptionBudget",
                            "PodDisruptionBudget", "ScaledObject", "ScaledObject"])
    for r in resources:
        if r["kind"] != "Namespace":
            assert r["metadata"]["namespace"] == NAMESPACE, r["metadata"]
        assert r["metadata"]["labels"]["app.kubernetes.io/part-of"] == "queuebert"


@pytest.mark.parametrize("version", ["1.25.0", "1.37.0"])
def test_core_resources_are_valid_kubernetes_objects(resources: list[dict[str, Any]], version: str) -> None:
    from kubernetes_validate.utils import all_versions

    assert version in all_versions(), f"kubernetes-validate {kubernetes_validate.version.__version__} lacks {version}"
    core = [r for r in resources if not r["apiVersion"].startswith("keda.sh/")]
    assert len(core) == 12
    for r in core:
        kubernetes_validate.validate(r, version, strict=True)  # raises ValidationError naming the field
    # The validator does fail on a wrong object (so a pass above means something).
    broken = {**core[0], "spec": {"notAField": 1}} if core[0]["kind"] != "Namespace" else {
        **core[1], "spec": {"notAField": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def _selects(selector: dict[str, str], pod_labels: dict[str, str]) -> bool:
    return all(pod_labels.get(k) == v for k, v in selector.items())


def test_services_and_budgets_select_pods_and_name_real_ports(resources: list[dict[str, Any]]) -> None:
    workloads = {**of_kind(resources, "Deployment"), **of_kind(resources, "StatefulSet")}
    pods = {name: w["spec"]["template"] for name, w in workloads.items()}
    for name, svc in of_kind(resources, "Service").items():
        [pod] = [p for p in pods.values() if _selects(svc["spec"]["selector"], p["metadata"]["labels"])]
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports, name
    for name, pdb in of_kind(resources, "PodDisruptionBudget").items():
        selector = pdb["spec"]["selector"]["matchLabels"]
        matched = [n for n, p in pods.items() if _selects(selector, p["metadata"]["labels"])]
        assert matched == [name], (name, matched)
    for w in workloads.values():  # a Deployment's selector matches its own pods (the API checks it too)
        assert _selects(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])


def _settings_env_names(cls: type) -> set[str]:
    return {env_name(f) for f in cls.__dataclass_fields__}


def workers(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: d for n, d in of_kind(resources, "Deployment").items() if n.startswith("worker-")}


def test_worker_deployments_match_the_worker(resources: list[dict[str, Any]]) -> None:
    budgets = of_kind(resources, "PodDisruptionBudget")
    assert len(workers(resources)) == 2  # one Deployment per model
    for name, dep in workers(resources).items():
        pod = dep["spec"]["template"]["spec"]
        [c] = pod["containers"]
        values = env(c)
        assert set(values) <= _settings_env_names(WorkerSettings), set(values) - _settings_env_names(WorkerSettings)
        settings = WorkerSettings.from_env(values)
        assert len(settings.queues) == 1 and settings.model and settings.device == "cuda"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "replicas" not in dep["spec"]  # KEDA owns it; `kubectl apply` must not reset it
        # The grace period covers the worker's own stop bound, with a margin, and is not absurd.
        grace = pod["terminationGracePeriodSeconds"]
        assert settings.stop_grace + 5 <= grace <= settings.stop_grace + 30, (grace, settings.stop_grace)
        # Probes: the worker's paths, on the port it serves them (its metrics port).
        [port] = [p for p in c["ports"] if p["name"] == c["readinessProbe"]["httpGet"]["port"]]
        assert port["containerPort"] == settings.metrics_port
        assert c["readinessProbe"]["httpGet"]["path"] == READY_PATH
        assert c["livenessProbe"]["httpGet"]["path"] == LIVE_PATH
        assert c["startupProbe"]["httpGet"]["path"] == LIVE_PATH
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= settings.heartbeat_interval * 3
        assert budgets[name]["spec"]["maxUnavailable"] == 1  # minAvailable would block drains at one replica


def test_gateway_and_exporter_use_real_settings(resources: list[dict[str, Any]]) -> None:
    deployments = of_kind(resources, "Deployment")
    [gw] = deployments["gateway"]["spec"]["template"]["spec"]["containers"]
    assert set(env(gw)) <= _settings_env_names(GatewaySettings)
    g = GatewaySettings.from_env(env(gw))
    assert deployments["gateway"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > g.stop_timeout
    for probe in ("readinessProbe", "livenessProbe"):
        # Not /health: 503 while Redis does not answer (a blip would restart every gateway).
        assert gw[probe]["httpGet"]["path"] == "/metrics"
    assert {p["containerPort"] for p in gw["ports"]} == {g.port}

    [ex] = deployments["queue-exporter"]["spec"]["template"]["spec"]["containers"]
    assert ex["command"] == ["queuebert", "exporter"]
    assert set(env(ex)) <= _settings_env_names(ExporterSettings)
    e = ExporterSettings.from_env(env(ex))
    assert {p["containerPort"] for p in ex["ports"]} == {e.port}
    svc = of_kind(resources, "Service")["queue-exporter"]
    assert svc["metadata"]["annotations"]["prometheus.io/port"] == str(e.port)
    # Every worker's queue is exported even while empty, so each scaler's query has a value.
    worker_queues = {WorkerSettings.from_env(env(d["spec"]["template"]["spec"]["containers"][0])).queues[0]
                     for d in workers(resources).values()}
    assert worker_queues <= set(e.queues)
    # ... and named in the gateway's model map, so its requests are accepted (and queue, which is
    # what wakes KEDA) while its workers are at zero, and /health stays 200 meanwhile.
    assert worker_queues <= set(parse_model_map(g.models).values())
    assert g.queue in parse_model_map(g.models).values()


def test_redis_keeps_its_data_on_a_persistent_volume(resources: list[dict[str, Any]]) -> None:
    redis_set = of_kind(resources, "StatefulSet")["redis"]
    [c] = redis_set["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    [claim] = redis_set["spec"]["volumeClaimTemplates"]
    [mount] = [m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert mount["mountPath"] == args[args.index("--dir") + 1]
    gw = of_kind(resources, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert env(gw)["QUEUEBERT_REDIS_URL"] == "redis://redis:6379/0" and "redis" in of_kind(resources, "Service")


# -- KEDA ------------------------------------------------------------------------------------------

#: The ScaledObject fields this project uses, as KEDA defines them, written here as a JSON Schema.
#: Source: KEDA's CRD, kedacore/keda config/crd/bases/keda.sh_scaledobjects.yaml (openAPIV3Schema of
#: keda.sh/v1alpha1 ScaledObject, read at commit 8b4f083ca8c8, v2.20.1-117-g8b4f083ca, August 2026)
#: and its validation in apis/keda/v1alpha1/scaledobject_types.go (same commit); the reference at
#: https://keda.sh/docs/2.22/reference/scaledobject-spec/ documents the same fields and defaults.
#: Strict where the CRD is (types, minimums, required fields, string-only trigger metadata) and
#: stricter where it is open (no field outside those it lists), so a misspelt field fails here.
_INT = {"type": "integer"}
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "name": {"type": "string", "minLength": 1},
                                   "envSourceContainerName": {"type": "string"}},
                },
                "pollingInterval": {**_INT, "minimum": 1},
                "cooldownPeriod": {**_INT, "minimum": 0},
                "initialCooldownPeriod": {**_INT, "minimum": 0},
                "idleReplicaCount": {**_INT, "minimum": 0},
                "minReplicaCount": {**_INT, "minimum": 0},
                "maxReplicaCount": {**_INT, "minimum": 1},
                "fallback": {
                    "type": "object", "required": ["failureThreshold", "replicas"], "additionalProperties": False,
                    "properties": {"failureThreshold": {**_INT, "minimum": 0}, "replicas": {**_INT, "minimum": 0},
                                   "behavior": {"enum": ["static", "currentReplicas", "currentReplicasIfHigher",
                                                         "currentReplicasIfLower", "scalingModifiers"]}},
                },
                "advanced": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "scalingModifiers": {"type": "object"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object", "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                # autoscaling/v2 HorizontalPodAutoscalerBehavior (validated below
                                # against Kubernetes's own schema).
                                "behavior": {"type": "object"},
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string", "minLength": 1},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["Value", "AverageValue", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "authenticationRef": {"type": "object", "required": ["name"]},
                        },
                    },
                },
            },
        },
    },
}

#: The prometheus scaler's trigger metadata: the fields of prometheusMetadata in kedacore/keda
#: pkg/scalers/prometheus_scaler.go (same commit; `keda:"name=..., optional"` tags), documented at
#: https://keda.sh/docs/2.13/scalers/prometheus/ (serverAddress, query, threshold required).
PROMETHEUS_REQUIRED = {"serverAddress", "query", "threshold"}
PROMETHEUS_OPTIONAL = {"queryParameters", "activationThreshold", "namespace", "customHeaders", "ignoreNullValues",
                       "unsafeSsl", "awsRegion", "timeout", "identityOwner"}


def test_scaled_objects_follow_kedas_schema(resources: list[dict[str, Any]]) -> None:
    scaled = of_kind(resources, "ScaledObject")
    assert set(scaled) == set(workers(resources))  # one per worker Deployment
    validator = jsonschema.Draft202012Validator(SCALED_OBJECT_SCHEMA)
    for name, so in scaled.items():
        validator.validate(so)
        spec = so["spec"]
        # KEDA's own checks (scaledobject_types.go): min <= max (the CRD's CEL rule too); fallback
        # needs a trigger that is not cpu or memory (AverageValue, the prometheus default).
        assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
        assert spec["minReplicaCount"] == 0  # scale to zero
        assert "idleReplicaCount" not in spec  # "must be less than minReplicaCount": 0 leaves no room
        target = spec["scaleTargetRef"]
        assert target["name"] == name and target.get("kind", "Deployment") == "Deployment"
        if "fallback" in spec:
            assert any(t["type"] not in ("cpu", "memory") and t.get("metricType", "AverageValue") == "AverageValue"
                       for t in spec["triggers"])
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": name},
               "spec": {"scaleTargetRef": {"kind": "Deployment", "name": name}, "maxReplicas": 1,
                        "behavior": behavior}}
        kubernetes_validate.validate(hpa, "1.37.0", strict=True)

        [trigger] = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "prometheus"
        assert PROMETHEUS_REQUIRED <= set(meta) <= PROMETHEUS_REQUIRED | PROMETHEUS_OPTIONAL
        assert float(meta["threshold"]) > 0 and float(meta.get("activationThreshold", "0")) >= 0
        assert meta["ignoreNullValues"] in ("true", "false")
        assert meta["serverAddress"].startswith(("http://", "https://"))


def test_scaler_queries_read_the_exporters_gauge_for_their_workers_queue(resources: list[dict[str, Any]]) -> None:
    """The query names a series the exporter really exports, for the queue its Deployment serves."""
    from producer.exporter import QueueDepthCollector
    from queuebert.queue_depth import QueueDepth

    exported = {m.name for m in QueueDepthCollector.families([QueueDepth("q", 1, 2, False, None, 0, 0, False)])}
    deployments = workers(resources)
    for name, so in of_kind(resources, "ScaledObject").items():
        query = so["spec"]["triggers"][0]["metadata"]["query"]
        [(metric, queue)] = re.findall(r'(queuebert_\w+)\{queue="([^"]+)"\}', query)
        assert metric in exported and metric == "queuebert_queue_items"
        served = WorkerSettings.from_env(env(deployments[name]["spec"]["template"]["spec"]["containers"][0])).queues
        assert served == [queue]
        assert query.count("(") == query.count(")")
