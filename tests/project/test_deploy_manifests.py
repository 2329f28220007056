"""Every Kubernetes manifest under deploy/kubernetes/ is valid: core kinds against the
Kubernetes schemas bundled by `kubernetes-validate` (offline, strict: no unknown field), the
KEDA ScaledObject against tests/schemas/. And the deployment says what the README promises."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.30.0"
CUSTOM_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): REPO / "tests" / "schemas" / "keda-scaledobject-v1alpha1.json"}


def documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, resource) for every resource of every manifest."""
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


@pytest.mark.parametrize(("name", "resource"), documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_manifest_matches_its_schema(name: str, resource: dict[str, Any]) -> None:
    custom = CUSTOM_SCHEMAS.get((resource["apiVersion"], resource["kind"]))
    if custom is not None:
        jsonschema.validate(resource, json.loads(custom.read_text()))
    else:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_is_refused() -> None:
    (scaled,) = by_kind("ScaledObject")
    bad = {**scaled, "spec": {**scaled["spec"], "minReplicas": 0}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads(CUSTOM_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")].read_text()))
    (deployment, *_) = by_kind("Deployment")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {**deployment, "spec": {**deployment["spec"], "replica": 1}}, KUBERNETES_VERSION, strict=True
        )


def test_workers_take_one_gpu_each_and_scale_to_zero_on_their_queue() -> None:
    workers = [d for d in by_kind("Deployment") if d["metadata"]["labels"]["app.kubernetes.io/name"] == "ipab-worker"]
    assert workers
    for worker in workers:
        pod = worker["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["IPAB_RECONCILE_IN_WORKERS"] == "false"  # the reconciler runs in its own Deployment
        # The grace period outlasts the longest job (its hard time limit) plus its upload.
        assert pod["terminationGracePeriodSeconds"] > float(env["IPAB_HARD_TIME_LIMIT_S"])
    targets = {d["spec"]["scaleTargetRef"]["name"]: d["spec"] for d in by_kind("ScaledObject")}
    for worker in workers:
        spec = targets[worker["metadata"]["name"]]
        assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]
        model_set = worker["metadata"]["labels"]["ipab.dev/model-set"]
        lists = [t["metadata"]["listName"] for t in spec["triggers"] if t["type"] == "redis"]
        assert lists == [f"ipab.render.{model_set}"]


def test_the_apis_metrics_are_scraped_on_their_own_port_which_its_service_does_not_expose() -> None:
    (api,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "ipab-api"]
    (container,) = api["spec"]["template"]["spec"]["containers"]
    port = {e["name"]: e["value"] for e in container["env"]}["IPAB_API_METRICS_PORT"]
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == port and annotations["prometheus.io/path"] == "/metrics"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(port) != ports["http"]
    assert container["command"][container["command"].index("--port") + 1] == str(ports["http"])
    (service,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "ipab-api"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]  # the metrics port stays in the cluster


def test_the_control_loops_run_outside_the_workers() -> None:
    commands = [c["command"] for d in by_kind("Deployment") for c in d["spec"]["template"]["spec"]["containers"]]
    assert ["ipab", "reconcile", "--loop"] in commands
    assert ["ipab", "beat"] in commands
    assert any(c[:2] == ["ipab", "api"] for c in commands)


def test_no_image_is_unpinned() -> None:
    images = [c["image"] for d in by_kind("Deployment") for c in d["spec"]["template"]["spec"]["containers"]]
    assert all(":" in image and not image.endswith(":latest") for image in images), images


def test_the_grafana_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads((REPO / "docker" / "grafana-ipab.json").read_text())
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    sources = " ".join(
        p.read_text() for p in (REPO / "worker" / "metrics.py", REPO / "scheduler" / "api" / "metrics.py")
    )
    for name in set(re.findall(r"\bipab_[a-z_]+", exprs)):
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert f'"{base}"' in sources, name
