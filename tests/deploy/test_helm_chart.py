"""The Helm chart renders offline (embedded Helm, no binary, no cluster), lints clean and
every manifest validates: core kinds against Kubernetes' strict schemas, the RayCluster
against the KubeRay CRD. Rendered with the defaults and with a multi-node values file."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import helm_python
import pytest

from tests.deploy.manifests import load, load_all, validate
from tests.deploy.serve_flags import serve_config_of

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "pdserve"
MULTINODE = load(CHART / "ci" / "multinode-values.yaml")
VALUES = {"default": None, "multinode": MULTINODE}
RELEASE, NAMESPACE = "llm", "serving"


def render(values: dict | None) -> list[dict]:
    with helm_python.Chart.load(CHART) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in sorted(out.items())
        if path.endswith(".yaml")
        for doc in load_all(text)
    ]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(values) for name, values in VALUES.items()}


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def router_container(docs: list[dict]) -> dict:
    deploy = one(docs, "Deployment", "llm-pdserve-router")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return container


def worker_groups(docs: list[dict]) -> dict[str, dict]:
    ray = one(docs, "RayCluster")
    return {g["groupName"]: g for g in ray["spec"]["workerGroupSpecs"]}


@pytest.mark.parametrize("name", VALUES)
def test_chart_lints_clean(name):
    report = helm_python.lint(CHART, VALUES[name], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("name", VALUES)
def test_every_manifest_validates(rendered, name):
    for doc in rendered[name]:
        validate(doc)


def test_default_and_multinode_kinds(rendered):
    kinds = {n: sorted(f"{d['kind']}/{d['metadata']['name']}" for d in rendered[n]) for n in VALUES}
    base = [
        "ConfigMap/llm-pdserve-env",
        "Deployment/llm-pdserve-router",
        "NetworkPolicy/llm-pdserve-ray",
        "NetworkPolicy/llm-pdserve-router",
        "PodDisruptionBudget/llm-pdserve-decode",
        "PodDisruptionBudget/llm-pdserve-prefill",
        "PodDisruptionBudget/llm-pdserve-router",
        "RayCluster/llm-pdserve",
        "Secret/llm-pdserve-secrets",
        "Service/llm-pdserve-router",
    ]
    assert kinds["default"] == base
    extra = [
        "Deployment/llm-pdserve-redis",
        "HorizontalPodAutoscaler/llm-pdserve-router",
        "Ingress/llm-pdserve-router",
        "NetworkPolicy/llm-pdserve-redis",
        "Service/llm-pdserve-redis",
        "ServiceMonitor/llm-pdserve-router",
    ]
    assert kinds["multinode"] == sorted(base + extra)


@pytest.mark.parametrize(("name", "gpus", "replicas"), [("default", 1, (1, 1)), ("multinode", 8, (2, 4))])  # fmt: skip
def test_worker_groups_advertise_their_role_resource(rendered, name, gpus, replicas):
    groups = worker_groups(rendered[name])
    assert list(groups) == ["prefill", "decode"]
    for (role, group), count in zip(groups.items(), replicas, strict=True):
        # KubeRay passes the value to `ray start --resources` as a quoted JSON string
        resources = json.loads(json.loads(group["rayStartParams"]["resources"]))
        assert resources == {f"{role}_gpu": gpus}
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == count
        pod = group["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    if name == "multinode":
        assert groups["decode"]["template"]["spec"]["nodeSelector"]["pdserve.io/pool"] == "decode"
        assert groups["prefill"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_head_runs_no_workers(rendered):
    head = one(rendered["default"], "RayCluster")["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}  # fmt: skip
    assert ports["client"] == 10001


def test_router_joins_the_raycluster_and_probes_health(rendered):
    docs = rendered["default"]
    container = router_container(docs)
    ray_name = one(docs, "RayCluster")["metadata"]["name"]
    assert container["command"] == ["pdserve"]
    assert f"--ray-address=ray://{ray_name}-head-svc.{NAMESPACE}.svc:10001" in container["args"]
    assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert "env" not in container  # no API key configured
    service = one(docs, "Service", "llm-pdserve-router")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    labels = one(docs, "Deployment", "llm-pdserve-router")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_router_flags_parse_with_pdserve_serve(rendered):
    """The router's args are real `pdserve serve` flags (the CLI parser accepts them)."""
    from engine.config import StateConfig
    from tests.deploy.serve_flags import serve_config_of

    cfg = serve_config_of(router_container(rendered["default"])["args"])
    assert (cfg.num_prefill, cfg.num_decode, cfg.router.kv_transport, cfg.host) == (1, 1, "auto", "0.0.0.0")  # fmt: skip
    assert cfg.ray.namespace == "llm-pdserve"  # every router replica shares the workers
    cfg = serve_config_of(router_container(rendered["multinode"])["args"])
    assert (cfg.num_prefill, cfg.num_decode, cfg.router.kv_transport) == (2, 4, "ucx")
    assert cfg.router.model == "/models/Qwen3-30B-A3B" and cfg.decode.engine.dtype == "bfloat16"
    assert cfg.prefill.engine.attention_backend == "triton"  # router.extraArgs
    # passed only when EP / Redis are configured (flags of the EP and Redis features)
    assert (cfg.prefill.engine.parallel.ep_size, cfg.decode.engine.parallel.ep_size) == (8, 8)
    assert cfg.state.redis_url == f"redis://llm-pdserve-redis.{NAMESPACE}.svc:6379/0"
    assert cfg.prefill.state == cfg.decode.state == StateConfig()  # launch copies cfg.state


