"""Static checks of docker/: the compose file, the two worker images and their configuration.

No Docker engine is needed. ``docker compose config`` runs only where the compose plugin exists;
the rest parses the files (compose with PyYAML when it is installed) and checks the invariants that
matter in operation: workers scale (no fixed name, no published port), Redis persists and reports
health, every worker variable is a real ``QUEUEBERT_*`` setting, and both images run
``queuebert worker`` as a non-root user with a health check.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from queuebert.settings import ClientSettings, GatewaySettings, WorkerSettings, env_name

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"]
DASHBOARD_DOCKERFILE = DOCKER / "Dockerfile.dashboard"
WORKER_SERVICES = ["worker", "worker-gpu", "worker-rerank"]

#: Variables read outside the settings dataclasses, each with the file that reads it (checked below,
#: so this list cannot outlive the code).
EXTRA_ENV = {"QUEUEBERT_CACHE_DIR": ROOT / "modelbuild" / "default_model.py"}

SETTINGS_ENV = {env_name(f.name) for cls in (WorkerSettings, ClientSettings, GatewaySettings)
                for f in dataclasses.fields(cls)}
KNOWN_ENV = SETTINGS_ENV | set(EXTRA_ENV)


def unknown_env_names(names: list[str] | set[str]) -> list[str]:
    """Names that are not QUEUEBERT_* settings: a typo here would be silently ignored by the worker."""
    return sorted(n for n in names if not n.startswith("QUEUEBERT_") or n not in KNOWN_ENV)


# --------------------------------------------------------------------------------------------------
# Environment variable names
# --------------------------------------------------------------------------------------------------


def test_env_name_check_catches_typos() -> None:
    assert "QUEUEBERT_MAX_BATCH_TOKENS" in KNOWN_ENV and "QUEUEBERT_QUEUES" in KNOWN_ENV
    assert unknown_env_names(["QUEUEBERT_MAX_BATCH_TOKENS", "QUEUEBERT_MAX_BATCH_TOKEN",
                              "QUEUEBERT_QUEUE_NAMES", "REDIS_URL"]) == [
        "QUEUEBERT_MAX_BATCH_TOKEN", "QUEUEBERT_QUEUE_NAMES", "REDIS_URL"]


def test_extra_env_names_are_read_where_claimed() -> None:
    for name, path in EXTRA_ENV.items():
        assert name in path.read_text(encoding="utf-8"), f"{name} is no longer read by {path}"


# --------------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    result: list[tuple[str, str]] = []
    current = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            keyword, _, args = current.strip().partition(" ")
            result.append((keyword.upper(), args.strip()))
        current = ""
    return result


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_worker_as_non_root_with_healthcheck(path: Path) -> None:
    assert path.is_file(), f"{path} is missing"
    ins = instructions(path)
    kinds = [k for k, _ in ins]
    assert kinds.count("FROM") >= 1

    healthchecks = [a for k, a in ins if k == "HEALTHCHECK"]
    assert healthchecks, "no HEALTHCHECK"
    check = healthchecks[-1]
    assert "/metrics" in check and "QUEUEBERT_METRICS_PORT" in check and "urllib" in check, check

    users = [a for k, a in ins if k == "USER"]
    assert users, "no USER: the worker would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"last USER is {users[-1]!r}"
    assert kinds.index("HEALTHCHECK") > 0 and max(i for i, k in enumerate(kinds) if k == "USER") < \
        max(i for i, k in enumerate(kinds) if k in {"ENTRYPOINT", "CMD"}), "USER must come before the entrypoint"

    entrypoint = [exec_form(a) for k, a in ins if k == "ENTRYPOINT"]
    cmd = [exec_form(a) for k, a in ins if k == "CMD"]
    argv = (entrypoint[-1] if entrypoint else []) + (cmd[-1] if cmd else [])
    assert argv[:2] == ["queuebert", "worker"], f"the image runs {argv}, not `queuebert worker`"

    env_names = {m.group(1) for k, a in ins if k == "ENV" for m in re.finditer(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=", a)}
    assert unknown_env_names({n for n in env_names if n.startswith("QUEUEBERT_")}) == []
    assert {"QUEUEBERT_CACHE_DIR", "QUEUEBERT_METRICS_PORT"} <= env_names

    run = " ".join(a for k, a in ins if k == "RUN")
    assert "queuebert model build-default" in run and "BUILD_DEFAULT_MODEL" in run
    assert any(k == "ARG" and a.startswith("TORCH_VERSION=") for k, a in ins)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_every_package(path: Path) -> None:
    """The image installs from the packages it COPYs: one missing from them installs fine and
    fails at the first import."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    copied = {a.split()[0].rstrip("/") for k, a in instructions(path) if k == "COPY"}
    top = {p.split(".")[0] for p in packages}
    assert top <= copied, f"{path.name} does not COPY {sorted(top - copied)}"


