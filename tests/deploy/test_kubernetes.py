"""Kubernetes manifests under deploy/k8s: schema validation and the properties that matter.

Core kinds are validated offline, strictly (unknown fields are errors), against the
Kubernetes JSON schemas that ``kubernetes-validate`` ships, for the oldest and newest versions
listed below. KEDA's ScaledObject and the Prometheus Operator's PodMonitor are custom
resources with no schema there: they are validated against the focused schemas in
tests/deploy/schemas. The base files and the overlays' patches are checked as files; the
overlays are also rendered with a real kustomize (``kubectl kustomize`` or ``kustomize
build``) and every rendered object validated.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from inferd.settings import Settings
from tests.deploy.conftest import (
    DEPLOY,
    SCHEMAS,
    assert_known_metrics,
    load_yaml,
    load_yaml_all,
    need_tool,
)

K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAYS = ("gpu", "production")
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
CUSTOM_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.schema.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.schema.json",
}
LABELS_API = {"app.kubernetes.io/name": "inferd", "app.kubernetes.io/component": "api"}
QUEUED_QUERY = 'max(inference_jobs{job="inferd-api", status="queued"})'
UVICORN_DRAIN_SECONDS = 10  # timeout_graceful_shutdown in inferd.cli
MODEL_STOP_SECONDS = 5  # registry.stop(grace=5.0) in the app's shutdown


# ----------------------------------------------------------------------------- helpers
def validate(doc: dict[str, Any]) -> None:
    """Raise if ``doc`` is not a valid object of its kind."""
    custom = CUSTOM_SCHEMAS.get((doc.get("apiVersion", ""), doc.get("kind", "")))
    if custom is not None:
        schema = json.loads((SCHEMAS / custom).read_text())
        jsonschema.Draft202012Validator(schema).validate(doc)
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:
            raise AssertionError(f"no schema for {doc['apiVersion']} {doc['kind']}") from exc
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            raise AssertionError(
                f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes "
                f"{version}: {where}: {exc.message}"
            ) from None


def kustomization(folder: Path) -> dict[str, Any]:
    result: dict[str, Any] = load_yaml(folder / "kustomization.yaml")
    return result


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {key.strip(): value.strip() for key, value in pairs if key and not key.startswith("#")}


def raw_base() -> list[dict[str, Any]]:
    """The base as files: its resources, and the ConfigMap its generator makes."""
    k = kustomization(BASE)
    docs = [doc for name in k["resources"] for doc in load_yaml_all((BASE / name).read_text())]
    for generator in k.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for env_file in generator.get("envs", []):
            data.update(read_env_file(BASE / env_file))
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": data,
            }
        )
    return docs


def render(folder: Path) -> list[dict[str, Any]]:
    """``kustomize build`` of ``folder`` with the real tool."""
    tool = need_tool("kubectl", "kustomize")
    args = ["kustomize", str(folder)] if Path(tool).name == "kubectl" else ["build", str(folder)]
    result = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kustomize {folder.name} failed:\n{result.stderr}"
    return load_yaml_all(result.stdout)


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(
        f"no {kind}/{name} in {[d['kind'] + '/' + d['metadata']['name'] for d in docs]}"
    )


def config_map(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The data of the inferd ConfigMap (its name may carry kustomize's hash suffix)."""
    maps = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("inferd-config")
    ]
    assert len(maps) == 1, maps
    data: dict[str, str] = maps[0]["data"]
    return data


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec(workload)["containers"] if c["name"] == name)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a LabelSelector matches ``labels``."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return True


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (d for d in docs if d["kind"] in {"Deployment", "Job"})


def assert_restricted(workload: dict[str, Any]) -> None:
    """The "restricted" Pod Security Standard, and the read-only root filesystem."""
    spec = pod_spec(workload)
    name = workload["metadata"]["name"]
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True, name
    assert pod_sc["runAsUser"] == 10001, name  # the image's USER
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
    assert spec["automountServiceAccountToken"] is False, name
    assert spec["enableServiceLinks"] is False, name
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert not sc["capabilities"].get("add"), name
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: /tmp must be writable"
        assert "resources" in c and c["resources"]["requests"], name
        assert c["resources"]["limits"]["memory"], name


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """base, each overlay and monitoring, rendered by kustomize (skip without one)."""
    return {
        "base": render(BASE),
        **{name: render(K8S / "overlays" / name) for name in OVERLAYS},
        "monitoring": render(K8S / "monitoring"),
    }


