"""Checks of everything an operator deploys: Kubernetes manifests, KEDA, NATS, Docker, Prometheus, Grafana.

No Docker engine and no cluster run here, so each file is checked as far as a file can be:
kustomize renders both overlays offline and every object validates against the Kubernetes schemas of
pinned versions (kubernetes-validate, strict) or, for KEDA, against KEDA's own CRD schemas; the
ScaledObject names the stream and consumer the worker creates; the NATS configurations pass
`nats-server -t` and the user layout is exercised on a running server; the Dockerfile passes
hadolint; docker-compose.yml validates against the Compose specification; the dashboard and the
alert rules use only metrics the worker exports. Each checker is also shown a broken input, so a
check that cannot fail would be noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import functools
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from jetinfer.settings import StreamSettings
from jetinfer.streams import INFER_STREAM, consumer_name, infer_subjects
from jetinfer.worker.autoconfig import GPU_LANES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
KEDA_SCHEMAS = SHARED / "schemas" / "keda"
BIN = Path(sys.executable).parent

# The Kubernetes versions the manifests must be valid for: the oldest we support and the newest
# kubernetes-validate ships. Pinned, so a new kubernetes-validate release cannot change the verdict.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
OVERLAYS = ("gpu", "cpu")
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")

# The metrics a worker exports (DESIGN.md "Metrics and health"), as Prometheus exposes them.
COUNTERS = {
    "jetinfer_requests_total",
    "jetinfer_reloads_total",
    "jetinfer_replies_refused_total",
    "jetinfer_stage_seconds_total",
    "jetinfer_gc_seconds_total",
    "jetinfer_front_restarts_total",
}
HISTOGRAMS = {
    "jetinfer_batch_size",
    "jetinfer_queue_wait_seconds",
    "jetinfer_inference_seconds",
    "jetinfer_request_duration_seconds",
}
GAUGES = {
    "jetinfer_inflight_requests",
    "jetinfer_consumer_lag",
    "jetinfer_oldest_request_age_seconds",
    "jetinfer_gpu_utilization_ratio",
    "jetinfer_gpu_memory_used_bytes",
}
JETINFER_SERIES = (
    COUNTERS | GAUGES | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
# Alert rules may also use Prometheus' own `up` and KEDA's operator metrics.
ALERT_EXTRA_SERIES = {"up", "keda_scaler_active"}

PROMQL_WORDS = {
    # aggregations and functions used in dashboards and rules
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev",
    "rate", "irate", "increase", "delta", "deriv", "histogram_quantile", "absent", "clamp_min",
    "clamp_max", "abs", "vector", "scalar", "time", "label_replace", "avg_over_time",
    "max_over_time", "min_over_time",
    # modifiers and operators
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# helpers


def tool(name: str) -> Path:
    """A binary installed next to this Python (the dev extra), or skip saying which is missing."""
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable} (pip install -e '.[dev]')")
    return path


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output."""
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


@functools.cache
def kustomize(relative: str) -> tuple[dict[str, Any], ...]:
    """Render a kustomization (a folder under the repository root) with `kubectl kustomize`."""
    result = run(tool("kubectl"), "kustomize", ROOT / relative)
    assert result.returncode == 0, f"kubectl kustomize {relative} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """The objects of deploy/overlays/<overlay>."""
    return kustomize(f"deploy/overlays/{overlay}")


def one(docs: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of `kind` among `docs`."""
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    """A container of a Deployment by name."""
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert name in containers, f"no container {name!r} in {sorted(containers)}"
    return containers[name]


def env_of(c: dict[str, Any]) -> dict[str, str]:
    """A container's literal environment values."""
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def worker_setting(c: dict[str, Any], flag: str, default: Any) -> str:
    """A worker setting from the container: `--flag VALUE`, `--flag=VALUE`, JETINFER_<FLAG>, or default."""
    args = [*c.get("command", []), *c.get("args", [])]
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return str(args[i + 1])
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    variable = "JETINFER_" + flag.removeprefix("--").replace("-", "_").upper()
    return env_of(c).get(variable, str(default))


def worker_default(name: str) -> Any:
    """The default of a WorkerSettings field (what the worker uses when the manifest says nothing)."""
    from jetinfer.worker.settings import WorkerSettings

    field = {f.name: f for f in dataclasses.fields(WorkerSettings)}[name]
    return field.default


def promql_series(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, label matchers, ranges, grouping removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^{}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    text = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "", text)
    text = re.sub(r"(?<![A-Za-z0-9_:])\d+(\.\d+)?([eE][+-]?\d+)?", "", text)
    return {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text) if w not in PROMQL_WORDS}


def unknown_series(expr: str, allowed: set[str]) -> set[str]:
    """Metric names in `expr` that are neither in `allowed` nor DCGM's."""
    return {name for name in promql_series(expr) if name not in allowed and not name.startswith("DCGM_")}


