"""Deployment files checked offline: the Dockerfile's lint, the compose file against the compose schema,
the Kubernetes overlays rendered by kustomize and validated against the Kubernetes API schemas, and
the gateway config they ship loaded by the gateway itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import load_settings
from tests.helpers import ROOT

BIN = Path(sys.executable).parent
KUBE = ROOT / "deploy" / "kubernetes"
# The Kubernetes release the manifests are validated against (schemas bundled in kubernetes-validate).
K8S_VERSION = "1.33.0"
# Custom resources, whose schemas belong to their operators and are not bundled: checked by hand below.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}


def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_dockerfile_lint() -> None:
    result = run(BIN / "hadolint", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_targets() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", text, re.M)
    assert {name for _, name in stages} >= {"cpu", "cuda"}
    assert stages[0][0] == "${PYTHON_BASE}", "the first FROM is the Python base (podman --from replaces it)"
    assert stages[-1][1] == "cpu", "a plain build gives the CPU image"
    assert "download.pytorch.org/whl/cpu" in text
    for final in ("cpu", "cuda"):
        body = text.split(f" AS {final}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "USER 10001" in body and "COPY --from=" in body, final


def test_compose_schema_and_files() -> None:
    result = run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"gateway", "redis", "prometheus", "grafana"} <= set(services)
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"compose mounts {source}, which is missing"
    assert "/ready" in " ".join(services["gateway"]["healthcheck"]["test"])
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert set(prometheus["rule_files"]) <= mounted


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")  # its built-in kustomize (v4 or newer: Debian's 1.20 is too old)
    if kubectl is None:
        message = "kubectl is needed to render deploy/kubernetes (`kubectl kustomize`)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = run(kubectl, "kustomize", KUBE / "overlays" / overlay)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kubernetes_overlay(overlay: str) -> None:
    docs = render(overlay)
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {d["kind"] for d in docs} == {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "ScaledObject",
    }
    deployment = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    drain = load_settings(str(KUBE / "base" / "config.yaml")).server.drain_timeout
    assert pod["terminationGracePeriodSeconds"] == drain + 5  # the drain, then 5 s for preStop
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert pod["securityContext"]["runAsNonRoot"] is True
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == "1") == (overlay == "gpu")
    assert container["image"].endswith(":cuda" if overlay == "gpu" else ":cpu")
    # Keys and tokens come from Secrets, never from the ConfigMap.
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "gateway-api-keys"
    assert container["envFrom"][0]["secretRef"]["name"] == "gateway-upstream-tokens"

    configmap = by_kind(docs, "ConfigMap")
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    config_text = configmap["data"]["config.yaml"]
    assert "api_keys" not in config_text

    service, monitor = by_kind(docs, "Service"), by_kind(docs, "ServiceMonitor")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector
    assert by_kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    scaled = by_kind(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "gateway_queue_depth" in scaled["spec"]["triggers"][0]["metadata"]["query"]


def test_kubernetes_config_is_a_gateway_config() -> None:
    """The ConfigMap's file is what the pods start with: the gateway must accept it."""
    settings = load_settings(str(KUBE / "base" / "config.yaml"))
    assert {m.name for m in settings.models} == {"smollm2-135m-instruct", "all-minilm-l6-v2"}


def test_validation_is_strict() -> None:
    """The validator refuses a misspelt field, so a passing overlay means something."""
    deployment = next(d for d in render("cpu") if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
