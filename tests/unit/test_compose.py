"""The deployment files agree with the code: every command that docker-compose.yml and the
Dockerfile run is a real `tuneforge` subcommand, every TUNEFORGE_* variable they set is a real
setting, each worker and each API replica (which hosts an inference engine) reserves its own pinned
GPU, they share no filesystem (only PostgreSQL and the SeaweedFS bucket), the load balancer routes
to every replica with readiness checks and a consistent hash on the model, and migrations run once
before any of them starts."""

import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import typer
import yaml
from sqlalchemy.engine import make_url

from app.cli import app as cli_app
from app.core.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
DOCKERFILE = REPO / "Dockerfile"
ENV_PREFIX = "TUNEFORGE_"


# --- helpers -----------------------------------------------------------------------------------


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def as_argv(command) -> list[str]:
    """A compose `command`/`entrypoint` or a Dockerfile CMD, as an argv list."""
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(part) for part in command]


def subcommands(command) -> dict | None:
    """A command group's subcommands by name, None for a plain command. (Duck-typed: recent typer
    builds its commands on a vendored click, so they are not `click.Group` instances.)"""
    commands = getattr(command, "commands", None)
    return commands if isinstance(commands, dict) else None


def resolve_subcommand(argv: list[str]) -> str:
    """Follow `tuneforge <group> <command> ...` through the command tree that typer builds from
    the real CLI and return the path (e.g. "keys create"); fail on any name the CLI lacks."""
    assert argv, "no command given"
    assert Path(argv[0]).name == "tuneforge", f"{argv!r} does not run the tuneforge command"
    command = typer.main.get_command(cli_app)
    assert subcommands(command), "the tuneforge CLI has no subcommands"
    path: list[str] = []
    for word in argv[1:]:
        children = subcommands(command)
        if children is None or word.startswith("-"):
            break
        assert word in children, (
            f"'tuneforge {' '.join([*path, word])}' is not a tuneforge command; known: {sorted(children)}"
        )
        command, path = children[word], [*path, word]
    assert path and subcommands(command) is None, (
        f"{argv!r} does not name a tuneforge command (stops at 'tuneforge {' '.join(path)}')"
    )
    return " ".join(path)


def subcommand_name(argv: list[str]) -> str:
    return resolve_subcommand(argv)


def env_mapping(environment) -> dict[str, str]:
    """Compose `environment` as a dict, whether written as a mapping or as a list of NAME=VALUE."""
    if environment is None:
        return {}
    if isinstance(environment, dict):
        return {str(k): "" if v is None else str(v) for k, v in environment.items()}
    out = {}
    for item in environment:
        name, _, value = str(item).partition("=")
        out[name] = value
    return out


def assert_known_settings(names, where: str) -> None:
    fields = {name.lower() for name in Settings.model_fields}
    unknown = [
        n for n in names if n.upper().startswith(ENV_PREFIX) and n[len(ENV_PREFIX) :].lower() not in fields
    ]
    assert not unknown, f"{where} sets {unknown}, which are not fields of app.core.settings.Settings"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    logical, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        logical.append(current)
        current = ""
    if current:
        logical.append(current)
    out = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_exec_form(args: str) -> list[str]:
    args = args.strip()
    if args.startswith("["):
        return as_argv(yaml.safe_load(args))  # JSON array; YAML reads JSON
    return shlex.split(args)


def dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, args in dockerfile_instructions():
        if keyword != "ENV":
            continue
        words = shlex.split(args)
        if words and "=" not in words[0]:  # legacy form: ENV NAME value
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            name, _, value = word.partition("=")
            env[name] = value
    return env


def dockerfile_argv() -> list[str]:
    """What the image runs by default: ENTRYPOINT + CMD (the last of each wins)."""
    entrypoint, cmd = [], []
    for keyword, args in dockerfile_instructions():
        if keyword == "ENTRYPOINT":
            entrypoint = dockerfile_exec_form(args)
        elif keyword == "CMD":
            cmd = dockerfile_exec_form(args)
    return [*entrypoint, *cmd]


def project_services(compose: dict) -> dict[str, dict]:
    """Services that run the Tuneforge image: those built from this repository, and any other
    service using the image they build."""
    services = compose["services"]
    built_images = {s.get("image") for s in services.values() if "build" in s} - {None}
    return {
        name: s
        for name, s in services.items()
        if "build" in s or (s.get("image") is not None and s.get("image") in built_images)
    }