# ----------------------------------------------------------------------------- files
def test_the_kustomization_lists_every_manifest_but_the_secret() -> None:
    k = kustomization(BASE)
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(k["resources"]) == on_disk - {"secret.example.yaml"}
    assert "secret.example.yaml" not in k["resources"]
    for generator in k["configMapGenerator"]:
        for env_file in generator["envs"]:
            assert (BASE / env_file).is_file()


MANIFEST_FILES = [
    *(p for p in sorted(BASE.glob("*.yaml")) if p.name != "kustomization.yaml"),
    K8S / "monitoring" / "podmonitor.yaml",
]


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_each_manifest_file_validates(path: Path) -> None:
    docs = load_yaml_all(path.read_text())
    assert docs
    for doc in docs:
        validate(doc)


def test_the_generated_config_map_validates() -> None:
    validate(find(raw_base(), "ConfigMap", "inferd-config"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_patch_targets_a_base_object(overlay: str) -> None:
    """Without a renderer these are the checks the patches get: they parse, and each names an
    object (and containers) of the base, with the base's apiVersion."""
    folder = K8S / "overlays" / overlay
    k = kustomization(folder)
    assert k["resources"] == ["../../base"]
    base = raw_base()
    assert k["patches"]
    for patch in k["patches"]:
        doc = load_yaml(folder / patch["path"])
        target = find(base, doc["kind"], doc["metadata"]["name"])
        assert doc["apiVersion"] == target["apiVersion"], patch
        if doc["kind"] == "Deployment":
            names = {c["name"] for c in pod_spec(target)["containers"]}
            patched = {c["name"] for c in doc["spec"]["template"]["spec"].get("containers", [])}
            assert patched <= names, f"{patch['path']}: no containers {patched - names}"


def test_the_validators_reject_mistakes() -> None:
    """The checks above can fail: a misspelt field, a wrong type, a KEDA field out of place."""
    api = find(raw_base(), "Deployment", "inferd-api")
    typo = copy.deepcopy(api)
    container(typo, "api")["imagePullPolicyy"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolicyy"):
        validate(typo)
    wrong_type = copy.deepcopy(api)
    wrong_type["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] = [0]
    with pytest.raises(AssertionError):
        validate(wrong_type)
    scaled = find(raw_base(), "ScaledObject", "inferd-worker")
    hpa_field = copy.deepcopy(scaled)
    hpa_field["spec"]["minReplicas"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate(hpa_field)
    no_query = copy.deepcopy(scaled)
    del no_query["spec"]["triggers"][0]["metadata"]["query"]
    with pytest.raises(jsonschema.ValidationError):
        validate(no_query)


# ----------------------------------------------------------------------------- rendered
@pytest.mark.parametrize("name", ["base", *OVERLAYS, "monitoring"])
def test_every_rendered_object_validates(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    docs = rendered[name]
    assert docs
    for doc in docs:
        validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "inferd", doc["metadata"]


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_rendered_references_resolve(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    docs = rendered[name]
    maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    secret = load_yaml(BASE / "secret.example.yaml")
    for workload in workloads(docs):
        spec = pod_spec(workload)
        assert spec["serviceAccountName"] in {
            d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"
        }
        for c in spec["containers"]:
            assert c["image"].rsplit("/", 1)[-1].startswith("inferd:"), c["image"]
            for source in c.get("envFrom", []):
                assert source["configMapRef"]["name"] in maps, (name, source)
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret["metadata"]["name"]
                    assert ref["key"] in secret["stringData"]
        assert selects(
            workload["spec"].get("selector", {}), workload["spec"]["template"]["metadata"]["labels"]
        )
        assert "replicas" not in workload["spec"], "the HPA and KEDA own the replica counts"
        assert_restricted(workload)


def test_the_gpu_overlay_puts_api_and_workers_on_gpus(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["gpu"]
    for name, cname in (("inferd-api", "api"), ("inferd-worker", "worker")):
        workload = find(docs, "Deployment", name)
        spec = pod_spec(workload)
        assert container(workload, cname)["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
        assert container(workload, cname)["image"].endswith("-text")
        # the rest of the base survives the patch
        assert container(workload, cname)["securityContext"]["readOnlyRootFilesystem"] is True
    # the migration needs no GPU
    assert "nodeSelector" not in pod_spec(find(docs, "Job", "inferd-migrate"))


def test_the_production_overlay_scales_up(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base, prod = rendered["base"], rendered["production"]
    base_hpa, prod_hpa = (find(d, "HorizontalPodAutoscaler", "inferd-api") for d in (base, prod))
    assert prod_hpa["spec"]["minReplicas"] > base_hpa["spec"]["minReplicas"]
    assert prod_hpa["spec"]["maxReplicas"] > base_hpa["spec"]["maxReplicas"]
    assert prod_hpa["spec"]["metrics"] == base_hpa["spec"]["metrics"]
    base_so, prod_so = (find(d, "ScaledObject", "inferd-worker") for d in (base, prod))
    assert prod_so["spec"]["minReplicaCount"] > base_so["spec"]["minReplicaCount"]
    assert prod_so["spec"]["maxReplicaCount"] > base_so["spec"]["maxReplicaCount"]
    assert prod_so["spec"]["triggers"] == base_so["spec"]["triggers"]
    for name, cname in (("inferd-api", "api"), ("inferd-worker", "worker")):
        before = container(find(base, "Deployment", name), cname)["resources"]["requests"]
        after = container(find(prod, "Deployment", name), cname)["resources"]["requests"]
        assert after != before
    assert set(config_map(base)) <= set(config_map(prod))


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_the_config_map_holds_valid_settings(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    check_settings(config_map(rendered[name]))


# ----------------------------------------------------------------------------- semantics
def check_settings(data: dict[str, str]) -> Settings:
    """Every key is an inferd setting (a misspelt one would be silently ignored), and the
    values parse as the settings do."""
    fields = {f"INFERD_{name.upper()}": name for name in Settings.model_fields}
    unknown = set(data) - set(fields)
    assert not unknown, f"not inferd settings: {unknown}"
    assert "INFERD_DATABASE_URL" not in data and "INFERD_REDIS_URL" not in data, "secrets"
    return Settings(_env_file=None, **{fields[k]: v for k, v in data.items()})  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    """The base objects as files (the properties below do not depend on kustomize)."""
    return raw_base()


def test_the_config_map_of_the_files_holds_valid_settings(base: list[dict[str, Any]]) -> None:
    settings = check_settings(config_map(base))
    assert settings.workers == 0, "API replicas leave long-running requests to the workers"
    assert str(settings.data_dir) == "/data" and str(settings.models_dir) == "/models"


def test_the_api_deployment_probes_drains_and_rolls_safely(base: list[dict[str, Any]]) -> None:
    api = find(base, "Deployment", "inferd-api")
    spec, c = pod_spec(api), container(api, "api")
    settings = check_settings(config_map(base))
    assert c["args"] == ["serve", "--host", "0.0.0.0"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": settings.port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    rolling = api["spec"]["strategy"]
    assert rolling["type"] == "RollingUpdate"
    assert rolling["rollingUpdate"]["maxUnavailable"] == 0
    assert rolling["rollingUpdate"]["maxSurge"] >= 1
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop >= 3
    needed = pre_stop + UVICORN_DRAIN_SECONDS + MODEL_STOP_SECONDS
    assert spec["terminationGracePeriodSeconds"] >= needed
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts[str(settings.data_dir)]]
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert selects(
        anti[0]["podAffinityTerm"]["labelSelector"], api["spec"]["template"]["metadata"]["labels"]
    )
    assert c["resources"]["requests"]["cpu"], "the HPA's CPU utilization needs a request"


def test_the_worker_deployment_shuts_down_within_its_grace(base: list[dict[str, Any]]) -> None:
    worker = find(base, "Deployment", "inferd-worker")
    c = container(worker, "worker")
    settings = check_settings(config_map(base))
    assert c["args"][0] == "worker"
    assert "--concurrency" in c["args"]
    assert "ports" not in c and "livenessProbe" not in c and "readinessProbe" not in c
    # running jobs get shutdown_grace_seconds, then the models stop (1 s)
    assert pod_spec(worker)["terminationGracePeriodSeconds"] > settings.shutdown_grace_seconds + 1


def test_the_service_pdb_and_policies_select_the_api_pods(base: list[dict[str, Any]]) -> None:
    api = find(base, "Deployment", "inferd-api")
    labels = api["spec"]["template"]["metadata"]["labels"]
    service = find(base, "Service", "inferd-api")
    assert selects({"matchLabels": service["spec"]["selector"]}, labels)
    assert service["spec"]["selector"] == LABELS_API
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = find(base, "PodDisruptionBudget", "inferd-api")
    assert selects(pdb["spec"]["selector"], labels)
    hpa = find(base, "HorizontalPodAutoscaler", "inferd-api")
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]

    policy = find(base, "NetworkPolicy", "inferd-api")["spec"]
    assert selects(policy["podSelector"], labels)
    assert {"protocol": "TCP", "port": 8000} in policy["ingress"][0]["ports"]
    egress = [(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]]
    assert {("UDP", 53), ("TCP", 53), ("TCP", 5432), ("TCP", 6379)} <= set(egress)

    backend = find(base, "NetworkPolicy", "inferd-backend")["spec"]
    for name in ("inferd-worker",):
        assert selects(
            backend["podSelector"],
            find(base, "Deployment", name)["spec"]["template"]["metadata"]["labels"],
        )
    assert selects(
        backend["podSelector"],
        find(base, "Job", "inferd-migrate")["spec"]["template"]["metadata"]["labels"],
    )
    assert not selects(backend["podSelector"], labels)
    assert backend["ingress"] == [] and "Ingress" in backend["policyTypes"]


def test_the_hpa_scales_on_cpu_and_the_adapter_metric(base: list[dict[str, Any]]) -> None:
    hpa = find(base, "HorizontalPodAutoscaler", "inferd-api")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "inferd-api",
    }
    metrics = {m["type"]: m for m in hpa["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    pods_metric = metrics["Pods"]["pods"]["metric"]["name"]
    assert pods_metric == "inference_queue_depth"
    adapter = load_yaml(K8S / "monitoring" / "prometheus-adapter-values.yaml")
    rule = adapter["rules"]["custom"][0]
    assert rule["name"]["as"] == pods_metric
    assert_known_metrics([rule["seriesQuery"], pods_metric], "prometheus-adapter rule")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_keda_scales_the_workers_on_queued_requests(base: list[dict[str, Any]]) -> None:
    scaled = find(base, "ScaledObject", "inferd-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "inferd-worker"
    find(base, "Deployment", scaled["scaleTargetRef"]["name"])
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == QUEUED_QUERY
    assert_known_metrics([QUEUED_QUERY], "ScaledObject")
    assert float(trigger["metadata"]["threshold"]) > 0
    assert scaled["minReplicaCount"] <= scaled["maxReplicaCount"]


def test_keda_also_scales_the_workers_on_the_work_they_do(base: list[dict[str, Any]]) -> None:
    triggers = find(base, "ScaledObject", "inferd-worker")["spec"]["triggers"]
    tokens = next(t for t in triggers if t["name"] == "tokens-processed")
    assert tokens["type"] == "prometheus"
    query = tokens["metadata"]["query"]
    assert "inference_tokens_processed_total" in query and query.startswith("sum(rate(")
    assert_known_metrics([query], "ScaledObject")
    assert float(tokens["metadata"]["threshold"]) > 0
    # Until the workers are scraped the query is empty: that must read as 0, not an error
    # that would put the whole ScaledObject on its fallback.
    assert tokens["metadata"]["ignoreNullValues"] == "true"


def test_the_migration_job_upgrades_the_schema(base: list[dict[str, Any]]) -> None:
    job = find(base, "Job", "inferd-migrate")
    c = container(job, "migrate")
    assert c["args"] == ["db", "upgrade"]
    assert pod_spec(job)["restartPolicy"] in {"OnFailure", "Never"}
    assert any(e["name"] == "INFERD_DATABASE_URL" for e in c["env"])
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_the_pod_monitor_scrapes_the_api_as_job_inferd_api(base: list[dict[str, Any]]) -> None:
    monitor = load_yaml(K8S / "monitoring" / "podmonitor.yaml")
    api = find(base, "Deployment", "inferd-api")
    assert selects(monitor["spec"]["selector"], api["spec"]["template"]["metadata"]["labels"])
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in {p["name"] for p in container(api, "api")["ports"]}
    assert endpoint["path"] == "/metrics"
    relabel = endpoint["relabelings"][0]
    assert (relabel["targetLabel"], relabel["replacement"]) == ("job", "inferd-api")
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(
        container(api, "api")["ports"][0]["containerPort"]
    )


def test_the_namespace_enforces_the_restricted_standard(base: list[dict[str, Any]]) -> None:
    namespace = find(base, "Namespace", "inferd")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in workloads(base):
        assert_restricted(workload)
