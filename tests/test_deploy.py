"""deploy/: the Kubernetes manifests hold the fields their kinds require (a JSON schema written
here, checked by a small validator: no cluster, no network, nothing built), and agree with the app:
probe paths are routes of `finegrain serve`, ports match the Dockerfile's, the container's arguments
parse as `finegrain serve` options, the grace period covers the drain, the autoscaler's custom
metric is one the server exports. The Dockerfile pins torch as requirements.txt does."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))

# ------------------------------------------------------------------------------------- a JSON-schema subset

NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {"type": "object", "required": ["name"], "properties": {
    "name": NAME, "labels": LABELS, "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
PORT_REF = {"type": ["integer", "string"]}
PROBE = {"type": "object", "required": ["httpGet"], "additionalProperties": False, "properties": {
    "httpGet": {"type": "object", "required": ["path", "port"], "additionalProperties": False,
                "properties": {"path": {"type": "string", "pattern": "^/"}, "port": PORT_REF}},
    "initialDelaySeconds": {"type": "integer", "minimum": 0}, "periodSeconds": {"type": "integer", "minimum": 1},
    "timeoutSeconds": {"type": "integer", "minimum": 1}, "failureThreshold": {"type": "integer", "minimum": 1},
    "successThreshold": {"type": "integer", "minimum": 1}}}
QUANTITY = {"type": ["string", "integer"], "pattern": r"^[0-9.]+(m|Ki|Mi|Gi|Ti|k|M|G)?$"}
RESOURCES = {"type": "object", "required": ["requests"], "additionalProperties": False, "properties": {
    "requests": {"type": "object", "required": ["cpu", "memory"], "additionalProperties": QUANTITY},
    "limits": {"type": "object", "additionalProperties": QUANTITY}}}
CONTAINER = {"type": "object", "required": ["name", "image", "ports", "readinessProbe", "livenessProbe", "resources"],
             "properties": {
    "name": NAME, "image": {"type": "string"}, "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "args": {"type": "array", "items": {"type": "string"}}, "command": {"type": "array", "items": {"type": "string"}},
    "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"], "additionalProperties": False,
                                         "properties": {"name": NAME, "containerPort": {"type": "integer", "minimum": 1},
                                                        "protocol": {"enum": ["TCP", "UDP", "SCTP"]}}}},
    "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
    "resources": RESOURCES, "readinessProbe": PROBE, "livenessProbe": PROBE, "startupProbe": PROBE,
    "lifecycle": {"type": "object"}, "securityContext": {"type": "object"},
    "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}}}}
SCHEMAS = {
    ("apps/v1", "Deployment"): {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "metadata": METADATA,
        "spec": {"type": "object", "required": ["selector", "template"], "properties": {
            "replicas": {"type": "integer", "minimum": 1},
            "selector": {"type": "object", "required": ["matchLabels"], "properties": {"matchLabels": LABELS}},
            "template": {"type": "object", "required": ["metadata", "spec"], "properties": {
                "metadata": {"type": "object", "required": ["labels"], "properties": {"labels": LABELS}},
                "spec": {"type": "object", "required": ["containers", "terminationGracePeriodSeconds"], "properties": {
                    "terminationGracePeriodSeconds": {"type": "integer", "minimum": 1},
                    "containers": {"type": "array", "items": CONTAINER, "minItems": 1},
                    "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}}}}}}}}}},
    ("v1", "Service"): {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "metadata": METADATA,
        "spec": {"type": "object", "required": ["selector", "ports"], "properties": {
            "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "selector": LABELS,
            "ports": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["port", "targetPort"],
                                                                "properties": {"port": {"type": "integer"}, "targetPort": PORT_REF}}}}}}},
    ("autoscaling/v2", "HorizontalPodAutoscaler"): {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "metadata": METADATA,
        "spec": {"type": "object", "required": ["scaleTargetRef", "maxReplicas", "metrics"], "properties": {
            "scaleTargetRef": {"type": "object", "required": ["apiVersion", "kind", "name"]},
            "minReplicas": {"type": "integer", "minimum": 1}, "maxReplicas": {"type": "integer", "minimum": 1},
            "metrics": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["type"], "properties": {
                "type": {"enum": ["Resource", "Pods", "Object", "External", "ContainerResource"]}}}},
            "behavior": {"type": "object"}}}}},
}
TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool}


def violations(value, schema: dict, where: str = "") -> list[str]:
    """What in `value` breaks `schema` (type, required, properties, additionalProperties, items,
    minItems, enum, pattern, minimum), each as 'path: reason'."""
    found = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(isinstance(value, TYPES[k]) and not (k in ("integer", "number") and isinstance(value, bool)) for k in kinds):
            return [f"{where or '/'}: {value!r} is not of type {'/'.join(kinds)}"]
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        found.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        found.append(f"{where}: {value} is below {schema['minimum']}")
    if isinstance(value, dict):
        found += [f"{where}/{key}: required" for key in schema.get("required", []) if key not in value]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                found += violations(item, properties[key], f"{where}/{key}")
            elif extra is False:
                found.append(f"{where}/{key}: not a field here")
            elif isinstance(extra, dict):
                found += violations(item, extra, f"{where}/{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            found.append(f"{where}: fewer than {schema['minItems']} items")
        for index, item in enumerate(value):
            found += violations(item, schema.get("items", {}), f"{where}/{index}")
    return found


# ------------------------------------------------------------------------------------- the manifests


def documents() -> dict[str, dict]:
    """Every manifest in deploy/kubernetes, by kind."""
    found = {}
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                assert document["kind"] not in found, f"{path}: a second {document['kind']}"
                found[document["kind"]] = document
    return found


def answers(path: str) -> int:
    """The status `finegrain serve`'s app answers a GET of `path` with, before its models load
    (the app is built and called in this process; no model is read, no port bound)."""
    from fastapi.testclient import TestClient

    from finegrain.serve.app import create_app
    from finegrain.serve.models import ModelRegistry

    return TestClient(create_app(ModelRegistry([], [None]))).get(path).status_code


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def serve_arguments(container: dict):
    """The Dockerfile's ENTRYPOINT plus the container's args, parsed as `finegrain` parses them."""
    import json

    from finegrain.cli import build_parser

    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile(), re.MULTILINE)[1])
    command = [*(container.get("command") or entrypoint), *container.get("args", [])]
    assert command[0] == "finegrain"
    return build_parser().parse_args(command[1:])


def test_the_manifests_hold_what_their_kinds_require():
    found = documents()
    assert set(found) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for kind, document in found.items():
        schema = SCHEMAS.get((document["apiVersion"], kind))
        assert schema is not None, f"{kind}: apiVersion {document['apiVersion']} is not one the cluster serves"
        assert violations(document, schema) == [], kind


def test_the_validator_sees_what_is_wrong():
    deployment = documents()["Deployment"]
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    del container["readinessProbe"]
    container["livenessProbe"]["httpGet"]["path"] = "healthz"
    container["ports"][0]["containerPort"] = "8000"
    broken["spec"]["replicas"] = True
    assert sorted(violations(broken, SCHEMAS[("apps/v1", "Deployment")])) == [
        "/spec/replicas: True is not of type integer",
        "/spec/template/spec/containers/0/livenessProbe/httpGet/path: 'healthz' does not match ^/",
        "/spec/template/spec/containers/0/ports/0/containerPort: '8000' is not of type integer",
        "/spec/template/spec/containers/0/readinessProbe: required",
    ]


def test_probes_ports_and_selectors_agree_with_the_app():
    found = documents()
    deployment, service, autoscaler = found["Deployment"], found["Service"], found["HorizontalPodAutoscaler"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert answers("/no-such-route") == 404
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert answers("/readyz") == 503  # loading: not ready yet, as the probe must see it
    for probe in ("livenessProbe", "startupProbe"):
        assert answers(container[probe]["httpGet"]["path"]) == 200, probe  # alive while loading
    assert answers(pod["metadata"]["annotations"]["prometheus.io/path"]) == 200

    ports = {port.get("name"): port["containerPort"] for port in container["ports"]}
    args = serve_arguments(container)
    exposed = int(re.search(r"^EXPOSE (\d+)$", dockerfile(), re.MULTILINE)[1])
    assert set(ports.values()) == {args.port} == {exposed}
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == args.port
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        port = container[probe]["httpGet"]["port"]
        assert (ports.get(port) if isinstance(port, str) else port) == args.port, probe
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert (ports.get(target) if isinstance(target, str) else target) == args.port

    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])


def test_the_grace_period_covers_the_drain():
    from finegrain.serve.workers import DRAIN_MARGIN

    pod = documents()["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = serve_arguments(container)
    assert args.workers >= 1 and args.host == "0.0.0.0"
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    delay = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    drain = args.timeout + 5 + (DRAIN_MARGIN if args.workers > 1 else 0)  # a worker's drain, then the master's wait
    assert pod["terminationGracePeriodSeconds"] >= delay + drain


def test_the_autoscaler_scales_on_cpu_and_the_exported_queue_depth():
    from finegrain.serve.metrics import Metrics

    autoscaler = documents()["HorizontalPodAutoscaler"]
    metrics = {m["type"]: m for m in autoscaler["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Resource"]["resource"]["target"]["type"] == "Utilization"
    name = metrics["Pods"]["pods"]["metric"]["name"]
    assert f"# TYPE {name} gauge" in Metrics().render()
    (container,) = documents()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert "cpu" in container["resources"]["requests"]  # utilisation is measured against the request
    assert autoscaler["spec"]["minReplicas"] <= autoscaler["spec"]["maxReplicas"]


def test_the_dockerfile_pins_cpu_torch_as_requirements_do():
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE))
    text = dockerfile()
    assert re.search(rf"--index-url https://download\.pytorch\.org/whl/cpu torch=={re.escape(pins['torch'])}\b", text)
    assert "pip install -r requirements.txt" in text
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.MULTILINE)
    assert re.search(r"^USER \d+$", text, re.MULTILINE)  # not root
    copied = re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE)
    for sources in copied:
        for source in shlex.split(sources):
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context"


def test_the_slurm_script_starts_torchrun_on_every_node():
    script = (DEPLOY / "slurm.sbatch").read_text()
    assert script.startswith("#!/bin/bash\n") and "#SBATCH --nodes=" in script
    assert "srun" in script and "--rdzv-backend c10d" in script and '-m finegrain "$@"' in script
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(DEPLOY / "slurm.sbatch")]).returncode == 0


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_is_plain_yaml(path):
    text = path.read_text()
    assert "\t" not in text
    assert all(yaml.safe_load_all(text))
