"""deploy/kubernetes: the manifests validate against the Kubernetes schemas, the kustomization renders,
and the pieces point at each other (selectors, probe ports, grace periods, discovery name, volumes).

Rendering uses `kubectl kustomize` when kubectl is installed; without it a pure-Python stand-in loads
every file the kustomization lists (each must exist and parse) and applies its namespace.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUBE_DIR = Path(__file__).parent.parent / "deploy" / "kubernetes"
EXTRA_FILES = ["model-download-job.yaml", "autoscaling/keda-scaledobject.yaml", "autoscaling/hpa.yaml"]
# Custom resources have no schema in kubernetes-validate: checked by the cross-reference tests only.
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")
SCHEMA_VERSION = "1.30.0"  # the oldest Kubernetes these manifests target (preStop `sleep` is 1.30+)


def load_documents(path: Path) -> list[dict]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def kustomization() -> dict:
    return yaml.safe_load((KUBE_DIR / "kustomization.yaml").read_text())


def render_in_python() -> list[dict]:
    """What `kubectl kustomize` produces, for what this kustomization uses: resources and namespace."""
    config = kustomization()
    docs = []
    for name in config["resources"]:
        path = KUBE_DIR / name
        assert path.is_file(), f"kustomization.yaml lists {name}, which does not exist"
        loaded = load_documents(path)
        assert loaded, f"{name} holds no resource"
        for doc in loaded:
            if doc["kind"] != "Namespace":
                doc["metadata"].setdefault("namespace", config["namespace"])
        docs += loaded
    return docs


def render() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return render_in_python()
    result = subprocess.run([kubectl, "kustomize", str(KUBE_DIR)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return render()


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def flag_value(args: list[str], flag: str) -> str:
    """The value of `--flag=value` or `--flag value` in a container's args (shell scripts included)."""
    words = " ".join(args).replace("=", " ").split()
    assert flag in words, f"{flag} is not set in {args}"
    return words[words.index(flag) + 1]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# ---------------------------------------------------------------------- rendering and schemas
def test_every_listed_resource_exists_and_parses():
    docs = render_in_python()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "ConfigMap", "PersistentVolumeClaim", "Service", "StatefulSet",
                            "PodDisruptionBudget", "Deployment", "Service", "PodDisruptionBudget",
                            "ServiceMonitor"])


def test_rendered_resources_are_all_in_the_namespace(rendered):
    namespace = kustomization()["namespace"]
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]


@pytest.mark.parametrize("source", ["rendered", *EXTRA_FILES])
def test_manifests_validate_against_the_kubernetes_schema(source, rendered):
    docs = rendered if source == "rendered" else load_documents(KUBE_DIR / source)
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        kubernetes_validate.validate(doc, SCHEMA_VERSION, strict=True)  # raises naming the bad field
        checked += 1
    assert checked or source.endswith("keda-scaledobject.yaml")


# ---------------------------------------------------------------------- cross-references
def test_services_select_the_pods_of_their_workload(rendered):
    for service_name, kind, workload_name in [("radixfleet-worker", "StatefulSet", "radixfleet-worker"),
                                              ("radixfleet-router", "Deployment", "radixfleet-router")]:
        service = find(rendered, "Service", service_name)
        workload = find(rendered, kind, workload_name)
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert matches(service["spec"]["selector"], pod_labels)
        assert matches(workload["spec"]["selector"]["matchLabels"], pod_labels)
        container_ports = {p["name"]: p["containerPort"] for c in pod_spec(workload)["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports or port["targetPort"] in container_ports.values()
        other = "Deployment" if kind == "StatefulSet" else "StatefulSet"
        assert not matches(service["spec"]["selector"], find(rendered, other)["spec"]["template"]["metadata"]["labels"])


def test_router_discovers_the_workers_through_the_headless_service(rendered):
    service = find(rendered, "Service", "radixfleet-worker")
    workers = find(rendered, "StatefulSet")
    router = pod_spec(find(rendered, "Deployment"))["containers"][0]
    assert service["spec"]["clusterIP"] == "None", "--worker-dns needs one A record per pod: a headless Service"
    assert workers["spec"]["serviceName"] == service["metadata"]["name"]
    host, _, port = flag_value(router["args"], "--worker-dns").rpartition(":")
    assert host.split(".")[0] == service["metadata"]["name"]
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    worker_args = pod_spec(workers)["containers"][0]["args"]
    assert int(flag_value(worker_args, "--port")) == int(port)


@pytest.mark.parametrize("kind", ["StatefulSet", "Deployment"])
def test_probes_hit_health_on_the_container_port(rendered, kind):
    container = pod_spec(find(rendered, kind))["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = [container[key] for key in ("startupProbe", "readinessProbe", "livenessProbe") if key in container]
    assert "readinessProbe" in container and "livenessProbe" in container
    for probe in probes:
        action = probe.get("httpGet") or probe["tcpSocket"]
        assert action["port"] in ports or action["port"] in ports.values()
        if "httpGet" in probe:
            assert action["path"] == "/health"
    assert "httpGet" in container["readinessProbe"]


def test_worker_probes_allow_minutes_of_model_loading(rendered):
    container = pod_spec(find(rendered, "StatefulSet"))["containers"][0]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 10 * 60


def test_grace_periods_outlast_the_drains(rendered):
    worker = pod_spec(find(rendered, "StatefulSet"))
    worker_drain = float(flag_value(worker["containers"][0]["args"], "--shutdown-timeout"))
    assert worker["terminationGracePeriodSeconds"] > worker_drain
    router = pod_spec(find(rendered, "Deployment"))
    container = router["containers"][0]
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert router["terminationGracePeriodSeconds"] > pre_stop + float(flag_value(container["args"], "--drain-timeout"))


def test_workers_get_a_gpu_and_the_model_volume(rendered):
    spec = pod_spec(find(rendered, "StatefulSet"))
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {find(rendered, "PersistentVolumeClaim")["metadata"]["name"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["HF_HOME"].startswith(mounts["models"])
    config_maps = {ref["configMapRef"]["name"] for ref in container["envFrom"]}
    assert config_maps == {find(rendered, "ConfigMap")["metadata"]["name"]}


@pytest.mark.parametrize("kind", ["StatefulSet", "Deployment"])
def test_pods_run_as_non_root(rendered, kind):
    spec = pod_spec(find(rendered, kind))
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    for container in spec["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_disruption_budgets_cover_workers_and_routers(rendered):
    budgets = [d for d in rendered if d["kind"] == "PodDisruptionBudget"]
    for kind in ("StatefulSet", "Deployment"):
        labels = find(rendered, kind)["spec"]["template"]["metadata"]["labels"]
        assert sum(matches(b["spec"]["selector"]["matchLabels"], labels) for b in budgets) == 1, kind


def test_service_monitor_scrapes_both_services(rendered):
    monitor = find(rendered, "ServiceMonitor")
    for name in ("radixfleet-worker", "radixfleet-router"):
        service = find(rendered, "Service", name)
        assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]), name
        port_names = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])


@pytest.mark.parametrize("name", ["autoscaling/keda-scaledobject.yaml", "autoscaling/hpa.yaml"])
def test_autoscaling_examples_target_the_workers_on_waiting_requests(rendered, name):
    (rule,) = load_documents(KUBE_DIR / name)
    workers = find(rendered, "StatefulSet")
    target = rule["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", workers["metadata"]["name"])
    assert rule["metadata"]["namespace"] == kustomization()["namespace"]
    assert "num_requests_waiting" in yaml.safe_dump(rule["spec"])
