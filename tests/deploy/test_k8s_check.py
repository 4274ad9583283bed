"""tools/k8s_check: it passes on the real manifests and fails on a manifest that
sets a variable no service reads or misses a required one."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest

from services.common.service_identity import callers_of, digest_setting

# The Kubernetes tooling (requirements/k8s.lock: kubectl, Helm, schemas; about
# 420 MB) is not in `make setup`: `make k8s-check` installs it and runs this file.
for _module in ("helm_python", "jsonschema", "kubernetes_validate", "yaml"):
    pytest.importorskip(
        _module,
        reason=f"Kubernetes tooling not installed ({_module}): `make k8s-check` installs"
        " requirements/k8s.lock and runs these tests",
    )

from tools import k8s_check  # noqa: E402
from tools.k8s_check import CheckError, Index, Obj, Rendering  # noqa: E402

COMMON = {
    "DATABASE_URL": "postgresql://db/billing",
    "NATS_URL": "nats://nats:4222",
    "USAGEBILLING_ADMIN_TOKEN_SHA256": "0" * 64,
    "USAGEBILLING_SERVICE_TOKEN": "a-service-token-0123",
}


def required(service: str) -> dict[str, str]:
    """What `service` needs set: COMMON and its callers' token digests."""
    digests = {
        digest_setting(c): hashlib.sha256(c.encode()).hexdigest() for c in callers_of(service)
    }
    return {**COMMON, **digests}


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
        env_problems(
            workload("meter", required("meter")), workload("meter", required("meter"), migrate=True)
        )
        == []
    )


def test_a_variable_the_service_does_not_read_fails() -> None:
    # USAGEBILLING_INVOICE_GRACE is billing's; a typo is unknown to everyone.
    env = {
        **required("ingest"),
        "USAGEBILLING_INVOICE_GRACE": "1h",
        "USAGEBILLING_LOGLEVEL": "debug",
    }
    where = "Deployment/ingest container app"
    assert env_problems(workload("ingest", env)) == [
        f"{where}: sets USAGEBILLING_INVOICE_GRACE, which ingest does not read",
        f"{where}: sets USAGEBILLING_LOGLEVEL, which ingest does not read",
    ]


def test_a_missing_required_setting_fails_in_the_migration_job_too() -> None:
    env = {k: v for k, v in required("billing").items() if k != "USAGEBILLING_SERVICE_TOKEN"}
    problems = env_problems(workload("billing", env), workload("billing", env, migrate=True))
    missing = "USAGEBILLING_SERVICE_TOKEN is required by billing but not set"
    assert problems == [
        f"Deployment/billing container app: {missing}",
        f"Job/billing-migrate container app: {missing}",
    ]


def test_an_empty_value_does_not_count_as_set() -> None:
    problems = env_problems(workload("ingest", {**required("ingest"), "NATS_URL": ""}))
    assert problems == [
        "Deployment/ingest container app: NATS_URL is required by ingest but not set"
    ]


def test_a_service_database_url_stands_in_for_database_url() -> None:
    env = {k: v for k, v in required("meter").items() if k != "DATABASE_URL"}
    env["USAGEBILLING_METER_DATABASE_URL"] = "postgresql://own/meter"
    assert env_problems(workload("meter", env)) == []


def test_variables_from_a_configmap_are_checked() -> None:
    config: Obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings"},
        "data": {
            **required("ingest"),
            "USAGEBILLING_BACKDATE_WINDOW": "35 days",
            "NOT_A_SETTING": "x",
        },
    }
    deployment = workload("ingest", {}, envFrom=[{"configMapRef": {"name": "settings"}}])
    assert env_problems(config, deployment) == [
        "Deployment/ingest container app: sets NOT_A_SETTING, which ingest does not read",
        "Deployment/ingest container app: USAGEBILLING_BACKDATE_WINDOW: '35 days' is not a "
        "duration such as 30s, 5m, 1h or 35d",
    ]


def test_a_missing_configmap_fails() -> None:
    deployment = workload(
        "ingest", required("ingest"), envFrom=[{"configMapRef": {"name": "gone"}}]
    )
    assert env_problems(deployment) == [
        "Deployment/ingest container app: envFrom ConfigMap gone is missing"
    ]


