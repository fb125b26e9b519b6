"""The chart's security objects and settings, rendered offline and validated (strict core
schemas, the KubeRay CRD): the generated credentials Secret and its mounts, Ray token auth,
the head's dashboard on the pod IP, Redis with requirepass (and TLS), NetworkPolicies,
hardened securityContexts, PodDisruptionBudgets for the Ray groups, bounded drains."""

from __future__ import annotations

import base64

import helm_python
import pytest

from tests.deploy.manifests import validate
from tests.deploy.serve_flags import serve_config_of
from tests.deploy.test_helm_chart import MULTINODE, one, render, router_container, worker_groups

SECRETS = "/etc/pdserve/secrets"
HARDENED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def rendered(values: dict | None) -> list[dict]:
    docs = render(values)
    for doc in docs:
        validate(doc)
    return docs


@pytest.fixture(scope="module")
def default() -> list[dict]:
    return rendered(None)


def pods(docs: list[dict]) -> dict[str, dict]:
    """Every pod template of the release by component: router, redis, ray-head, groups."""
    out = {
        d["metadata"]["name"].rsplit("-", 1)[1]: d["spec"]["template"]
        for d in docs
        if d["kind"] == "Deployment"
    }
    ray = one(docs, "RayCluster")["spec"]
    out["ray-head"] = ray["headGroupSpec"]["template"]
    out.update({g["groupName"]: g["template"] for g in ray["workerGroupSpecs"]})
    return out


def secret_sources(pod: dict) -> dict[str, tuple[str, str]]:
    """file name under /etc/pdserve/secrets -> (Secret, key), from the projected volume."""
    (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == "secrets"]
    assert vol["projected"]["defaultMode"] == 0o440
    files = {}
    for src in vol["projected"]["sources"]:
        for item in src["secret"]["items"]:
            files[item["path"]] = (src["secret"]["name"], item["key"])
    return files


