"""Read-only request paths (API-key lookup, model listing) never wait for the SQLite write lock,
and key revocation still takes effect on the very next request. `tuneforge api` on a real port."""

import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
from sqlalchemy import text

from app.core.db import get_read_sessionmaker, get_sessionmaker
from tests.conftest import link_base_model, running_api, tuneforge

BASE = "SmolLM2-135M-Instruct"
LOCK_HELD_S = 3.0
FAST_S = 1.0

# Another process that takes the SQLite write lock, writes, and sits on it before committing.
LOCK_HOLDER = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
c.execute("BEGIN IMMEDIATE")
c.execute("UPDATE api_keys SET prefix = prefix")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("COMMIT")
"""


def sqlite_path(settings) -> str:
    return settings.resolved_database_url.removeprefix("sqlite:///")


def new_key(tenant: str = "acme") -> str:
    return tuneforge("keys", "create", "--tenant", tenant).stdout.strip().splitlines()[-1]


def timed_get(url: str, key: str | None) -> tuple[httpx.Response, float]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    start = time.monotonic()
    r = httpx.get(url, headers=headers, timeout=30)
    return r, time.monotonic() - start


@pytest.fixture
def api(settings, base_model_dir):
    link_base_model(settings.data_dir, base_model_dir)
    key = new_key()
    with running_api({}) as url:
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        yield url, key


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_reads_answer_while_another_process_holds_the_sqlite_write_lock(settings, api):
    url, key = api
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, sqlite_path(settings), str(LOCK_HELD_S)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        listing, listing_s = timed_get(f"{url}/v1/models", key)
        base, base_s = timed_get(f"{url}/v1/models/{BASE}", key)
        bad, bad_s = timed_get(f"{url}/v1/models", "tf-not-a-key")
        # The lock was held for the whole time: the answers did not simply outlast it.
        assert holder.poll() is None
    finally:
        holder.wait(timeout=30)
    assert holder.returncode == 0
    assert listing.status_code == 200 and BASE in [m["id"] for m in listing.json()["data"]]
    assert base.status_code == 200 and base.json()["id"] == BASE
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    assert max(listing_s, base_s, bad_s) < FAST_S, (listing_s, base_s, bad_s)


def test_revoked_key_is_refused_on_the_next_request(settings, api):
    url, _ = api
    key = new_key("globex")
    for _ in range(3):
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    listing = tuneforge("keys", "list", "--tenant", "globex").stdout
    key_id = next(line.split("\t")[0] for line in listing.splitlines() if key[:10] in line)
    tuneforge("keys", "revoke", key_id)
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_only_read_sessions_leave_the_sqlite_write_lock_free(settings):
    """Read-then-write transactions keep BEGIN IMMEDIATE; read-only ones start deferred."""

    def other_writer_can_lock() -> bool:
        other = sqlite3.connect(sqlite_path(settings), isolation_level=None, timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError as exc:
            assert "locked" in str(exc)
            return False
        finally:
            other.close()

    with get_sessionmaker()() as session, session.begin():
        session.execute(text("SELECT 1"))
        assert not other_writer_can_lock()
    with get_read_sessionmaker()() as session, session.begin():
        session.execute(text("SELECT 1"))
        assert other_writer_can_lock()
    assert other_writer_can_lock()


def test_read_sessions_read_committed_data(settings):
    """The read-only session factory works on both backends and sees what writers committed."""
    with get_sessionmaker()() as session, session.begin():
        session.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('org_r', 'reader', 1)"))
    with get_read_sessionmaker()() as session:
        assert session.execute(text("SELECT name FROM tenants WHERE id = 'org_r'")).scalar_one() == "reader"