def test_secret_references_count_as_set_but_unseen_secret_keys_fail() -> None:
    from_secret = {"valueFrom": {"secretKeyRef": {"name": "external", "key": "url"}}}
    deployment = workload(
        "ingest", {k: v for k, v in required("ingest").items() if k != "DATABASE_URL"}
    )
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
    stray = workload("ingest", required("ingest"))
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
        "helm +values-tls.yaml",
        "helm +tracing",
    ]
    assert k8s_check.check_monitoring_shipped(renderings) == []
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
        job["env"] = [e for e in job["env"] if e["name"] != "USAGEBILLING_SERVICE_TOKEN"]
        problems, _ = k8s_check.check_objects(objects)
        assert any("sets USAGEBILLING_TYPO, which ingest does not read" in p for p in problems)
        assert any(
            p.startswith("Job/") and "USAGEBILLING_SERVICE_TOKEN is required by meter" in p
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


# --- issue 11: NetworkPolicies, NATS authorization, probes, secrets, schema --------


def _broken(rendering: Rendering, change: Any) -> list[str]:
    objects = copy.deepcopy(rendering.objects)
    change(objects)
    problems, _ = k8s_check.check_objects(objects)
    return problems


def _named(objects: list[Obj], kind: str, name_part: str) -> Obj:
    [obj] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_part)]
    return obj


def test_nats_and_postgres_must_be_behind_network_policies(renderings: list[Rendering]) -> None:
    for rendering in (renderings[0], renderings[2]):  # both have an in-cluster PostgreSQL

        def drop(objects: list[Obj]) -> None:
            objects[:] = [
                o
                for o in objects
                if not (
                    o["kind"] == "NetworkPolicy"
                    and o["metadata"]["name"].endswith(("nats", "postgres"))
                )
            ]

        problems = _broken(rendering, drop)
        assert any("no NetworkPolicy selects the NATS pods" in p for p in problems), rendering.name
        assert any("no NetworkPolicy selects the PostgreSQL pods" in p for p in problems)

        def open_up(objects: list[Obj]) -> None:
            _named(objects, "NetworkPolicy", "nats")["spec"]["ingress"][0]["from"] = [
                {"podSelector": {}}
            ]

        assert any("open to every pod" in p for p in _broken(rendering, open_up))

        def lock_out_meter(objects: list[Obj]) -> None:
            peer = _named(objects, "NetworkPolicy", "nats")["spec"]["ingress"][0]["from"][0]
            peer["podSelector"]["matchExpressions"][0]["values"] = ["ingest", "billing"]

        problems = _broken(rendering, lock_out_meter)
        assert any("keep Deployment/" in p and "meter" in p and "NATS" in p for p in problems)


def test_nats_must_have_users_with_permissions(renderings: list[Rendering]) -> None:
    for rendering in renderings:
        config = next(
            o
            for o in rendering.objects
            if o["kind"] == "ConfigMap" and "nats" in o["metadata"]["name"]
        )

        def edit(
            objects: list[Obj], old: str, new: str, name: str = config["metadata"]["name"]
        ) -> None:
            cm = _named(objects, "ConfigMap", name)
            key = "nats-auth.conf" if "nats-auth.conf" in cm["data"] else "nats.conf"
            assert old in cm["data"][key]
            cm["data"][key] = cm["data"][key].replace(old, new)

        no_auth = _broken(rendering, lambda o: edit(o, "authorization {", "not_authorization {"))
        assert any("no authorization users" in p for p in no_auth), rendering.name
        anonymous = _broken(
            rendering, lambda o: edit(o, "authorization {", "no_auth_user: ingest\nauthorization {")
        )
        assert any("no_auth_user" in p for p in anonymous), rendering.name
        literal = _broken(rendering, lambda o: edit(o, "$NATS_METER_PASSWORD", "hunter2"))
        assert any("meter's password is written in the config" in p for p in literal)
        no_subscribe = _broken(
            rendering, lambda o: edit(o, 'subscribe: {allow: ["_INBOX.billing.>"]}', "")
        )
        assert any("billing has no publish and subscribe permissions" in p for p in no_subscribe)

        def anonymous_service(objects: list[Obj]) -> None:
            container = _app(objects, "Deployment", "ingest")
            container["env"] = [e for e in container["env"] if "NATS_" not in e["name"]]

        problems = _broken(rendering, anonymous_service)
        assert any("ingest" in p and "without a user and password" in p for p in problems)


def test_the_nats_config_parser() -> None:
    parsed = k8s_check.parse_nats_config(
        """# comment
        listen: 0.0.0.0:4222
        jetstream { store_dir = /data }
        include ./auth.conf
        """,
        lambda name: (
            "authorization { users: [ {user: a, password: $P,"
            ' permissions: {publish: {allow: ["x.>", "$JS.API.INFO"]}}} ] }'
        ),
    )
    assert parsed["listen"] == "0.0.0.0:4222"
    assert parsed["jetstream"] == {"store_dir": "/data"}
    [user] = parsed["authorization"]["users"]
    assert user["password"] == "$P"
    assert user["permissions"]["publish"]["allow"] == ["x.>", "$JS.API.INFO"]


