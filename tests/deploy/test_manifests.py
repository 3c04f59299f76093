"""Deployment checks that run offline: render, lint, validate, and the invariants no linter knows."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench import hostile_memory, pod_smoke
from service.app import create_app
from service.runtime import decode_threads_for
from service.settings import Settings
from tests.support import ROOT

OVERLAYS = ("cpu", "gpu", "openvino")
OLDEST_KUBERNETES = "1.29.0"  # preStop sleep needs >= 1.29 (beta, on by default from 1.30)
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it comes with the dev extra (pip install -e '.[dev]')")
    return str(found)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("rendered")
    paths = {}
    for overlay in (*OVERLAYS, "monitoring"):
        source = ROOT / "k8s" / ("monitoring" if overlay == "monitoring" else f"overlays/{overlay}")
        text = subprocess.run(
            [tool("kubectl"), "kustomize", str(source)], capture_output=True, text=True, check=True
        ).stdout
        paths[overlay] = out / f"{overlay}.yaml"
        paths[overlay].write_text(text)
    return paths


def documents(path: Path) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def test_yaml_is_lint_clean() -> None:
    result = subprocess.run(
        [tool("yamllint"), "-s", "k8s", ".yamllint.yaml"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly_against_the_oldest_supported_kubernetes(
    rendered: dict[str, Path], overlay: str
) -> None:
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", OLDEST_KUBERNETES, "--quiet", str(rendered[overlay])],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dockerfile_copies_every_package_the_project_installs() -> None:
    # The image installs the project from the copied sources: a package pyproject names but the
    # Dockerfile does not copy builds an image whose model build fails (catdog_core once did).
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    dockerfile = (ROOT / "Dockerfile").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    for package in packages:
        assert (ROOT / package / "__init__.py").is_file()
        assert f"COPY {package}/ {package}/" in dockerfile, f"the builder stage does not copy {package}/"
        assert package not in ignored, f".dockerignore leaves {package}/ out of the build context"


@pytest.mark.parametrize(
    ("target", "wheel"), [("gpu", "onnxruntime-gpu[cuda,cudnn]"), ("openvino", "onnxruntime-openvino")]
)
def test_gpu_and_openvino_images_are_the_runtime_image_with_another_onnxruntime_wheel(
    target: str, wheel: str
) -> None:
    # Built on the runtime stage, each serves the same venv and models; only onnxruntime differs
    # (with the CUDA and cuDNN wheels the gpu image needs no CUDA base image; README, "GPU").
    dockerfile = (ROOT / "Dockerfile").read_text()
    stage = dockerfile[dockerfile.index(f" AS {target}\n") :]
    assert f"FROM runtime AS {target}" in dockerfile
    assert "pip uninstall -y onnxruntime" in stage
    assert f'pip install --find-links "${{PIP_FIND_LINKS}}" -r /tmp/{target}-requirements.txt' in stage
    lines = (ROOT / "deploy" / f"{target}-requirements.txt").read_text().splitlines()
    pins = [line for line in lines if line and not line.startswith("#")]
    assert [p.split("==")[0] for p in pins] == [wheel]
    instructions = [line for line in stage.split("\nFROM ")[0].splitlines() if not line.startswith("#")]
    assert instructions[-2:] == ["USER 10001:10001", ""], f"the {target} image must not run as root"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_probes_and_ports_fit_together(rendered: dict[str, Path], overlay: str) -> None:
    docs = documents(rendered[overlay])
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"],
        docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        docs["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items(), selector
    container = pod["spec"]["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in port_names
    assert str(port_names["http"]) in container["args"]
    routes = {route.path for route in create_app(Settings()).routes}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
        assert container[probe]["httpGet"]["path"] in routes, probe
    assert pod["metadata"]["annotations"]["prometheus.io/path"] in routes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_fits_in_the_grace_period(rendered: dict[str, Path], overlay: str) -> None:
    docs = documents(rendered[overlay])
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    config = docs["ConfigMap"]["data"]
    drain = float(config.get("CATDOG_DRAIN_TIMEOUT_S", Settings().drain_timeout_s))
    assert pre_stop + drain < pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaling_and_disruption_rules(rendered: dict[str, Path], overlay: str) -> None:
    docs = documents(rendered[overlay])
    deployment, hpa, pdb = docs["Deployment"], docs["HorizontalPodAutoscaler"], docs["PodDisruptionBudget"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    min_replicas = hpa["spec"]["minReplicas"]
    assert deployment["spec"]["replicas"] >= 2 and min_replicas >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spec = pdb["spec"]
    allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else min_replicas - spec["minAvailable"]
    assert allowed >= 1, "the PDB must allow one voluntary disruption at minReplicas"
    custom = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert custom and custom[0]["pods"]["metric"]["name"] == "catdog_queue_depth"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_restricted_and_cpu_is_guaranteed(rendered: dict[str, Path], overlay: str) -> None:
    docs = documents(rendered[overlay])
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert (
        pod["securityContext"]["runAsNonRoot"]
        and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    assert (
        pod["automountServiceAccountToken"] is False
        and docs["ServiceAccount"]["automountServiceAccountToken"] is False
    )
    container = pod["containers"][0]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"/tmp"} <= {m["mountPath"] for m in container["volumeMounts"]}
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_sets_only_real_settings_with_valid_values(rendered: dict[str, Path], overlay: str) -> None:
    config = documents(rendered[overlay])["ConfigMap"]["data"]
    known = {f"CATDOG_{name.upper()}" for name in Settings.model_fields}
    assert set(config) <= known, set(config) - known
    Settings(**{k.removeprefix("CATDOG_").lower(): v for k, v in config.items()})  # validates every value


def test_gpu_overlay_asks_for_a_gpu_and_refuses_cpu_fallback(rendered: dict[str, Path]) -> None:
    docs = documents(rendered["gpu"])
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert docs["ConfigMap"]["data"]["CATDOG_PROVIDERS"] == "cuda"
    assert container["image"].endswith("-gpu")


def test_openvino_overlay_names_the_provider_on_the_openvino_image(rendered: dict[str, Path]) -> None:
    docs = documents(rendered["openvino"])
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert docs["ConfigMap"]["data"]["CATDOG_PROVIDERS"] == "openvino"
    assert container["image"].endswith("-openvino")


def test_monitoring_rules_and_dashboard_use_metrics_the_service_exports(rendered: dict[str, Path]) -> None:
    from service.metrics import ServiceMetrics

    exported = set()
    for family in ServiceMetrics().registry.collect():
        exported |= {
            family.name,
            f"{family.name}_total",
            f"{family.name}_bucket",
            f"{family.name}_sum",
            f"{family.name}_count",
        }
    text = rendered["monitoring"].read_text() + (ROOT / "k8s/base/hpa.yaml").read_text()
    import re

    used = set(re.findall(r"\bcatdog_[a-z_]+", text))
    used -= {"catdog_serve"}  # resource names, not metrics
    unknown = {name for name in used if name not in exported and not name.startswith("catdog_serve")}
    assert not unknown, unknown


# Resident memory of the server with every model loaded and warm, before any request: measured by
# `make hostile-memory` (bench/hostile_memory.py, first row: 790-803 MiB in two runs of 2026-11-24;
# 846 MiB on 2026-12-03 with the shared arena and the lone-image sessions; 805 and 817 MiB with the
# sixth model, mobilenet-160-int8, on 2026-12-05, the same way), rounded up. Update it when the
# models change.
IDLE_RSS_MIB = 850


def _mebibytes(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


# The same on onnxruntime's OpenVINO provider, the openvino overlay's image: 1,512 MiB at ready and
# 1,557 after 6 s of load on each model (2026-12-06, the base ConfigMap's settings, two workers).
OPENVINO_IDLE_RSS_MIB = 1560


@pytest.mark.parametrize(
    ("overlay", "idle_mib"), [("cpu", IDLE_RSS_MIB), ("openvino", OPENVINO_IDLE_RSS_MIB)]
)
def test_memory_limit_follows_from_the_worst_case_formula(
    rendered: dict[str, Path], overlay: str, idle_mib: float
) -> None:
    """limit >= (idle + every admitted body twice + every decode thread's costliest image) / 0.8:
    the worst case the settings admit still leaves 20 % headroom (README, "Memory")."""
    docs = documents(rendered[overlay])
    config = docs["ConfigMap"]["data"]
    settings = Settings(**{k.removeprefix("CATDOG_").lower(): v for k, v in config.items()})
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    limit = _mebibytes(container["resources"]["limits"]["memory"])
    # Unless set, the decode threads follow the CPU limit (affinity can only lower the count).
    cpus = math.ceil(float(container["resources"]["limits"]["cpu"]))
    threads = settings.decode_threads or decode_threads_for(cpus)
    worst = idle_mib + settings.worst_case_request_memory_bytes(threads) / 2**20
    assert limit >= worst / 0.8, (
        f"limit {limit:.0f} MiB < {worst / 0.8:.0f} MiB (worst case {worst:.0f} MiB / 0.8)"
    )


def test_hostile_memory_runs_with_the_overlays_settings_and_limit() -> None:
    """The cpu overlay's provider is left to the machine's `auto`, the openvino overlay's kept; each
    run is held to its own overlay's memory limit."""
    cpu, openvino = (hostile_memory.deployment_settings(o) for o in ("cpu", "openvino"))
    assert "CATDOG_PROVIDERS" not in cpu and "CATDOG_LOG_JSON" not in cpu
    assert openvino["CATDOG_PROVIDERS"] == "openvino"
    assert {k: v for k, v in openvino.items() if k != "CATDOG_PROVIDERS"} == cpu
    limits = [hostile_memory.deployment_memory_limit_mib(o) for o in ("cpu", "openvino")]
    assert limits == [2048, 3072]


def test_pod_smoke_plays_the_overlays_deployment_with_the_settings_added() -> None:
    """bench.pod_smoke --overlay openvino --setting ...: the openvino overlay's Deployment (its 3 GiB
    limit) on the local image, its ConfigMap with the setting added."""
    spec = pod_smoke.pod_spec(
        "localhost/catdog-serve:dev-openvino", "openvino", {"CATDOG_OPENVINO_PRECISION": "bf16"}
    )
    docs = {doc["kind"]: doc for doc in spec}
    assert set(docs) == {"ConfigMap", "Deployment"}
    assert docs["ConfigMap"]["data"]["CATDOG_PROVIDERS"] == "openvino"
    assert docs["ConfigMap"]["data"]["CATDOG_OPENVINO_PRECISION"] == "bf16"
    assert docs["Deployment"]["spec"]["replicas"] == 1
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert (container["image"], container["imagePullPolicy"]) == (
        "localhost/catdog-serve:dev-openvino",
        "Never",
    )
    assert container["resources"]["limits"]["memory"] == "3Gi"