def nats_size(value: str) -> int:
    """A NATS configuration size (`8MB`, `1KB`, `1048576`): MB/MiB are powers of 1024, M of 1000."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
    assert match, f"not a NATS size: {value!r}"
    units = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3}
    units |= {
        prefix + suffix: 1024**power
        for prefix, power in (("k", 1), ("m", 2), ("g", 3))
        for suffix in ("b", "i", "ib")
    }
    return int(match.group(1)) * units[match.group(2).lower()]


def load_yaml(path: Path) -> Any:
    """One YAML document."""
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------------------------------
# Kubernetes: rendering and schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_piece(overlay: str) -> None:
    docs = rendered(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "Namespace", "ServiceAccount", "PersistentVolumeClaim", "Deployment", "Service", "ScaledObject",
            "PodMonitor", "PrometheusRule", "PodDisruptionBudget", "NetworkPolicy",
        ]
    )  # fmt: skip
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "jetinfer", doc["metadata"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "jetinfer"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_are_valid_kubernetes(overlay: str, version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for doc in rendered(overlay):
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue  # CRDs: KEDA's are checked against KEDA's schemas below
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 7


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_examples_and_dashboard_configmap_are_valid_kubernetes(version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = [
        d
        for path in sorted((DEPLOY / "examples").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
    ]
    docs += list(kustomize("deploy/grafana")) + list(kustomize("deploy/examples/second-model"))
    kinds = set()
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.add(doc["kind"])
    assert {"Secret", "Job", "ConfigMap", "Deployment"} <= kinds


def test_kubernetes_validation_catches_a_misspelled_field() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = copy.deepcopy(one(rendered("gpu"), "Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriod"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


# --------------------------------------------------------------------------------------------------
# KEDA: CRD schemas and what the triggers point at


def keda_schema(kind: str) -> dict[str, Any]:
    """KEDA's openAPIV3Schema for `kind`, made strict like the API server's field validation."""
    if not KEDA_SCHEMAS.is_dir():
        pytest.skip(
            f"KEDA CRD schemas not found at {KEDA_SCHEMAS} (../shared is absent outside the workplace)"
        )
    files = {
        "ScaledObject": "keda.sh_scaledobjects.yaml",
        "TriggerAuthentication": "keda.sh_triggerauthentications.yaml",
    }
    crd = load_yaml(KEDA_SCHEMAS / files[kind])
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]

    def strict(node: Any) -> Any:
        # Structural schemas prune unknown fields, and kubectl's default strict field validation
        # refuses them: emulate that, so a misspelled key fails here too.
        if isinstance(node, list):
            return [strict(item) for item in node]
        if not isinstance(node, dict):
            return node
        node = {key: strict(value) for key, value in node.items()}
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node

    schema: dict[str, Any] = strict(version["schema"]["openAPIV3Schema"])
    return schema


def keda_errors(doc: dict[str, Any]) -> list[str]:
    """Schema violations of a KEDA object, as readable lines."""
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(keda_schema(doc["kind"]))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    if doc["kind"] == "ScaledObject":  # the CRD's x-kubernetes-validations rule, which jsonschema ignores
        spec = doc["spec"]
        if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
            errors.append("minReplicaCount must be less than or equal to maxReplicaCount")
    return errors


@pytest.fixture(scope="module")
def lag_component_render(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], ...]:
    """The gpu overlay with the worker-lag-trigger component, rendered from a scratch kustomization."""
    folder = tmp_path_factory.mktemp("lag-variant")
    (folder / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(DEPLOY / "overlays" / "gpu", folder)],
                "components": [os.path.relpath(DEPLOY / "components" / "worker-lag-trigger", folder)],
            }
        )
    )
    result = run(tool("kubectl"), "kustomize", folder)
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def test_keda_objects_match_kedas_crd_schemas(lag_component_render: tuple[dict[str, Any], ...]) -> None:
    docs = [one(kustomize(k), "ScaledObject") for k in WORKER_KUSTOMIZATIONS]
    docs.append(one(lag_component_render, "ScaledObject"))
    docs += [
        d
        for d in yaml.safe_load_all((DEPLOY / "examples" / "triggerauthentication.yaml").read_text())
        if d["kind"] == "TriggerAuthentication"
    ]
    assert [d["kind"] for d in docs].count("TriggerAuthentication") == 2
    for doc in docs:
        assert keda_errors(doc) == [], doc["metadata"]["name"]


def test_keda_schema_check_catches_mistakes() -> None:
    scaled = copy.deepcopy(one(rendered("gpu"), "ScaledObject"))
    scaled["spec"]["cooldownPeriods"] = 300
    scaled["spec"]["minReplicaCount"] = 50
    del scaled["spec"]["triggers"][0]["type"]
    errors = "\n".join(keda_errors(scaled))
    assert "cooldownPeriods" in errors
    assert "minReplicaCount must be less than or equal" in errors
    assert "'type' is a required property" in errors


def served_model(deployment: dict[str, Any]) -> str:
    """The one model a worker Deployment serves (--model or JETINFER_MODEL)."""
    worker = container(deployment, "worker")
    model = worker_setting(worker, "--model", "")
    assert model, "each worker Deployment names its model explicitly"
    assert "," not in model, "each worker Deployment serves exactly one model"
    return model


WORKER_KUSTOMIZATIONS = ("deploy/overlays/gpu", "deploy/overlays/cpu", "deploy/examples/second-model")


@pytest.mark.parametrize("kustomization", WORKER_KUSTOMIZATIONS)
def test_scaledobject_reads_the_consumer_the_worker_creates(kustomization: str) -> None:
    docs = kustomize(kustomization)
    deployment, scaled = one(docs, "Deployment"), one(docs, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    triggers = {t["type"]: t for t in spec["triggers"]}
    assert set(triggers) == {"nats-jetstream", "prometheus"}

    nats = triggers["nats-jetstream"]["metadata"]
    model = served_model(deployment)
    assert nats["stream"] == INFER_STREAM
    assert nats["consumer"] == consumer_name(model)
    assert nats["account"] == "$G"
    assert nats["natsServerMonitoringEndpoint"].endswith(":8222")
    # lagThreshold is a per-worker backlog: below one busy worker's own in-flight work
    # (max_batch x pipeline_depth) a single, keeping-up worker would already ask for a second one.
    worker = container(deployment, "worker")
    # Left to the worker, the pipeline depth is at most one per lane: 2 process lanes and 2 GPU lanes.
    on_gpu = "nvidia.com/gpu" in worker["resources"].get("limits", {})
    chosen_at_most = GPU_LANES + 2 if on_gpu else 1
    in_flight = int(worker_setting(worker, "--max-batch", 0)) * int(
        worker_setting(worker, "--pipeline-depth", chosen_at_most)
    )
    assert in_flight > 0, "set JETINFER_MAX_BATCH explicitly: lagThreshold is derived from it"
    assert int(nats["lagThreshold"]) >= in_flight
    assert int(nats["activationLagThreshold"]) >= 0

    gpu = triggers["prometheus"]["metadata"]
    assert "DCGM_FI_PROF_GR_ENGINE_ACTIVE" in gpu["query"]
    assert 0 < float(gpu["threshold"]) <= 1, "DCGM_FI_PROF_GR_ENGINE_ACTIVE is a ratio"
    assert unknown_series(gpu["query"], JETINFER_SERIES) == set()

    assert spec["minReplicaCount"] == 0, "scale to zero: INFER keeps the registration while no worker runs"
    # desired = ceil(metric / threshold) per trigger needs AverageValue (also what KEDA's fallback requires).
    assert {t.get("metricType") for t in spec["triggers"]} == {"AverageValue"}
    assert spec["cooldownPeriod"] > 0
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > 0
    assert scaled["metadata"]["labels"]["jetinfer.io/model"] == model


def test_worker_lag_component_replaces_the_nats_trigger(
    lag_component_render: tuple[dict[str, Any], ...],
) -> None:
    deployment, scaled = one(lag_component_render, "Deployment"), one(lag_component_render, "ScaledObject")
    triggers = scaled["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["prometheus", "prometheus"]
    lag = triggers[0]["metadata"]
    assert promql_series(lag["query"]) == {"jetinfer_consumer_lag"}
    assert f'model="{served_model(deployment)}"' in lag["query"]
    assert lag["query"].lstrip().startswith("max("), "each worker reports the same consumer: max, not sum"
    # Nobody exports the lag while no worker runs: this variant cannot scale from zero.
    assert scaled["spec"]["minReplicaCount"] >= 1


def test_second_model_gets_its_own_workers_and_scaler() -> None:
    base = rendered("gpu")
    second = kustomize("deploy/examples/second-model")
    assert sorted(d["kind"] for d in second) == ["Deployment", "ScaledObject"]
    first_deployment, deployment = one(base, "Deployment"), one(second, "Deployment")
    scaled = one(second, "ScaledObject")
    assert served_model(deployment) == "resnet50"
    assert scaled["spec"]["triggers"][0]["metadata"]["consumer"] == consumer_name("resnet50")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"] != "jetinfer-worker"
    assert scaled["metadata"]["name"] != one(base, "ScaledObject")["metadata"]["name"]
    # Selectors must not overlap, or the two Deployments would fight over each other's pods.
    first_selector = first_deployment["spec"]["selector"]["matchLabels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector["jetinfer.io/model"] == "resnet50" != first_selector["jetinfer.io/model"]
    # Shared: the model volume and the workers' ServiceAccount and Secrets from deploy/overlays/gpu.
    pod = deployment["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {one(base, "PersistentVolumeClaim")["metadata"]["name"]}
    assert pod["serviceAccountName"] == one(base, "ServiceAccount")["metadata"]["name"]
    assert container(deployment, "worker")["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The shared PDB, NetworkPolicy, Service and PodMonitor select the second model's pods too.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        spec = one(base, kind)["spec"]
        assert (spec.get("selector") or spec["podSelector"])["matchLabels"].items() <= labels.items(), kind


def test_gpu_trigger_counts_only_its_own_models_pods() -> None:
    # Deployment pods are named <deployment>-<ReplicaSet hash>-<5 characters>.
    def pods(deployment: dict[str, Any]) -> list[str]:
        name = deployment["metadata"]["name"]
        return [f"{name}-7d4b9c8f6d-x2k9p", f"{name}-5f6b7cd9b-qwz4m"]

    def patterns(scaled: dict[str, Any]) -> list[str]:
        (gpu,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
        found = re.findall(r'pod=~"([^"]+)"', gpu["metadata"]["query"])
        assert len(found) == 2  # `pod` and `exported_pod`
        return found

    first, second = rendered("gpu"), kustomize("deploy/examples/second-model")
    for own, other in ((first, second), (second, first)):
        for pattern in patterns(one(own, "ScaledObject")):
            assert all(re.fullmatch(pattern, pod) for pod in pods(one(own, "Deployment"))), pattern
            assert not any(re.fullmatch(pattern, pod) for pod in pods(one(other, "Deployment"))), pattern


# --------------------------------------------------------------------------------------------------
# The worker pod


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_outlasts_the_drain(overlay: str) -> None:
    deployment = one(rendered(overlay), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    worker = container(deployment, "worker")
    drain = float(worker_setting(worker, "--grace-period-s", worker_default("grace_period_s")))
    pre_stop = worker["lifecycle"]["preStop"]
    pause = (
        float(pre_stop["exec"]["command"][-1]) if "exec" in pre_stop else float(pre_stop["sleep"]["seconds"])
    )
    # Kubernetes counts the preStop hook inside the grace period, then sends SIGTERM.
    assert pod["terminationGracePeriodSeconds"] > pause + drain


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_metrics_port(overlay: str) -> None:
    docs = rendered(overlay)
    deployment = one(docs, "Deployment")
    worker = container(deployment, "worker")
    port = int(worker_setting(worker, "--metrics-port", worker_default("metrics_port")))
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports == {"metrics": port}
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        get = worker[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in ("metrics", port)
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] in ("metrics", port)
    assert one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    netpol_ports = [
        p["port"] for rule in one(docs, "NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]
    ]
    assert netpol_ports == ["metrics"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged(overlay: str) -> None:
    deployment = one(rendered(overlay), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert {c["name"] for c in pod["containers"]} == {"worker", "sidecar"}
    for c in pod["containers"]:
        context = c["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, c["name"]
        assert context["allowPrivilegeEscalation"] is False, c["name"]
        assert context["capabilities"]["drop"] == ["ALL"], c["name"]
        assert context.get("runAsUser", 1) != 0, c["name"]
        assert c["resources"]["requests"]["memory"], c["name"]
        assert c["resources"]["limits"]["memory"], c["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_volume_is_read_only_for_the_worker_and_writable_for_the_sidecar(overlay: str) -> None:
    docs = rendered(overlay)
    deployment = one(docs, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim

    def mounts(name: str) -> list[dict[str, Any]]:
        return [m for m in container(deployment, name)["volumeMounts"] if m["name"] == "models"]

    assert mounts("worker")
    assert all(m.get("readOnly") is True for m in mounts("worker"))
    assert any(not m.get("readOnly", False) for m in mounts("sidecar"))
    # The repository the worker reads is the one the sidecar writes, under the shared mount.
    repository = worker_setting(container(deployment, "worker"), "--repository", worker_default("repository"))
    sidecar_args = container(deployment, "sidecar")["args"]
    assert sidecar_args[0] == "sidecar"
    assert sidecar_args[sidecar_args.index("--repository") + 1] == repository
    source = sidecar_args[sidecar_args.index("--source") + 1]
    assert source != repository
    for path in (repository, source):
        assert any(path.startswith(m["mountPath"]) for m in mounts("sidecar")), path


def test_gpu_overlay_schedules_one_gpu_per_worker() -> None:
    docs = rendered("gpu")
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    resources = container(deployment, "worker")["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "nvidia.com/gpu" not in container(deployment, "sidecar")["resources"].get("limits", {})
    image = container(deployment, "worker")["image"]
    assert image.endswith("-gpu")
    assert image == container(deployment, "sidecar")["image"]
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert env_of(container(deployment, "worker"))["JETINFER_STREAM_REPLICAS"] == "3"


def test_cpu_overlay_asks_for_no_gpu() -> None:
    docs = rendered("cpu")
    text = json.dumps(docs)
    assert "nvidia.com/gpu" not in text
    deployment = one(docs, "Deployment")
    assert "nodeSelector" not in deployment["spec"]["template"]["spec"]
    assert container(deployment, "worker")["image"] == "jetinfer:cpu"
    assert env_of(container(deployment, "worker"))["JETINFER_STREAM_REPLICAS"] == "1"


def test_disruption_budget_and_network_policy_select_the_workers() -> None:
    docs = rendered("gpu")
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind, selector in (
        ("PodDisruptionBudget", one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]),
        ("NetworkPolicy", one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]),
        ("Service", one(docs, "Service")["spec"]["selector"]),
        ("PodMonitor", one(docs, "PodMonitor")["spec"]["selector"]["matchLabels"]),
    ):
        assert selector.items() <= labels.items(), kind
    assert "minAvailable" not in one(docs, "PodDisruptionBudget")["spec"], (
        "minAvailable blocks drains at 1 replica"
    )


# --------------------------------------------------------------------------------------------------
# Prometheus rules and config, Grafana


def test_metric_list_matches_what_the_worker_exports() -> None:
    metrics = pytest.importorskip("jetinfer.worker.metrics")
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    metrics.WorkerMetrics(registry)
    exported: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            exported.add(family.name + "_total")
        elif family.type == "histogram":
            exported |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            exported.add(family.name)
    assert exported == JETINFER_SERIES


def test_promql_check_flags_unknown_metrics() -> None:
    expr = 'sum by (model, status) (rate(jetinfer_request_total{status!="ok", model=~"$model"}[5m])) > 0.5'
    assert unknown_series(expr, JETINFER_SERIES) == {"jetinfer_request_total"}
    assert promql_series(
        'histogram_quantile(0.99, sum by (le) (rate(x_bucket{a="b"}[$__rate_interval])))'
    ) == {"x_bucket"}


def alert_rules() -> list[dict[str, Any]]:
    """The rules of deploy/prometheus/alerts.yaml."""
    groups = load_yaml(DEPLOY / "prometheus" / "alerts.yaml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_use_known_metrics_and_cover_the_failures() -> None:
    rules = alert_rules()
    for rule in rules:
        assert rule["alert"].startswith("Jetinfer")
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
        assert unknown_series(rule["expr"], JETINFER_SERIES | ALERT_EXTRA_SERIES) == set(), rule["alert"]
    used = {rule["alert"]: promql_series(rule["expr"]) for rule in rules}
    assert any(
        "jetinfer_consumer_lag" in s and "deriv" in r["expr"]
        for r, s in zip(rules, used.values(), strict=True)
    )
    assert any("jetinfer_oldest_request_age_seconds" in s for s in used.values())
    assert any(
        "jetinfer_requests_total" in s and "status" in r["expr"]
        for r, s in zip(rules, used.values(), strict=True)
    )
    assert any(s == {"up"} for s in used.values()), "a worker-down alert on up == 0"


def test_prometheusrule_holds_the_same_rules_as_alerts_yaml() -> None:
    sys.path.insert(0, str(DEPLOY / "prometheus"))
    try:
        import make_prometheusrule
    finally:
        sys.path.remove(str(DEPLOY / "prometheus"))
    rule = yaml.safe_load((DEPLOY / "base" / "prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == load_yaml(DEPLOY / "prometheus" / "alerts.yaml")["groups"]
    assert (DEPLOY / "base" / "prometheusrule.yaml").read_text() == make_prometheusrule.render(), (
        "regenerate: .venv/bin/python deploy/prometheus/make_prometheusrule.py"
    )


def test_prometheus_config_scrapes_the_compose_workers_and_loads_the_rules() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    compose = load_yaml(ROOT / "docker-compose.yml")["services"]
    mounts = dict(v.split(":")[:2] for v in compose["prometheus"]["volumes"])
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert config["rule_files"] == [mounts["./deploy/prometheus/alerts.yaml"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "jetinfer-worker"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["worker"]
    assert str(sd["port"]) == compose["worker"]["environment"]["JETINFER_METRICS_PORT"]
    assert re.fullmatch(r".*jetinfer-worker.*", job["job_name"]), (
        "the alert rules select job=~'.*jetinfer-worker.*'"
    )


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard."""
    result: dict[str, Any] = json.loads((DEPLOY / "grafana" / "jetinfer-dashboard.json").read_text())
    return result