def test_readiness_and_liveness_probes_must_differ(renderings: list[Rendering]) -> None:
    for rendering in renderings[:4]:  # plaintext: native gRPC probes
        container = _app(rendering.objects, "Deployment", "meter")
        assert container["readinessProbe"]["grpc"]["service"] == "readiness"
        assert container["livenessProbe"]["grpc"]["service"] == "liveness"
        assert container["startupProbe"]["grpc"]["service"] == "liveness"

        def same(objects: list[Obj]) -> None:
            c = _app(objects, "Deployment", "meter")
            c["readinessProbe"] = copy.deepcopy(c["livenessProbe"])

        problems = _broken(rendering, same)
        assert any("readinessProbe and livenessProbe are the same" in p for p in problems)
        assert any("readinessProbe asks health service 'liveness'" in p for p in problems)


def test_tls_example_mounts_a_secret_and_probes_over_tls(renderings: list[Rendering]) -> None:
    rendering = renderings[4]
    assert rendering.name == "helm +values-tls.yaml"
    container = _app(rendering.objects, "Deployment", "meter")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["USAGEBILLING_TLS_CERT"] == "/etc/usage-billing/tls/tls.crt"
    assert env["USAGEBILLING_TLS_CLIENT_CA"] == "/etc/usage-billing/tls/ca.crt"
    assert container["readinessProbe"]["exec"]["command"][-1] == "readiness"

    def plaintext_probe(objects: list[Obj]) -> None:
        _app(objects, "Deployment", "meter")["readinessProbe"] = {
            "grpc": {"port": 50052, "service": "readiness"}
        }

    assert any(
        "plaintext gRPC probe cannot reach" in p for p in _broken(rendering, plaintext_probe)
    )

    def not_from_secret(objects: list[Obj]) -> None:
        pod = _named(objects, "Deployment", "meter")["spec"]["template"]["spec"]
        for volume in pod["volumes"]:
            if volume["name"] == "tls":
                volume.pop("secret")
                volume["emptyDir"] = {}

    problems = _broken(rendering, not_from_secret)
    assert any(
        "USAGEBILLING_TLS_KEY=/etc/usage-billing/tls/tls.key is not on a volume" in p
        for p in problems
    )


def test_no_secret_in_a_configmap_or_literal(renderings: list[Rendering]) -> None:
    for rendering in renderings:

        def leak(objects: list[Obj]) -> None:
            common = next(
                o for o in objects if o["kind"] == "ConfigMap" and "common" in o["metadata"]["name"]
            )
            common["data"]["USAGEBILLING_SERVICE_TOKEN"] = "in-a-configmap-0123456789"
            env = _app(objects, "Deployment", "ingest")["env"]
            env[:] = [
                e for e in env if e["name"] not in ("USAGEBILLING_NATS_PASSWORD", "DATABASE_URL")
            ]
            env.append({"name": "USAGEBILLING_NATS_PASSWORD", "value": "literal-password"})
            env.append({"name": "DATABASE_URL", "value": "postgresql://u:secret@db/x"})

        problems = _broken(rendering, leak)
        assert any("key USAGEBILLING_SERVICE_TOKEN looks secret" in p for p in problems)
        assert any("USAGEBILLING_NATS_PASSWORD is given in the clear" in p for p in problems), (
            rendering.name
        )
        assert any("DATABASE_URL holds a password in the clear" in p for p in problems)


def test_the_values_schema_refuses_bad_values() -> None:
    assert k8s_check.check_values_schema(k8s_check.HELM_DEFAULT_VALUES) == []
    problems = k8s_check.check_values_schema(
        {
            "image": {"digest": "latest"},
            "ingest": {"nodeSelecter": {}},
            "config": {"shutdownGrace": "8 seconds"},
            "serviceTokens": {"meter": "short"},
        }
    )
    text = "\n".join(problems)
    assert "image.digest" in text
    assert "'nodeSelecter' was unexpected" in text
    assert "config.shutdownGrace" in text
    assert "serviceTokens.meter" in text
    # Helm itself validates against the same schema when it renders.
    with pytest.raises(CheckError, match="nodeSelecter"):
        k8s_check.render_helm({**k8s_check.HELM_DEFAULT_VALUES, "ingest": {"nodeSelecter": {}}})