def service_argv(service: dict) -> list[str]:
    """What a service runs: its entrypoint/command, falling back to the image's."""
    image_entrypoint, image_cmd = [], []
    for keyword, args in dockerfile_instructions():
        if keyword == "ENTRYPOINT":
            image_entrypoint = dockerfile_exec_form(args)
        elif keyword == "CMD":
            image_cmd = dockerfile_exec_form(args)
    if "entrypoint" in service:
        # Setting entrypoint in compose also clears the image's CMD.
        return [*as_argv(service["entrypoint"]), *as_argv(service.get("command"))]
    command = as_argv(service["command"]) if "command" in service else image_cmd
    return [*image_entrypoint, *command]


def services_running(compose: dict, subcommand: str) -> list[str]:
    return [
        name
        for name, s in project_services(compose).items()
        if subcommand_name(service_argv(s)) == subcommand
    ]


def the_service_running(compose: dict, subcommand: str) -> str:
    names = services_running(compose, subcommand)
    assert len(names) == 1, f"expected one service running 'tuneforge {subcommand}', found {names}"
    return names[0]


def data_dir_in_container(service: dict) -> str:
    env = {**dockerfile_env(), **env_mapping(service.get("environment"))}
    data_dir = env.get("TUNEFORGE_DATA_DIR")
    assert data_dir and data_dir.startswith("/"), (
        "the container's TUNEFORGE_DATA_DIR must be an absolute path (on the data volume)"
    )
    return data_dir


def named_volume_at(compose: dict, service: dict, target: str) -> str | None:
    for mount in service.get("volumes", []):
        if isinstance(mount, str):
            parts = mount.split(":")
            source, dest = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
        else:
            source, dest = mount.get("source"), mount.get("target")
        if dest and dest.rstrip("/") == target.rstrip("/"):
            if source in (compose.get("volumes") or {}):
                return source
            return None
    return None


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def gpu_device_ids(service: dict) -> list[str]:
    """The GPU ids a service reserves by device_ids (a `count` reservation pins none)."""
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get(
        "devices"
    ) or []
    return [
        str(i) for d in devices if "gpu" in (d.get("capabilities") or []) for i in d.get("device_ids") or []
    ]


def haproxy_sections() -> dict[str, list[str]]:
    """'backend api' -> its directive lines, comments dropped."""
    sections, current = {}, None
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = sections.setdefault(line.strip(), [])
        elif current is not None:
            current.append(line.strip())
    return sections


# --- tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def test_compose_has_the_services_of_the_design(compose):
    assert {"postgres", "seaweedfs", "migrate", "lb"} <= set(compose["services"])
    assert len(services_running(compose, "api")) >= 2, "several API replicas behind the load balancer"
    assert len(services_running(compose, "worker")) >= 2, "one worker per GPU"


def test_every_project_service_runs_a_real_tuneforge_subcommand(compose):
    for name, service in project_services(compose).items():
        argv = service_argv(service)
        try:
            resolve_subcommand(argv)
        except AssertionError as exc:
            raise AssertionError(f"service {name!r}: {exc}") from None


def test_every_tuneforge_variable_in_compose_is_a_setting(compose):
    for name, service in compose["services"].items():
        assert_known_settings(env_mapping(service.get("environment")), f"service {name!r}")


def test_compose_database_url_points_at_the_postgres_service(compose):
    postgres = compose["services"]["postgres"]
    pg_env = env_mapping(postgres.get("environment"))
    for name, service in project_services(compose).items():
        url = make_url(env_mapping(service.get("environment"))["TUNEFORGE_DATABASE_URL"])
        assert url.drivername == "postgresql+psycopg", name
        assert url.host == "postgres" and (url.port or 5432) == 5432, name
        assert url.username == pg_env["POSTGRES_USER"], name
        assert url.password == pg_env["POSTGRES_PASSWORD"], name
        assert url.database == pg_env.get("POSTGRES_DB", pg_env["POSTGRES_USER"]), name


def test_postgres_has_a_readiness_check_and_a_volume(compose):
    postgres = compose["services"]["postgres"]
    assert "pg_isready" in " ".join(as_argv(postgres["healthcheck"]["test"]))
    assert named_volume_at(compose, postgres, "/var/lib/postgresql/data")


def test_every_worker_and_api_replica_has_its_own_pinned_gpu(compose):
    taken = {}
    for subcommand in ("worker", "api"):
        for name in services_running(compose, subcommand):
            ids = gpu_device_ids(compose["services"][name])
            assert len(ids) == 1, f"'{name}' must pin exactly one GPU with device_ids, not {ids}"
            assert ids[0] not in taken, f"'{name}' and '{taken.get(ids[0])}' both pin GPU {ids[0]}"
            taken[ids[0]] = name