def test_security_chart_generates_the_cluster_secret_and_ray_token(default):
    secret = one(default, "Secret", "llm-pdserve-secrets")
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert sorted(values) == ["cluster-secret", "ray-auth-token"]
    assert all(len(v) == 48 and v.isalnum() for v in values.values())
    others = [d for d in default if d is not secret]
    for v in values.values():  # the values are in the Secret only
        assert v not in str(others)
    want = {"cluster-secret": ("llm-pdserve-secrets", "cluster-secret"), "ray-auth-token": ("llm-pdserve-secrets", "ray-auth-token")}  # fmt: skip
    for name, pod in pods(default).items():
        assert secret_sources(pod) == want, name
        mounts = pod["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "secrets", "mountPath": SECRETS, "readOnly": True} in mounts, name
    env = one(default, "ConfigMap")["data"]
    assert env["PDSERVE_CLUSTER_SECRET_FILE"] == f"{SECRETS}/cluster-secret"
    assert (env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN_PATH"]) == ("token", f"{SECRETS}/ray-auth-token")  # fmt: skip
    cfg = serve_config_of(router_container(default)["args"])
    assert cfg.cluster_secret_file == f"{SECRETS}/cluster-secret"


def test_security_existing_secrets_and_auth_off():
    docs = rendered({"clusterSecret": {"existingSecret": "cs", "secretKey": "k"}, "ray": {"auth": {"existingSecret": "rt"}}})  # fmt: skip
    assert not [d for d in docs if d["kind"] == "Secret"]  # nothing to generate
    for pod in pods(docs).values():
        assert secret_sources(pod) == {"cluster-secret": ("cs", "k"), "ray-auth-token": ("rt", "ray-auth-token")}  # fmt: skip
    off = rendered({"clusterSecret": {"enabled": False}, "ray": {"auth": {"enabled": False}}})
    assert not [d for d in off if d["kind"] == "Secret"]
    assert not {"PDSERVE_CLUSTER_SECRET_FILE", "RAY_AUTH_MODE"} & set(one(off, "ConfigMap")["data"])
    assert not any(a.startswith("--cluster-secret-file") for a in router_container(off)["args"])
    for pod in pods(off).values():
        assert "secrets" not in [v["name"] for v in pod["spec"]["volumes"]]


def test_security_ray_head_binds_the_pod_ip_and_probes_it(default):
    head = one(default, "RayCluster")["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "$(PDSERVE_POD_IP)"
    assert "0.0.0.0" not in str(one(default, "RayCluster"))
    (container,) = head["template"]["spec"]["containers"]
    (env,) = [e for e in container["env"] if e["name"] == "PDSERVE_POD_IP"]
    assert env["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    for probe in ("readinessProbe", "livenessProbe"):  # KubeRay's defaults ask localhost
        assert container[probe]["httpGet"] == {"path": "/api/gcs_healthz", "port": "dashboard"}


def test_security_redis_requires_a_password_from_a_secret():
    docs = rendered({"redis": {"enabled": True}})
    secret = one(docs, "Secret", "llm-pdserve-secrets")
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    assert len(password) == 48
    redis = pods(docs)["redis"]["spec"]
    (container,) = redis["containers"]
    assert "requirepass" in container["args"][0] and password not in str(docs[1:])
    assert "/etc/redis-auth/password" in container["args"][0]  # read from the file at start
    assert "REDISCLI_AUTH" in container["readinessProbe"]["exec"]["command"][-1]
    (auth,) = [v for v in redis["volumes"] if v["name"] == "auth"]
    assert auth["secret"]["secretName"] == "llm-pdserve-secrets"
    cfg = serve_config_of(router_container(docs)["args"])
    assert cfg.state.redis_url == "redis://llm-pdserve-redis.serving.svc:6379/0"
    assert cfg.state.redis.password_file == f"{SECRETS}/redis-password"
    for name, pod in pods(docs).items():
        if name != "redis":  # Ray pods too: the workers publish to Redis themselves
            assert secret_sources(pod)["redis-password"] == ("llm-pdserve-secrets", "redis-password")  # fmt: skip


def test_security_redis_tls_and_external_redis():
    docs = rendered({"redis": {"enabled": True, "tls": {"enabled": True, "existingSecret": "redis-tls"}}})  # fmt: skip
    (container,) = pods(docs)["redis"]["spec"]["containers"]
    assert "--tls-port 6379" in container["args"][0] and "--port 0" in container["args"][0]
    cfg = serve_config_of(router_container(docs)["args"])
    assert cfg.state.redis_url.startswith("rediss://") and cfg.state.redis.ca_file == f"{SECRETS}/redis-ca.crt"  # fmt: skip
    assert secret_sources(pods(docs)["decode"])["redis-ca.crt"] == ("redis-tls", "ca.crt")
    with pytest.raises(helm_python.HelmRenderError, match="needs redis.tls.existingSecret"):
        render({"redis": {"enabled": True, "tls": {"enabled": True}}})
    with pytest.raises(helm_python.HelmRenderError, match="externalUrl carries a password"):
        render({"redis": {"externalUrl": "redis://:hunter2@r:6379/0"}})
    ext = rendered({"redis": {"externalUrl": "rediss://app@r:6380/0", "auth": {"existingSecret": "ext", "secretKey": "pw"}}})  # fmt: skip
    cfg = serve_config_of(router_container(ext)["args"])
    assert (cfg.state.redis_url, cfg.state.redis.password_file) == ("rediss://app@r:6380/0", f"{SECRETS}/redis-password")  # fmt: skip
    assert secret_sources(pods(ext)["prefill"])["redis-password"] == ("ext", "pw")


def _selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))


def test_security_network_policies_admit_only_the_release(default):
    policies = {d["metadata"]["name"]: d["spec"] for d in default if d["kind"] == "NetworkPolicy"}
    assert sorted(policies) == ["llm-pdserve-ray", "llm-pdserve-router"]
    by_name = pods(default)
    ray = policies["llm-pdserve-ray"]
    for name in ("ray-head", "prefill", "decode"):
        assert _selects(ray["podSelector"], by_name[name]["metadata"]["labels"]), name
    assert not _selects(ray["podSelector"], by_name["router"]["metadata"]["labels"])
    (rule,) = ray["ingress"]
    assert "ports" not in rule  # every port Ray and the workers pick, but only from ...
    (peer,) = rule["from"]  # ... pods of this release
    assert peer == {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "llm", "app.kubernetes.io/part-of": "pdserve"}}}  # fmt: skip
    for pod in by_name.values():
        assert _selects(peer["podSelector"], pod["metadata"]["labels"])
    (http,) = policies["llm-pdserve-router"]["ingress"]
    assert http == {"ports": [{"port": 8000, "protocol": "TCP"}]}
    multi = rendered(MULTINODE | {"networkPolicy": {"routerFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}]}})  # fmt: skip
    redis = one(multi, "NetworkPolicy", "llm-pdserve-redis")["spec"]["ingress"]
    assert redis == [{"from": [peer], "ports": [{"port": 6379, "protocol": "TCP"}]}]
    router = one(multi, "NetworkPolicy", "llm-pdserve-router")["spec"]["ingress"][0]
    assert router["from"] == [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}]
    assert not [d for d in render({"networkPolicy": {"enabled": False}}) if d["kind"] == "NetworkPolicy"]  # fmt: skip


@pytest.mark.parametrize("values", [None, MULTINODE], ids=["default", "multinode"])
def test_security_every_container_is_hardened(values):
    for name, pod in pods(rendered(values)).items():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"] == HARDENED, (name, c["name"])
            # a read-only root needs somewhere to write
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, (name, c["name"])
        empty = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        assert "tmp" in empty, name


def test_security_ray_groups_have_disruption_budgets(default):
    budgets = {d["metadata"]["name"]: d["spec"] for d in default if d["kind"] == "PodDisruptionBudget"}  # fmt: skip
    groups = worker_groups(default)
    for role in ("prefill", "decode"):
        pdb = budgets[f"llm-pdserve-{role}"]
        assert pdb["maxUnavailable"] == 1
        assert _selects(pdb["selector"], groups[role]["template"]["metadata"]["labels"])
        other = groups["decode" if role == "prefill" else "prefill"]
        assert not _selects(pdb["selector"], other["template"]["metadata"]["labels"])
    aggregated = render({"prefill": {"replicas": 0}})
    assert "llm-pdserve-prefill" not in [d["metadata"]["name"] for d in aggregated if d["kind"] == "PodDisruptionBudget"]  # fmt: skip


def test_security_bounded_graceful_shutdown(default):
    router = pods(default)["router"]["spec"]
    assert router["terminationGracePeriodSeconds"] == 60
    (container,) = router["containers"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    for name in ("ray-head", "prefill", "decode"):
        spec = pods(default)[name]["spec"]
        assert spec["terminationGracePeriodSeconds"] == 30
        assert spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1] == "ray stop"