def test_helm_values_reach_the_pods() -> None:
    digest = "sha256:" + "a" * 64
    values = k8s_check.merge_values(
        k8s_check.HELM_DEFAULT_VALUES,
        {
            "image": {"digest": digest},
            "global": {
                "nodeSelector": {"pool": "general"},
                "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                "podAnnotations": {"team": "billing"},
                "extraEnv": [{"name": "USAGEBILLING_LOG_LEVEL", "value": "debug"}],
            },
            "meter": {"nodeSelector": {"pool": "meter"}, "podAnnotations": {"x": "y"}},
        },
    )
    objects = k8s_check.render_helm(values)
    problems, _ = k8s_check.check_objects(objects)
    assert problems == []
    meter = _named(objects, "Deployment", "meter")["spec"]["template"]
    ingest = _named(objects, "Deployment", "ingest")["spec"]["template"]
    assert meter["spec"]["nodeSelector"] == {"pool": "meter"}
    assert ingest["spec"]["nodeSelector"] == {"pool": "general"}
    assert ingest["spec"]["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert meter["metadata"]["annotations"]["team"] == "billing"
    assert meter["metadata"]["annotations"]["x"] == "y"
    assert meter["spec"]["containers"][0]["image"] == f"usage-billing@{digest}"
    # A changed Secret changes the pods' checksum, so they restart.
    changed = k8s_check.merge_values(
        values, {"serviceTokens": {"billing": "another-billing-token"}}
    )
    again = _named(k8s_check.render_helm(changed), "Deployment", "meter")["spec"]["template"]
    key = "checksum/secret"
    assert again["metadata"]["annotations"][key] != meter["metadata"]["annotations"][key]


def test_migration_jobs_are_hooks_with_a_deadline(renderings: list[Rendering]) -> None:
    for rendering in renderings:
        for job in (o for o in rendering.objects if o["kind"] == "Job"):
            annotations = job["metadata"]["annotations"]
            assert annotations["argocd.argoproj.io/hook"] == "Sync", rendering.name
            assert annotations["argocd.argoproj.io/hook-delete-policy"] == "BeforeHookCreation"
            assert job["spec"]["activeDeadlineSeconds"] > 0
            assert job["spec"]["ttlSecondsAfterFinished"] > 0
    prod_job = next(o for o in renderings[3].objects if o["kind"] == "Job")
    assert prod_job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert (
        "before-hook-creation" in prod_job["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    )
    with pytest.raises(CheckError, match=r"migrations\.hook needs secrets\.existingSecret"):
        k8s_check.render_helm(
            k8s_check.merge_values(k8s_check.HELM_DEFAULT_VALUES, {"migrations": {"hook": True}})
        )


def test_nats_permissions_match_the_dev_stacks_table(renderings: list[Rendering]) -> None:
    assert k8s_check.EXPECTED_NATS_PERMISSIONS, "services/common/nats_permissions.py"
    for rendering in renderings:
        objects = copy.deepcopy(rendering.objects)
        for cm in (o for o in objects if o["kind"] == "ConfigMap"):
            for key, text in (cm.get("data") or {}).items():
                # ingest allowed to publish billing messages too
                cm["data"][key] = text.replace(
                    '"usagebilling.events.v1.>"',
                    '"usagebilling.events.v1.>", "usagebilling.billing.v1.>"',
                )
        problems, _ = k8s_check.check_objects(objects)
        assert any("NATS user ingest may publish" in p for p in problems), rendering.name


def test_each_pod_gets_its_own_token_and_its_callers_digests(
    renderings: list[Rendering],
) -> None:
    """No pod holds another service's token; each (server and migration Job)
    gets exactly the digests of the services that call it
    (services/common/service_identity.py), from the Secret."""
    for rendering in renderings:
        seen = set()
        for obj in rendering.objects:
            if obj["kind"] not in ("Deployment", "Job"):
                continue
            containers = obj["spec"]["template"]["spec"]["containers"]
            found = k8s_check.service_of(containers[0])
            if found is None:  # NATS, PostgreSQL
                continue
            service, migrate = found
            seen.add((service, migrate))
            keys = {
                e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}).get("key")
                for e in containers[0]["env"]
            }
            assert keys["USAGEBILLING_SERVICE_TOKEN"] == f"{service}-token", rendering.name
            digests = {k: v for k, v in keys.items() if k.endswith("_TOKEN_SHA256")}
            expected = {digest_setting(c): f"{c}-token-sha256" for c in callers_of(service)}
            expected["USAGEBILLING_ADMIN_TOKEN_SHA256"] = "admin-token-sha256"
            assert digests == expected, (rendering.name, service)
        assert len(seen) == 6, (rendering.name, seen)