def test_worker_settings_change_recreates_the_raycluster(rendered):
    """Shared workers outlive routers: new worker settings must recreate the Ray pods."""

    def checksums(docs: list[dict]) -> set[str]:
        spec = one(docs, "RayCluster")["spec"]
        assert spec["upgradeStrategy"] == {"type": "Recreate"}
        pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
        return {p["template"]["metadata"]["annotations"]["pdserve.io/worker-settings"] for p in pods}  # fmt: skip

    (default,) = checksums(rendered["default"])
    assert checksums(render({"router": {"replicas": 3}})) == {default}
    (other,) = checksums(render({"engine": {"blockSize": 32}}))
    assert other != default


def test_multinode_mounts_the_model_pvc_everywhere(rendered):
    docs = rendered["multinode"]
    ray = one(docs, "RayCluster")["spec"]
    pods = [one(docs, "Deployment", "llm-pdserve-router")["spec"]["template"]["spec"]]
    pods += [ray["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in ray["workerGroupSpecs"]]
    for pod in pods:
        claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]  # fmt: skip
        assert claims == [{"claimName": "qwen3-30b-a3b-weights", "readOnly": True}]
        mounts = pod["containers"][0]["volumeMounts"]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in mounts
        assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]


def test_multinode_router_takes_the_api_key_from_the_secret(rendered):
    container = router_container(rendered["multinode"])
    (env,) = container["env"]
    assert env["name"] == "PDSERVE_API_KEY"
    assert env["valueFrom"]["secretKeyRef"] == {"name": "pdserve-api-key", "key": "api-key"}
    assert "replicas" not in one(rendered["multinode"], "Deployment", "llm-pdserve-router")["spec"]


def test_api_key_value_creates_a_secret():
    docs = render({"apiKey": {"value": "s3cret"}})
    for doc in docs:
        validate(doc)
    secret = one(docs, "Secret", "llm-pdserve-api-key")
    assert base64.b64decode(secret["data"]["api-key"]) == b"s3cret"
    (env,) = router_container(docs)["env"]
    assert env["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_cpu_only_aggregated_values():
    """gpusPerWorker 0 gives CPU pods with one worker slot; prefill 0 drops its group."""
    docs = render({"prefill": {"replicas": 0}, "decode": {"gpusPerWorker": 0, "replicas": 2}})
    for doc in docs:
        validate(doc)
    groups = worker_groups(docs)
    assert list(groups) == ["decode"]
    decode = groups["decode"]
    assert json.loads(json.loads(decode["rayStartParams"]["resources"])) == {"decode_gpu": 1}
    assert decode["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in decode["template"]["spec"]["containers"][0]["resources"]["limits"]  # fmt: skip
    assert {"--prefill=0", "--decode=2"} <= set(router_container(docs)["args"])


def test_gpus_per_worker_must_match_the_ep_size():
    """A worker is one pod and takes one GPU (one `<role>_gpu` unit) per EP rank."""
    with pytest.raises(
        helm_python.HelmRenderError, match=r"decode.gpusPerWorker=8 but decode.epSize=2"
    ):
        render({"decode": {"gpusPerWorker": 8, "epSize": 2}})
    cpu = worker_groups(render({"decode": {"gpusPerWorker": 0, "epSize": 2}}))["decode"]
    assert json.loads(json.loads(cpu["rayStartParams"]["resources"])) == {"decode_gpu": 2}


def test_every_value_is_documented_in_the_chart_readme():
    documented = set(re.findall(r"^\| `([^`]+)` \|", (CHART / "README.md").read_text(), re.M))
    missing = []

    def walk(prefix: str, node) -> None:
        if prefix in documented:
            return
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            missing.append(prefix)

    walk("", load(CHART / "values.yaml"))
    assert not missing, f"values not in deploy/helm/pdserve/README.md: {missing}"


def test_tensor_parallel_tp_size_sets_the_flags_and_the_gpus_per_worker():
    """`tpSize` per role: `--prefill-tp` / `--decode-tp` for the router, one GPU (one
    `<role>_gpu` unit) per rank checked at render time, and not together with EP."""
    docs = render({"prefill": {"tpSize": 2, "gpusPerWorker": 2}, "decode": {"tpSize": 4, "gpusPerWorker": 4}})  # fmt: skip
    for doc in docs:
        validate(doc)
    args = router_container(docs)["args"]
    assert {"--prefill-tp=2", "--decode-tp=4"} <= set(args)
    groups = worker_groups(docs)
    assert json.loads(json.loads(groups["decode"]["rayStartParams"]["resources"])) == {"decode_gpu": 4}  # fmt: skip
    limits = groups["decode"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 4
    config = serve_config_of(args)
    assert (config.prefill.engine.parallel.tp_size, config.decode.engine.parallel.tp_size) == (2, 4)
    with pytest.raises(
        helm_python.HelmRenderError,
        match=r"decode.gpusPerWorker=2 but decode.epSize=1 x tpSize=4 = 4 ranks",
    ):
        render({"decode": {"tpSize": 4, "gpusPerWorker": 2}})
    with pytest.raises(helm_python.HelmRenderError, match=r"tensor- or expert-parallel, not both"):
        render({"decode": {"tpSize": 2, "epSize": 2, "gpusPerWorker": 4}})
    assert not {a for a in router_container(render({}))["args"] if "-tp=" in a}
