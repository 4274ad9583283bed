"""tools/k8s_check: it passes on the real manifests and fails on a manifest that
sets a variable no service reads or misses a required one."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tools import k8s_check
from tools.k8s_check import CheckError, Index, Obj, Rendering

REQUIRED = {
    "DATABASE_URL": "postgresql://db/billing",
    "NATS_URL": "nats://nats:4222",
    "USAGEBILLING_ADMIN_TOKEN": "token",
}


def workload(service: str, env: dict[str, str], *, migrate: bool = False, **container: Any) -> Obj:
    """A Deployment (or migration Job) running one service with `env`."""
    command = ["python", "-m", f"services.{service}", *(["migrate"] if migrate else [])]
    return {
        "apiVersion": "batch/v1" if migrate else "apps/v1",
        "kind": "Job" if migrate else "Deployment",
        "metadata": {"name": f"{service}-migrate" if migrate else service},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "app",
                            "command": command,
                            "env": [{"name": k, "value": v} for k, v in env.items()],
                            **container,
                        }
                    ]
                }
            }
        },
    }


def env_problems(*objects: Obj) -> list[str]:
    problems: list[str] = []
    for app in k8s_check.app_containers(Index(objects), problems):
        problems += k8s_check.check_environment(app)
    return problems


def test_a_complete_environment_passes() -> None:
    assert (
        env_problems(workload("meter", REQUIRED), workload("meter", REQUIRED, migrate=True)) == []
    )


def test_a_variable_the_service_does_not_read_fails() -> None:
    # USAGEBILLING_INVOICE_GRACE is billing's; a typo is unknown to everyone.
    env = {**REQUIRED, "USAGEBILLING_INVOICE_GRACE": "1h", "USAGEBILLING_LOGLEVEL": "debug"}
    where = "Deployment/ingest container app"
    assert env_problems(workload("ingest", env)) == [
        f"{where}: sets USAGEBILLING_INVOICE_GRACE, which ingest does not read",
        f"{where}: sets USAGEBILLING_LOGLEVEL, which ingest does not read",
    ]


def test_a_missing_required_setting_fails_in_the_migration_job_too() -> None:
    env = {k: v for k, v in REQUIRED.items() if k != "USAGEBILLING_ADMIN_TOKEN"}
    problems = env_problems(workload("billing", env), workload("billing", env, migrate=True))
    missing = "USAGEBILLING_ADMIN_TOKEN is required by billing but not set"
    assert problems == [
        f"Deployment/billing container app: {missing}",
        f"Job/billing-migrate container app: {missing}",
    ]


def test_an_empty_value_does_not_count_as_set() -> None:
    problems = env_problems(workload("ingest", {**REQUIRED, "NATS_URL": ""}))
    assert problems == [
        "Deployment/ingest container app: NATS_URL is required by ingest but not set"
    ]


def test_a_service_database_url_stands_in_for_database_url() -> None:
    env = {k: v for k, v in REQUIRED.items() if k != "DATABASE_URL"}
    env["USAGEBILLING_METER_DATABASE_URL"] = "postgresql://own/meter"
    assert env_problems(workload("meter", env)) == []


def test_variables_from_a_configmap_are_checked() -> None:
    config: Obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings"},
        "data": {**REQUIRED, "USAGEBILLING_BACKDATE_WINDOW": "35 days", "NOT_A_SETTING": "x"},
    }
    deployment = workload("ingest", {}, envFrom=[{"configMapRef": {"name": "settings"}}])
    assert env_problems(config, deployment) == [
        "Deployment/ingest container app: sets NOT_A_SETTING, which ingest does not read",
        "Deployment/ingest container app: USAGEBILLING_BACKDATE_WINDOW: '35 days' is not a "
        "duration such as 30s, 5m, 1h or 35d",
    ]


def test_a_missing_configmap_fails() -> None:
    deployment = workload("ingest", REQUIRED, envFrom=[{"configMapRef": {"name": "gone"}}])
    assert env_problems(deployment) == [
        "Deployment/ingest container app: envFrom ConfigMap gone is missing"
    ]


def test_secret_references_count_as_set_but_unseen_secret_keys_fail() -> None:
    from_secret = {"valueFrom": {"secretKeyRef": {"name": "external", "key": "url"}}}
    deployment = workload("ingest", {k: v for k, v in REQUIRED.items() if k != "DATABASE_URL"})
    deployment["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "DATABASE_URL", **from_secret}
    )
    assert env_problems(deployment) == []
    deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"] = [
        {"secretRef": {"name": "external"}}
    ]
    [problem] = env_problems(deployment)
    assert "envFrom Secret external is not in the manifests" in problem


def test_a_container_setting_usagebilling_variables_must_run_a_service() -> None:
    stray = workload("ingest", REQUIRED)
    stray["spec"]["template"]["spec"]["containers"][0]["command"] = ["python", "main.py"]
    assert env_problems(stray) == [
        "Deployment/ingest container app: sets USAGEBILLING_* but runs no service module"
    ]


def test_duplicate_yaml_keys_are_refused() -> None:
    with pytest.raises(CheckError, match="duplicate key 'name'"):
        k8s_check.load_documents("kind: ConfigMap\nmetadata:\n  name: a\n  name: b\n", "x.yaml")


def test_the_chart_requires_an_admin_token() -> None:
    with pytest.raises(CheckError, match="adminToken"):
        k8s_check.render_helm({"postgres": {"password": "p"}})


@pytest.fixture(scope="module")
def renderings() -> list[Rendering]:
    return k8s_check.render_all()


def test_every_real_rendering_passes(renderings: list[Rendering]) -> None:
    assert [r.name for r in renderings] == [
        "kustomize overlays/dev",
        "kustomize overlays/prod",
        "helm values.yaml",
        "helm values-prod.yaml",
    ]
    for rendering in renderings:
        problems, apps = k8s_check.check_objects(rendering.objects)
        assert rendering.problems + problems == [], rendering.name
        assert apps == 6, rendering.name  # a server and a migration Job per service


def _app(objects: list[Obj], kind: str, name_part: str) -> Obj:
    [obj] = [o for o in objects if o["kind"] == kind and name_part in o["metadata"]["name"]]
    container: Obj = obj["spec"]["template"]["spec"]["containers"][0]
    return container


def test_the_check_fails_on_a_broken_real_rendering(renderings: list[Rendering]) -> None:
    for rendering in renderings:
        objects = copy.deepcopy(rendering.objects)
        _app(objects, "Deployment", "ingest")["env"].append(
            {"name": "USAGEBILLING_TYPO", "value": "1"}
        )
        job = _app(objects, "Job", "meter-migrate")
        job["env"] = [e for e in job["env"] if e["name"] != "USAGEBILLING_ADMIN_TOKEN"]
        problems, _ = k8s_check.check_objects(objects)
        assert any("sets USAGEBILLING_TYPO, which ingest does not read" in p for p in problems)
        assert any(
            p.startswith("Job/") and "USAGEBILLING_ADMIN_TOKEN is required by meter" in p
            for p in problems
        ), rendering.name


def test_schema_errors_and_weakened_pods_fail(renderings: list[Rendering]) -> None:
    objects = copy.deepcopy(renderings[0].objects)
    container = _app(objects, "Deployment", "billing")
    container["securityContext"]["readOnlyRootFilesystem"] = False
    container["readinessProbe"] = {"httpGet": {"port": 8080, "path": "/"}}
    container["bogus"] = True
    problems, _ = k8s_check.check_objects(objects)
    assert any("'bogus' was unexpected" in p for p in problems)
    assert any("readOnlyRootFilesystem is not true" in p for p in problems)
    assert any("readinessProbe is not a gRPC probe on port 50053" in p for p in problems)


def test_known_variables_include_the_metrics_port() -> None:
    assert "USAGEBILLING_METRICS_PORT" in k8s_check.known_variables("billing")


def test_services_dial_each_other_through_headless_services(renderings: list[Rendering]) -> None:
    for rendering in renderings:
        index = Index(rendering.objects)
        addresses = {
            name: value
            for o in rendering.objects
            if o["kind"] == "ConfigMap"
            for name, value in (o.get("data") or {}).items()
            if name.endswith("_ADDR")
        }
        assert set(addresses) == {
            "USAGEBILLING_BILLING_ADDR",
            "USAGEBILLING_INGEST_ADDR",
            "USAGEBILLING_METER_ADDR",
        }, rendering.name
        for value in addresses.values():
            address, by_dns = k8s_check.grpc_target(value)
            assert by_dns, value
            service = index.get("Service", address.split(":")[0])
            assert service is not None and service["spec"]["clusterIP"] == "None", value
        # A ClusterIP Service behind a dns:/// address is reported.
        objects = copy.deepcopy(rendering.objects)
        for service in objects:
            if service["kind"] == "Service" and service["metadata"]["name"].endswith("-peers"):
                del service["spec"]["clusterIP"]
        problems, _ = k8s_check.check_objects(objects)
        assert any("is not headless" in p for p in problems), rendering.name


def test_grpc_targets() -> None:
    assert k8s_check.grpc_target("dns:///meter-peers:50052") == ("meter-peers:50052", True)
    assert k8s_check.grpc_target("dns://10.0.0.10/meter-peers:50052") == (
        "meter-peers:50052",
        True,
    )
    assert k8s_check.grpc_target("meter:50052") == ("meter:50052", False)