def test_dashboard_image_installs_the_tested_versions() -> None:
    """docker/Dockerfile.dashboard installs rq, redis, rq-dashboard and six as pyproject.toml pins
    them (its selection step is run here on this pyproject), runs the `rq-dashboard` CLI, whose
    options are read from RQ_DASHBOARD_* variables (RQ_DASHBOARD_JSON among them), not as root."""
    import sys

    pytest.importorskip("tomllib", reason="the image's selection step needs Python 3.11's tomllib")
    ins = instructions(DASHBOARD_DOCKERFILE)
    (select,) = [m.group(1) for k, a in ins if k == "RUN" for m in re.finditer(r'python -c "(.*?)" >', a)]
    done = subprocess.run([sys.executable, "-c", select.replace("/tmp/pyproject.toml", str(ROOT / "pyproject.toml"))],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    names = {re.split(r"[^A-Za-z0-9._-]", r, maxsplit=1)[0].lower(): r for r in done.stdout.split()}
    assert set(names) == {"rq", "redis", "rq-dashboard", "six"}, done.stdout
    assert any(k == "COPY" and a.split()[0] == "pyproject.toml" for k, a in ins)

    entrypoint = [exec_form(a) for k, a in ins if k == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1] == ["rq-dashboard"], entrypoint
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, users
    assert [a for k, a in ins if k == "HEALTHCHECK"], "no HEALTHCHECK"


def test_cuda_image_defaults_to_cuda() -> None:
    ins = instructions(DOCKER / "Dockerfile.cuda")
    assert any(k == "ENV" and "QUEUEBERT_DEVICE=cuda" in a for k, a in ins)
    cpu = instructions(DOCKER / "Dockerfile.cpu")
    assert any(k == "ARG" and a.startswith("TORCH_INDEX_URL=") and "/whl/cpu" in a for k, a in cpu)


# --------------------------------------------------------------------------------------------------
# compose.yaml
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed; compose.yaml is not parsed")
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def test_redis_persists_and_reports_health(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert str(redis["image"]).startswith("redis:7")
    cmd = command_text(redis)
    assert re.search(r"--appendonly\s+yes", cmd), cmd
    assert re.search(r"--appendfsync\s+everysec", cmd), cmd
    assert any(str(v).split(":")[-1] == "/data" for v in redis.get("volumes", [])), "no volume on /data"
    assert any(str(v).split(":")[0] in (compose.get("volumes") or {}) for v in redis["volumes"]), \
        "redis data is not on a named volume"
    test = redis["healthcheck"]["test"]
    assert "redis-cli ping" in (" ".join(test) if isinstance(test, list) else test)
    assert any(str(p).endswith("6379:6379") for p in redis.get("ports", [])), "6379 not published for host producers"


@pytest.mark.parametrize("name", WORKER_SERVICES)
def test_worker_scales_and_is_configured_by_env_only(compose: dict[str, Any], name: str) -> None:
    worker = compose["services"][name]
    assert "container_name" not in worker, "a fixed container_name breaks --scale"
    assert not worker.get("ports"), "a published host port breaks --scale"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker.get("healthcheck", {}).get("test"), "no healthcheck"
    assert worker.get("restart") == "unless-stopped"
    assert worker.get("stop_grace_period"), "SIGTERM finishes the batch in progress: give it time"
    assert not worker.get("command") and not worker.get("entrypoint"), "configure through the environment"
    assert worker["build"]["context"] == ".."

    env = environment(worker)
    assert env, "no environment"
    assert unknown_env_names(set(env)) == [], f"{name}: unknown variables (typos?)"
    assert env["QUEUEBERT_REDIS_URL"].startswith("redis://redis:")
    assert "QUEUEBERT_METRICS_PORT" in env


def test_worker_images_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["worker"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert not services["worker"].get("profiles"), "the CPU worker starts by default"
    gpu = services["worker-gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert gpu["profiles"] == ["gpu"]
    assert environment(gpu)["QUEUEBERT_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    dashboard = services["rq-dashboard"]
    assert dashboard["profiles"] == ["dashboard"]
    assert dashboard["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.dashboard"}
    assert "RQ_DASHBOARD_REDIS_URL" in environment(dashboard)
    # queuebert's jobs are JSON; without the switch rq-dashboard unpickles them (tests/test_dashboard.py).
    assert str(environment(dashboard).get("RQ_DASHBOARD_JSON")).lower() == "true"


# --------------------------------------------------------------------------------------------------
# docker compose config (only with the compose plugin)
# --------------------------------------------------------------------------------------------------


def _compose_plugin() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    try:
        done = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return docker if done.returncode == 0 else None


def test_docker_compose_config_validates() -> None:
    docker = _compose_plugin()
    if docker is None:
        pytest.skip("no docker CLI with the compose plugin (`docker compose version` fails); "
                    "compose.yaml was only checked statically")
    for profiles in ([], ["--profile", "gpu", "--profile", "dashboard"]):
        done = subprocess.run([docker, "compose", "-f", str(COMPOSE), *profiles, "config", "--quiet"],
                              capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert done.returncode == 0, f"docker compose config {profiles}: {done.stderr}"


def test_gateway_image_serves_without_torch_as_non_root() -> None:
    """The gateway image: `queuebert serve` from the project with the http extra only (a producer
    needs no torch), every package copied, a non-root user, env names that are real settings."""
    import tomllib

    path = ROOT / "docker" / "Dockerfile.gateway"
    ins = instructions(path)
    run = " ".join(a for k, a in ins if k == "RUN")
    assert '".[http]"' in run and "worker]" not in run and "torch" not in run
    entrypoint = [exec_form(a) for k, a in ins if k == "ENTRYPOINT"][-1]
    assert entrypoint == ["queuebert", "serve"]
    assert [a for k, a in ins if k == "USER"][-1] not in {"root", "0"}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    copied = {w.rstrip("/") for k, a in ins if k == "COPY" for w in a.split()[:-1]}
    assert {p.split(".")[0] for p in packages} <= copied
    env_names = {m.group(1) for k, a in ins if k == "ENV" for m in re.finditer(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=", a)}
    assert unknown_env_names({n for n in env_names if n.startswith("QUEUEBERT_")}) == []


def test_compose_gateway_service(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert gateway["build"]["dockerfile"] == "docker/Dockerfile.gateway"
    assert gateway["environment"]["QUEUEBERT_REDIS_URL"] == "redis://redis:6379/0"
    assert unknown_env_names(set(gateway["environment"])) == []
    assert any(str(p).startswith("127.0.0.1:") for p in gateway["ports"])
