"""The deployment files in k8s/ and docker/, checked with no cluster: every manifest against the
Kubernetes schema (kubernetes-validate, strict) or, for custom resources, against the KubeRay
and Prometheus Operator schemas kept in tests/k8s/schemas/; then what they must say."""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
K8S, DOCKER, SCHEMAS = REPO / "k8s", REPO / "docker", Path(__file__).parent / "schemas"
KUBERNETES = "1.30"  # the oldest Kubernetes these manifests target
CRDS = {("ray.io/v1", "RayService"): "rayservice-ray-v1.json",
        ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring-v1.json",
        ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json"}
# the contract of edit_serve.ray_serve:app_builder
SERVE_ARGS = {"model", "engine", "replicas", "num_gpus_per_replica", "editor_num_gpus", "patch_store",
              "probe_interval_s", "admin_token_env", "warm_editor"}


def documents() -> list[tuple[str, dict]]:
    """Every Kubernetes object under k8s/ (other YAML there, such as a Ray Serve config, is skipped)."""
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                docs.append((f"{path.relative_to(REPO)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


def _registry() -> Registry:
    version = f"v{kubernetes_validate.utils.latest_version()}-local-strict"
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / version
    definitions = json.loads((folder / "_definitions.json").read_text())
    return Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))


REGISTRY = _registry()


def validate(doc: dict) -> None:
    """Raise a jsonschema ValidationError (or kubernetes-validate's) unless `doc` is valid."""
    crd = CRDS.get((doc.get("apiVersion"), doc.get("kind")))
    if crd is None:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        return
    schema = json.loads((SCHEMAS / crd).read_text())
    jsonschema.Draft202012Validator(schema, registry=REGISTRY).validate(doc)


DOCS = documents()


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in DOCS if d["kind"] == kind]


@pytest.mark.parametrize("name,doc", DOCS, ids=[n for n, _ in DOCS])
def test_manifest_is_valid(name, doc):
    validate(doc)


def test_every_kind_is_there():
    kinds = {d["kind"] for _, d in DOCS}
    assert {"RayService", "PodMonitor", "PrometheusRule", "ConfigMap", "PersistentVolumeClaim", "Secret",
            "Deployment", "Service", "Namespace"} <= kinds


@pytest.mark.parametrize("mutate,where", [
    (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    (lambda d: d["spec"]["rayClusterConfig"].__setitem__("workerGroupSpec", []), "workerGroupSpec"),
    (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .__setitem__("readinessProbes", {}), "readinessProbes"),
    (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__("replicas", "two"), "two"),
])
def test_the_schemas_catch_mistakes(mutate, where):
    doc = copy.deepcopy(by_kind("RayService")[0])
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError) as e:
        validate(doc)
    assert where in str(e.value)
    monitor = copy.deepcopy(by_kind("PodMonitor")[0])
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)
    deployment = copy.deepcopy(by_kind("Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(jsonschema.ValidationError):
        validate(deployment)


def _groups(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def test_rayservice_runs_the_serve_application_with_gpus_probes_secret_and_store():
    (rs,) = by_kind("RayService")
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "edit_serve.ray_serve:app_builder"
    assert set(app["args"]) == SERVE_ARGS
    assert serve["http_options"]["port"] == 8000
    groups = _groups(rs)
    assert set(groups) == {"head", "model-replicas", "editor"}
    replicas, editor = groups["model-replicas"], groups["editor"]
    assert replicas["replicas"] == app["args"]["replicas"]
    for group, gpus in ((replicas, app["args"]["num_gpus_per_replica"]), (editor, app["args"]["editor_num_gpus"])):
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert group["rayStartParams"]["num-gpus"] == str(gpus)
    claims = {c["metadata"]["name"] for c in by_kind("PersistentVolumeClaim")}
    secrets = {s["metadata"]["name"] for s in by_kind("Secret")}
    for name, group in groups.items():
        pod = group["template"]["spec"]
        store = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                 if "persistentVolumeClaim" in v}
        assert set(store.values()) <= claims and store, name
        for c in pod["containers"]:
            assert c.get("readinessProbe") and c.get("livenessProbe"), name
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert mounts[next(iter(store))] == app["args"]["patch_store"], name
            token = {e["name"]: e for e in c["env"]}[app["args"]["admin_token_env"]]
            assert token["valueFrom"]["secretKeyRef"]["name"] in secrets, name
    ray_image = re.search(r"ARG RAY_IMAGE=rayproject/ray:([0-9.]+)-", (DOCKER / "Dockerfile.gpu").read_text())
    assert ray_image and ray_image.group(1) == rs["spec"]["rayClusterConfig"]["rayVersion"]


def test_podmonitors_scrape_named_ports_of_the_pods_they_select():
    pods = [g["template"] for g in _groups(by_kind("RayService")[0]).values()]
    pods += [d["spec"]["template"] for d in by_kind("Deployment")]
    for monitor in by_kind("PodMonitor"):
        wanted = monitor["spec"]["selector"]["matchLabels"]
        selected = [p for p in pods if wanted.items() <= p["metadata"]["labels"].items()]
        assert selected, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for pod in selected:
                ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
                assert endpoint["port"] in ports, (monitor["metadata"]["name"], endpoint["port"])


def test_images_are_the_ones_the_dockerfiles_build():
    images = set()
    for _, doc in DOCS:
        images |= set(re.findall(r"'image': '([^']+)'", str(doc)))
    assert images == {"edit-serve-gpu:0.1.0", "edit-serve-cpu:0.1.0"}
    for image in images:
        flavour = image.split(":")[0].removeprefix("edit-serve-")
        dockerfile = (DOCKER / f"Dockerfile.{flavour}").read_text()
        assert f"docker build -f docker/Dockerfile.{flavour} -t {image} ." in dockerfile
        for source in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M):
            for path in source.split():
                if path != "README.md":  # written by the project README work
                    assert (REPO / path).exists(), f"Dockerfile.{flavour} copies missing {path}"


def test_dashboard_configmap_is_up_to_date():
    spec = importlib.util.spec_from_file_location("dashboard_build", K8S / "dashboards" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for path, text in build.render().items():
        assert path.read_text() == text, f"{path.name} is stale: run python k8s/dashboards/build.py"