def test_no_filesystem_is_shared_only_postgres_and_the_bucket(compose):
    services = compose["services"]
    seaweedfs = services["seaweedfs"]
    s3_env = env_mapping(seaweedfs.get("environment"))
    assert "-s3" in as_argv(seaweedfs["command"]) and named_volume_at(compose, seaweedfs, "/data")
    assert "/healthz" in " ".join(as_argv(seaweedfs["healthcheck"]["test"]))
    volumes = {}
    for name in services_running(compose, "api") + services_running(compose, "worker"):
        service = services[name]
        env = env_mapping(service.get("environment"))
        assert env["TUNEFORGE_STORAGE_URL"].startswith("s3://"), name
        assert urlparse(env["TUNEFORGE_S3_ENDPOINT_URL"]).hostname == "seaweedfs", name
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[variable] == s3_env[variable], f"'{name}' and seaweedfs disagree on {variable}"
        assert depends_on(service).get("seaweedfs") == "service_healthy", name
        volume = named_volume_at(compose, service, data_dir_in_container(service))
        if volume:
            assert volume not in volumes, f"'{name}' and '{volumes[volume]}' share the volume {volume}"
            volumes[volume] = name


def test_migrations_run_once_before_api_and_worker(compose):
    migrate_name = the_service_running(compose, "migrate")
    migrate = compose["services"][migrate_name]
    assert str(migrate.get("restart", "no")) == "no", "the migration is a one-shot service"
    assert depends_on(migrate).get("postgres") == "service_healthy"
    for subcommand in ("api", "worker"):
        for name in services_running(compose, subcommand):
            deps = depends_on(compose["services"][name])
            assert deps.get(migrate_name) == "service_completed_successfully", (
                f"'{name}' must wait for '{migrate_name}' to complete successfully"
            )


def test_api_replicas_listen_inside_and_check_readiness(compose):
    for name in services_running(compose, "api"):
        api = compose["services"][name]
        env = {**dockerfile_env(), **env_mapping(api.get("environment"))}
        assert env.get("TUNEFORGE_HOST") == "0.0.0.0", f"'{name}' must listen on all interfaces"
        assert env.get("TUNEFORGE_PORT", str(Settings.model_fields["port"].default)) == "8000", name
        assert "/readyz" in " ".join(as_argv(api["healthcheck"]["test"])), name
        assert not api.get("ports"), f"'{name}' is reached through the load balancer only"


def test_the_load_balancer_routes_to_every_replica_by_model_with_readiness_checks(compose):
    lb = compose["services"]["lb"]
    assert any(str(p).split(":")[-1] == "8000" for p in lb.get("ports", [])), lb.get("ports")
    mounted = [str(m).split(":")[0] for m in lb.get("volumes", [])]
    assert "./deploy/haproxy.cfg" in mounted
    backend = haproxy_sections()["backend api"]
    servers = {line.split()[2].split(":")[0] for line in backend if line.startswith("server ")}
    assert servers == set(services_running(compose, "api")), "one haproxy server per API replica"
    assert set(depends_on(lb)) == servers
    assert "balance hash req.body,json_query('$.model')" in backend
    assert "hash-type consistent" in backend and "option http-buffer-request" in backend
    assert "option httpchk GET /readyz" in backend
    assert any(line.startswith("default-server check") for line in backend)


def test_dockerfile_default_command_is_a_real_subcommand():
    argv = dockerfile_argv()
    assert argv, "the Dockerfile has no CMD/ENTRYPOINT"
    resolve_subcommand(argv)


def test_dockerfile_sets_only_real_settings():
    env = dockerfile_env()
    assert_known_settings(env, "the Dockerfile")
    assert env.get("TUNEFORGE_DATA_DIR") == "/data"
    assert env.get("TUNEFORGE_HOST") == "0.0.0.0"


def test_dockerfile_runs_as_a_non_root_user():
    users = [args for keyword, args in dockerfile_instructions() if keyword == "USER"]
    assert users, "the Dockerfile must switch to a non-root user"
    assert re.split(r"[:\s]", users[-1])[0] not in ("root", "0")


# --- the checks above must catch mistakes --------------------------------------------------------


def test_a_bogus_subcommand_is_caught():
    assert resolve_subcommand(["tuneforge", "keys", "create", "--tenant", "acme"]) == "keys create"
    for argv in (
        ["tuneforge", "serve"],
        ["tuneforge", "keys", "rotate"],
        ["tuneforge", "keys"],
        ["tuneforge"],
        ["python", "-m", "app.cli", "api"],
    ):
        with pytest.raises(AssertionError):
            resolve_subcommand(argv)


def test_a_bogus_setting_is_caught():
    assert_known_settings({"TUNEFORGE_DATA_DIR": "/data", "PATH": "/bin"}, "ok")
    with pytest.raises(AssertionError):
        assert_known_settings({"TUNEFORGE_NO_SUCH_SETTING": "1"}, "bogus")
