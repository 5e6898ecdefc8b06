"""The packaging files (Dockerfile, docker-compose.yaml, pgAdmin's servers.json) agree
with the application: its environment variables, its port and its health endpoint."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.entrypoint import command_line
from service.settings import ENV_VARS, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SERVERS_JSON = ROOT / "docker" / "pgadmin" / "servers.json"
ENV_EXAMPLE = ROOT / ".env.example"

INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?+][^}]*)?\}")


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    services = load_compose()["services"]
    assert name in services, f"no service {name!r} in docker-compose.yaml"
    svc = services[name]
    assert isinstance(svc, dict)
    return svc


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def healthcheck_command(svc: dict[str, Any]) -> str:
    test = svc["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(str(part) for part in test)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    if current:
        joined.append(current)
    result = []
    for line in joined:
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "Dockerfile has no FROM"
    return instructions[starts[-1] :]


def instruction_args(keyword: str) -> list[str]:
    return [args for kw, args in final_stage() if kw == keyword]


def exec_form(args: str) -> list[str]:
    if args.startswith("["):
        parsed = json.loads(args)
        assert isinstance(parsed, list)
        return [str(part) for part in parsed]
    return shlex.split(args)


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def resolve_default(value: str) -> str:
    """The value compose gives `${VAR:-default}` when VAR is unset."""
    match = re.fullmatch(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", value)
    return match.group(1) if match else value


# --- docker-compose.yaml ---------------------------------------------------------------


def test_compose_has_no_version_key_and_expected_services() -> None:
    data = load_compose()
    assert "version" not in data
    assert {"db", "etl", "pgadmin", "dask-scheduler", "dask-worker"} <= set(data["services"])
    assert {"pgdata", "spill"} <= set(data["volumes"])


def test_etl_environment_keys_are_known_to_the_app() -> None:
    env = environment(service("etl"))
    app_keys = {k for k in env if k.startswith("ETL_") or k == "DATABASE_URL"}
    assert "DATABASE_URL" in app_keys
    unknown = app_keys - set(ENV_VARS)
    assert not unknown, f"etl service sets variables the app never reads: {sorted(unknown)}"


def test_etl_database_url_points_at_the_db_service() -> None:
    url = environment(service("etl"))["DATABASE_URL"]
    assert re.fullmatch(
        r"postgresql://\$\{POSTGRES_USER[^}]*\}:\$\{POSTGRES_PASSWORD[^}]*\}"
        r"@db:5432/\$\{POSTGRES_DB[^}]*\}",
        url,
    ), url


def test_etl_port_agrees_with_settings_and_dockerfile() -> None:
    etl = service("etl")
    env_port = int(environment(etl)["ETL_PORT"])
    container_ports = {
        int(str(mapping).rsplit(":", 1)[-1].split("/")[0]) for mapping in etl["ports"]
    }
    exposed = {
        int(port.split("/")[0]) for args in instruction_args("EXPOSE") for port in args.split()
    }
    assert container_ports == {env_port}
    assert env_port == Settings().port == 8080
    assert exposed == {env_port}


def test_etl_mounts_sample_data_read_only_at_data_dir() -> None:
    etl = service("etl")
    data_dir = environment(etl)["ETL_DATA_DIR"]
    assert f"./data:{data_dir}:ro" in etl["volumes"]


def test_etl_healthcheck_hits_healthz_with_python_stdlib() -> None:
    command = healthcheck_command(service("etl"))
    assert "/healthz" in command
    assert "urllib.request" in command
    assert "curl" not in command and "wget" not in command


def test_db_has_pg_isready_healthcheck_and_etl_waits_for_it() -> None:
    db = service("db")
    assert "pg_isready" in healthcheck_command(db)
    assert service("etl")["depends_on"]["db"]["condition"] == "service_healthy"
    assert service("pgadmin")["depends_on"]["db"]["condition"] == "service_healthy"
    assert "pgdata:/var/lib/postgresql/data" in db["volumes"]


def test_pgadmin_is_only_in_tools_profile() -> None:
    services = load_compose()["services"]
    assert services["pgadmin"]["profiles"] == ["tools"]
    assert all("profiles" not in services[name] for name in ("db", "etl"))


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def test_dask_profile_runs_a_scheduler_and_two_workers_the_etl_service_can_use() -> None:
    scheduler, worker = service("dask-scheduler"), service("dask-worker")
    assert scheduler["profiles"] == worker["profiles"] == ["dask"]
    assert scheduler["image"] == worker["image"] == service("etl")["image"]
    argv = command(scheduler)
    assert argv[:2] == ["dask", "scheduler"] and "--no-dashboard" in argv
    port = argv[argv.index("--port") + 1]
    worker_argv = command(worker)
    assert worker_argv[:3] == ["dask", "worker", f"tcp://dask-scheduler:{port}"]
    assert worker_argv[worker_argv.index("--nthreads") + 1] == "1"
    assert worker["deploy"]["replicas"] == 2
    assert worker["depends_on"]["dask-scheduler"]["condition"] == "service_healthy"
    assert "socket" in healthcheck_command(scheduler)
    assert "ETL_DASK_SCHEDULER" in ENV_VARS
    assert environment(service("etl"))["ETL_DASK_SCHEDULER"] == "${ETL_DASK_SCHEDULER:-}"
    usage = f"ETL_DASK_SCHEDULER=tcp://dask-scheduler:{port} docker compose --profile dask"
    assert usage in COMPOSE_FILE.read_text(encoding="utf-8")


def test_dask_workers_see_the_input_and_spill_directory_at_the_etl_paths() -> None:
    etl, worker = service("etl"), service("dask-worker")
    env = environment(etl)
    spill = env["ETL_TMP_DIR"]
    for mount in (f"spill:{spill}", f"./data:{env['ETL_DATA_DIR']}:ro"):
        assert mount in etl["volumes"] and mount in worker["volumes"], mount
    # The image creates the spill directory for its non-root user, so the named volume
    # starts out writable by it.
    runs = " ".join(args for kw, args in final_stage() if kw == "RUN")
    assert f"install -d -o etl -g etl {spill}" in runs


def test_no_password_literal_in_compose() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for secret in {v for k, v in env_example().items() if "PASSWORD" in k and v}:
        assert secret not in text
    for name, svc in load_compose()["services"].items():
        for key, value in environment(svc).items():
            if "PASSWORD" in key:
                assert re.fullmatch(rf"\$\{{{key}:\?[^}}]+\}}", value), f"{name}.{key}={value!r}"
    url = environment(service("etl"))["DATABASE_URL"]
    userinfo = re.match(r"postgresql://(\$\{[^}]+\}):(\$\{[^}]+\})@", url)
    assert userinfo, url
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?[^}]+\}", userinfo.group(2)), url


def test_env_example_defines_every_required_variable() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    required = {m.group(1) for m in re.finditer(r"\$\{([A-Z0-9_]+):\?", text)}
    assert required >= {"POSTGRES_PASSWORD", "PGADMIN_DEFAULT_PASSWORD"}
    example = env_example()
    assert required <= {k for k, v in example.items() if v}
    assert set(INTERPOLATION.findall(text)) <= set(example)


# --- docker/pgadmin/servers.json -------------------------------------------------------


def test_pgadmin_servers_json_points_at_db_service() -> None:
    servers = json.loads(SERVERS_JSON.read_text(encoding="utf-8"))["Servers"]
    assert len(servers) == 1
    (server,) = servers.values()
    compose = load_compose()
    db = compose["services"]["db"]
    assert server["Host"] == "db" and server["Host"] in compose["services"]
    assert server["Port"] == 5432
    db_env = environment(db)
    assert server["MaintenanceDB"] == resolve_default(db_env["POSTGRES_DB"])
    assert server["Username"] == resolve_default(db_env["POSTGRES_USER"])
    assert server["MaintenanceDB"] == env_example()["POSTGRES_DB"]
    assert server["Username"] == env_example()["POSTGRES_USER"]
    mounts = service("pgadmin")["volumes"]
    assert "./docker/pgadmin/servers.json:/pgadmin4/servers.json:ro" in mounts


# --- Dockerfile ------------------------------------------------------------------------


def test_dockerfile_runs_as_non_root_user() -> None:
    users = instruction_args("USER")
    assert users, "final stage has no USER"
    user = users[-1].split(":", 1)[0]
    assert user not in {"root", "0", ""}


def test_dockerfile_healthcheck_hits_healthz() -> None:
    (healthcheck,) = instruction_args("HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert f":{Settings().port}/healthz" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck


def test_dockerfile_entrypoint_serves_by_default_and_runs_given_flags() -> None:
    (entrypoint,) = instruction_args("ENTRYPOINT")
    assert exec_form(entrypoint) == ["python", "-m", "service.entrypoint"]
    (cmd,) = instruction_args("CMD")
    assert command_line(exec_form(cmd)) == ["serve"]  # on ETL_HOST:ETL_PORT from ENV


def test_dockerfile_bundles_the_sample_where_the_challenge_command_reads_it() -> None:
    """`docker run IMAGE -d /data ...` finds the sample without a volume."""
    copies = [exec_form(args) for args in instruction_args("COPY")]
    assert ["data/", "/data/"] in copies


@pytest.mark.parametrize(
    ("key", "expected"),
    [("ETL_DATA_DIR", "/data"), ("ETL_HOST", "0.0.0.0"), ("ETL_PORT", "8080")],
)
def test_dockerfile_env_defaults(key: str, expected: str) -> None:
    assignments = " ".join(instruction_args("ENV"))
    values = dict(part.split("=", 1) for part in shlex.split(assignments) if "=" in part)
    assert key in ENV_VARS
    assert values.get(key) == expected


def test_dockerfile_final_stage_installs_only_wheels() -> None:
    stage = final_stage()
    assert stage[0][1].startswith("python:3.11-slim-bookworm")
    runs = " ".join(args for kw, args in stage if kw == "RUN")
    assert "apt-get" not in runs
    assert "pip install --no-cache-dir --no-index" in runs
    assert "[test]" not in runs