def test_dashboard_queries_use_only_exported_metrics() -> None:
    board = dashboard()
    assert board["uid"] == "jetinfer"
    assert board["title"]
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 16
    for expr in exprs:
        assert unknown_series(expr, JETINFER_SERIES) == set(), expr
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"])
            assert match, variable["query"]
            assert match.group(1) in JETINFER_SERIES


def test_dashboard_has_the_operator_panels() -> None:
    board = dashboard()
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for quantile in ("0.5", "0.99"):
        assert re.search(
            rf"histogram_quantile\({quantile},[^;]*jetinfer_request_duration_seconds_bucket", exprs
        )
    for needle in (
        "rate(jetinfer_requests_total",
        "jetinfer_batch_size",
        "jetinfer_consumer_lag",
        "jetinfer_oldest_request_age_seconds",
        "jetinfer_gpu_utilization_ratio",
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "jetinfer_reloads_total",
    ):
        assert needle in exprs, needle
    assert re.search(r'by \([^)]*status[^)]*\) \(rate\(jetinfer_requests_total\{[^}]*status!="ok"', exprs), (
        "errors by code"
    )
    # Panels must not overlap on Grafana's 24-column grid.
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, p["title"]
        cells |= area
    # Every panel and query reads the data source chosen in the ${datasource} variable.
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}"


def test_grafana_provisioning_matches_compose() -> None:
    grafana = load_yaml(ROOT / "docker-compose.yml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = load_yaml(provisioning / "dashboards" / "jetinfer.yaml")["providers"]
    dashboard_target = mounts["./deploy/grafana/jetinfer-dashboard.json"]
    assert Path(dashboard_target).parent == Path(provider["options"]["path"])
    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    configmap = one(kustomize("deploy/grafana"), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["jetinfer-dashboard.json"]) == dashboard()


# --------------------------------------------------------------------------------------------------
# Docker


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\") if current else stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dockerfile_stages() -> dict[str, dict[str, Any]]:
    """Stages by name: base, instructions."""
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for instruction, args in dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if instruction == "FROM":
            base, _, name = args.partition(" AS ")
            current = {"base": base.strip(), "instructions": []}
            stages[name.strip()] = current
        elif current is not None:
            current["instructions"].append((instruction, args))
    return stages


def test_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), "--no-color", ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN cd /tmp\n")
    result = run(tool("hadolint"), "--no-color", bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest


def test_dockerfile_targets() -> None:
    stages = dockerfile_stages()
    assert {"gpu", "cpu", "tools", "wheel"} <= set(stages)
    args = dict(
        a.split("=", 1)
        for i, a in dockerfile_instructions((ROOT / "Dockerfile").read_text())
        if i == "ARG" and "=" in a
    )
    assert re.fullmatch(r"nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3", args["TENSORRT_IMAGE"]), (
        "pin the TensorRT tag"
    )
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", args["PYTHON_IMAGE"]), "pin python:3.11.x-slim"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert args["JETINFER_VERSION"] == version, "the Dockerfile installs the version pyproject.toml builds"

    def final(name: str) -> list[tuple[str, str]]:
        # A stage's instructions including those of the stages it is built FROM.
        stage = stages[name]
        inherited = final(stage["base"]) if stage["base"] in stages else []
        return inherited + stage["instructions"]

    assert stages["gpu"]["base"] == "${TENSORRT_IMAGE}"
    for target in ("gpu", "cpu", "tools"):
        instructions = final(target)
        last = {i: a for i, a in instructions}
        assert last["USER"].split(":")[0] not in ("0", "root"), target
        assert json.loads(last["ENTRYPOINT"]) == ["jetinfer"], target
        assert json.loads(last["CMD"]) == ["serve"], target
        assert "jetinfer-healthcheck" in last["HEALTHCHECK"], target
        runs = " ".join(a for i, a in instructions if i == "RUN")
        assert "apt-get" not in runs or "rm -rf /var/lib/apt/lists" in runs, target
    # The application layer of the GPU image holds only the Python package: no CUDA or TensorRT installs.
    gpu_runs = " ".join(a for i, a in stages["gpu"]["instructions"] if i == "RUN")
    assert "tensorrt" not in gpu_runs.lower()
    assert "cuda-toolkit" not in gpu_runs


def test_dockerfile_stages_declare_the_variables_they_use() -> None:
    # A global ARG (before the first FROM) is invisible inside a stage until re-declared there.
    stages = dockerfile_stages()

    def declared(name: str) -> set[str]:
        stage = stages[name]
        names = declared(stage["base"]) if stage["base"] in stages else {"PATH", "HOME"}
        for instruction, args in stage["instructions"]:
            if instruction == "ARG":
                names.add(args.split("=", 1)[0].strip())
            elif instruction == "ENV":
                names |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args))
        return names

    for name, stage in stages.items():
        for instruction, args in stage["instructions"]:
            if instruction == "RUN":
                used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", args))
                assert used <= declared(name), f"stage {name}: {sorted(used - declared(name))} not declared"


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context (last matching pattern wins, `!` re-includes)."""

    def regex(pattern: str) -> str:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").strip().strip("/")
        if any(re.fullmatch(regex(body), c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources: list[str] = []
    for instruction, args in dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if instruction == "COPY" and "--from=" not in args:
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources += words[:-1]
    assert "pyproject.toml" in sources
    assert "deploy/docker/healthcheck.py" in sources
    for source in sources:
        path = ROOT / source
        if path.is_dir():
            samples = [str(p.relative_to(ROOT)) for p in sorted(path.rglob("*.py"))[:5]]
            assert samples, source
        else:
            samples = [source]
        for sample in samples:
            assert not dockerignore_excludes(sample, patterns), (
                f"{sample} is copied but .dockerignore drops it"
            )
    for dropped in (
        ".venv/bin/python",
        "tests/test_deploy.py",
        "jetinfer/__pycache__/x.pyc",
        "deploy/base/pvc.yaml",
    ):
        assert dockerignore_excludes(dropped, patterns), dropped


def test_dockerfile_copies_files_that_exist() -> None:
    for instruction, args in dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if instruction == "COPY" and "--from=" not in args:
            for source in [w for w in shlex.split(args) if not w.startswith("--")][:-1]:
                if source == "README.md" and not (ROOT / source).exists():
                    pytest.fail("README.md is missing: pyproject.toml's readme and the Docker build need it")
                assert (ROOT / source).exists(), source


def test_healthcheck_script_probes_the_metrics_port() -> None:
    script = (DEPLOY / "docker" / "healthcheck.py").read_text()
    assert "/healthz" in script
    assert "JETINFER_METRICS_PORT" in script
    assert f'"{worker_default("metrics_port")}"' in script


# --------------------------------------------------------------------------------------------------
# docker compose


def test_compose_file_matches_the_compose_specification() -> None:
    result = run(
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", ROOT / "docker-compose.yml"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_catches_a_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  worker:\n    imagee: jetinfer:cpu\n")
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", bad)
    assert result.returncode != 0
    assert "imagee" in result.stdout + result.stderr


def test_compose_wiring() -> None:
    compose = load_yaml(ROOT / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"nats", "export-models", "worker", "producer", "prometheus", "grafana"}
    assert services["nats"]["image"].startswith("nats:")
    assert "latest" not in services["nats"]["image"]
    worker, export = services["worker"], services["export-models"]
    assert worker["build"]["target"] == "cpu"
    assert export["build"]["target"] == "tools"
    assert export["command"][0] == "export-demo"
    assert worker["depends_on"]["export-models"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["nats"]["condition"] == "service_healthy"
    export_volume = export["volumes"][0].split(":")
    worker_volume = worker["volumes"][0].split(":")
    assert export_volume[0] == worker_volume[0] in compose["volumes"]
    assert worker_volume[2] == "ro"
    repository = export["command"][export["command"].index("--repository") + 1]
    assert worker["environment"]["JETINFER_REPOSITORY"] == repository == worker_volume[1]
    assert worker["environment"]["JETINFER_NATS_URL"] == "nats://nats:4222"
    drain = float(worker["environment"]["JETINFER_GRACE_PERIOD_S"])
    assert float(worker["stop_grace_period"].removesuffix("s")) > drain
    assert services["producer"]["command"][0] in ("bench", "infer")
    for service in services.values():
        image = service.get("image", "")
        assert not image.endswith(":latest"), image
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source


# --------------------------------------------------------------------------------------------------
# NATS


NATS_USERS = ("OPS", "WORKER", "SIDECAR", "PRODUCER_A", "PRODUCER_B")


def nats_env() -> dict[str, str]:
    """The environment accounts.conf reads its passwords from."""
    return {**os.environ, **{f"JETINFER_{user}_PASSWORD": f"test-{user.lower()}" for user in NATS_USERS}}


def test_nats_configs_pass_the_server_config_test() -> None:
    server = tool("nats-server")
    for name in ("accounts.conf", "compose.conf"):
        result = run(server, "-t", "-c", DEPLOY / "nats" / name, env=nats_env())
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"


def test_nats_config_test_catches_mistakes(tmp_path: Path) -> None:
    server = tool("nats-server")
    without_password = {k: v for k, v in nats_env().items() if k != "JETINFER_WORKER_PASSWORD"}
    result = run(server, "-t", "-c", DEPLOY / "nats" / "accounts.conf", env=without_password)
    assert result.returncode != 0
    assert "JETINFER_WORKER_PASSWORD" in result.stdout + result.stderr
    broken = tmp_path / "accounts.conf"
    broken.write_text(
        (DEPLOY / "nats" / "accounts.conf").read_text().replace("publish = {", "publish = {{", 1)
    )
    assert run(server, "-t", "-c", broken, env=nats_env()).returncode != 0


def test_nats_values_run_a_replicated_jetstream_cluster() -> None:
    values = load_yaml(DEPLOY / "nats" / "values.yaml")
    config = values["config"]
    assert config["cluster"]["enabled"] is True
    assert config["cluster"]["replicas"] == 3
    assert config["jetstream"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["pvc"]["enabled"]
    assert config["monitor"]["enabled"] is True
    endpoint = one(rendered("gpu"), "ScaledObject")["spec"]["triggers"][0]["metadata"][
        "natsServerMonitoringEndpoint"
    ]
    assert endpoint.endswith(f":{config['monitor']['port']}")
    # Requests as large as the INFER stream accepts must fit in one NATS message.
    largest = StreamSettings().max_msg_size_bytes
    assert nats_size(config["merge"]["max_payload"].strip("<> ")) >= largest
    compose_conf = (DEPLOY / "nats" / "compose.conf").read_text()
    (compose_payload,) = re.findall(r"^max_payload:\s*(\S+)", compose_conf, re.MULTILINE)
    assert nats_size(compose_payload) >= largest
    assert "--stream-replicas 3" in (DEPLOY / "nats" / "values.yaml").read_text()
    auth = load_yaml(DEPLOY / "nats" / "values-auth.yaml")
    assert auth["config"]["merge"]["$include"].endswith("accounts.conf")


def manifest_inbox(container_name: str) -> str:
    """The inbox prefix the worker pod gives one of its containers (JETINFER_NATS_INBOX_PREFIX)."""
    env = env_of(container(one(rendered("gpu"), "Deployment"), container_name))
    return env["JETINFER_NATS_INBOX_PREFIX"]


WORKER_INBOX = "_INBOX.worker"
SIDECAR_INBOX = "_INBOX.sidecar"


def test_pods_use_the_inboxes_accounts_conf_permits() -> None:
    # The live test below connects with these prefixes; the pods must use the same ones.
    assert manifest_inbox("worker") == WORKER_INBOX
    assert manifest_inbox("sidecar") == SIDECAR_INBOX
    accounts = (DEPLOY / "nats" / "accounts.conf").read_text()
    for prefix in (WORKER_INBOX, SIDECAR_INBOX):
        assert f'"{prefix}.>"' in accounts


@pytest.fixture
def accounts_server(tmp_path: Path) -> Iterator[str]:
    """A nats-server running deploy/nats/accounts.conf with JetStream, on a free loopback port."""
    server = tool("nats-server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [str(server), "-c", str(DEPLOY / "nats" / "accounts.conf"), "-js", "-sd", str(tmp_path / "js"),
         "-a", "127.0.0.1", "-p", str(port)],
        env=nats_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else "exited"
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


async def test_nats_users_get_only_their_roles_subjects(accounts_server: str) -> None:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

    violations: dict[str, list[str]] = {}
    clients = []

    async def connect(user: str, inbox: str | None = None) -> Any:
        violations[user] = []

        async def on_error(exc: Exception) -> None:
            violations[user].append(str(exc).lower())

        options: dict[str, Any] = {"user": user, "password": f"test-{user}", "error_cb": on_error}
        if inbox:
            options["inbox_prefix"] = inbox
        client = await nats.connect(accounts_server, allow_reconnect=False, **options)
        clients.append(client)
        return client

    try:
        # The worker creates the stream and its consumer, as `jetinfer serve` does at start.
        worker = await connect("worker", WORKER_INBOX)
        wjs = worker.jetstream()
        await wjs.add_stream(
            StreamConfig(
                name=INFER_STREAM, subjects=infer_subjects("demo"), retention=RetentionPolicy.WORK_QUEUE
            )
        )
        await wjs.add_stream(StreamConfig(name="RESULTS", subjects=["results.>"]))
        await wjs.add_consumer(
            INFER_STREAM,
            ConsumerConfig(
                durable_name=consumer_name("demo"),
                filter_subjects=infer_subjects("demo"),
                ack_policy=AckPolicy.EXPLICIT,
            ),
        )
        reloads: list[str] = []

        async def on_reload(msg: Any) -> None:
            reloads.append(msg.subject)
            await msg.respond(b'{"status": "loaded"}')

        await worker.subscribe("jetinfer.control.reload.>", cb=on_reload)

        # A producer publishes a request as its tenant (JetStream acks it into its own inbox) ...
        producer = await connect("producer_a", "_INBOX.producer_a")
        pjs = producer.jetstream()
        ack = await pjs.publish(
            "infer.demo.producer_a", b"request", headers={"Jetinfer-Reply-To": "_INBOX.producer_a.r1"}
        )
        assert ack.stream == INFER_STREAM
        replies: list[bytes] = []

        async def on_reply(msg: Any) -> None:
            replies.append(msg.data)

        await producer.subscribe("_INBOX.producer_a.r1", cb=on_reply)
        # ... but may neither read another client's inbox nor take requests from the worker consumer.
        await producer.subscribe("_INBOX.producer_b.>")
        with pytest.raises(nats.errors.TimeoutError):
            await producer.request(
                f"$JS.API.CONSUMER.MSG.NEXT.{INFER_STREAM}.worker-demo", b'{"batch":1}', timeout=0.5
            )

        # The worker pulls the request (still there), replies into the producer's inbox, acks.
        sub = await wjs.pull_subscribe_bind("worker-demo", stream=INFER_STREAM)
        (msg,) = await sub.fetch(1, timeout=2)
        assert msg.data == b"request"
        await worker.publish(msg.headers["Jetinfer-Reply-To"], b"reply")
        await worker.subscribe("_INBOX.producer_a.>")  # replying into an inbox does not mean reading it
        await msg.ack()
        await wjs.publish("results.producer_a.job1", b"durable reply")
        # The producer reads the consumer's ack floor: how its client tells a reply lost in a dead server.
        for _ in range(100):
            floor = (await pjs.consumer_info(INFER_STREAM, "worker-demo")).ack_floor
            if floor is not None and floor.stream_seq == ack.seq:
                break
            await asyncio.sleep(0.02)
        assert floor is not None
        assert floor.stream_seq == ack.seq, floor

        # The producer reads durable replies below its own prefix only.
        await pjs.add_consumer(
            "RESULTS", ConsumerConfig(name="job1", filter_subject="results.producer_a.job1")
        )
        with pytest.raises(nats.errors.TimeoutError):
            await pjs.add_consumer(
                "RESULTS", ConsumerConfig(name="steal", filter_subject="results.producer_b.job1"), timeout=0.5
            )

        # The sidecar announces reloads, and nothing else.
        sidecar = await connect("sidecar", SIDECAR_INBOX)
        answer = await sidecar.request("jetinfer.control.reload.demo", b"{}", timeout=2)
        assert answer.data == b'{"status": "loaded"}'
        await sidecar.publish("infer.demo", b"not a sidecar's business")
        for client in clients:
            await client.flush()
        # Replies and permission errors arrive asynchronously: wait (up to 5 s) until all are in.
        for _ in range(250):
            if (
                replies
                and violations["sidecar"]
                and violations["worker"]
                and len(violations["producer_a"]) >= 3
            ):
                break
            await asyncio.sleep(0.02)

        assert replies == [b"reply"]
        assert reloads == ["jetinfer.control.reload.demo"]
        assert violations["worker"] == [
            'nats: permissions violation for subscription to "_inbox.producer_a.>"'
        ]
        producer_violations = "\n".join(violations["producer_a"])
        assert 'subscription to "_inbox.producer_b.>"' in producer_violations
        assert 'publish to "$js.api.consumer.msg.next.infer.worker-demo"' in producer_violations
        assert (
            'publish to "$js.api.consumer.create.results.steal.results.producer_b.job1"'
            in producer_violations
        )
        assert violations["sidecar"] == ['nats: permissions violation for publish to "infer.demo"']
    finally:
        for client in clients:
            await client.close()


def test_the_gpu_overlay_runs_one_worker_per_gpu_with_no_tuning_flags() -> None:
    [worker] = [d for d in rendered("gpu") if d["kind"] == "Deployment" and "worker" in d["metadata"]["name"]]
    pod = worker["spec"]["template"]["spec"]
    [container] = [c for c in pod["containers"] if c["name"] == "worker"]
    tuning = ("DECODE", "GPU_DECODE", "GPU_NORMALISE", "LANES", "GIL", "PARALLEL", "PIPELINE_DEPTH", "ORT_")
    names = [e["name"] for e in container.get("env", [])]
    assert not [n for n in names if any(word in n for word in tuning)], names
    assert not [a for a in container.get("args", []) if a.startswith("--")], container.get("args")
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    # The worker sizes its decoding processes to its CPU quota: request and limit agree.
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    [shm] = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    [volume] = [v for v in pod["volumes"] if v["name"] == shm["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
