"""Both artifact store backends, the data dir and S3 on a real SeaweedFS: streaming puts and gets,
publishing with the manifest last, the fenced publish leaving no row on a failure, the sweep, the
files API, and the API replicas' verified adapter cache."""

import hashlib
import json
import os
import time

import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from app.core.adapter_cache import AdapterCache
from app.core.adapter_files import AdapterFileError, AdapterGone
from app.core.artifacts import WEIGHTS_FILE, write_manifest
from app.core.db import get_sessionmaker, session_scope
from app.core.storage import MANIFEST, ArtifactMissing, LocalStore, S3Store, open_store
from app.models import Checkpoint, File, Model
from app.services.storage_gc import sweep
from tests.conftest import tuneforge
from tests.worker_support import ARITHMETIC, create_file, create_job, create_tenant, get_job
from worker import faults, store
from worker.fence import Fence
from worker.loop import claim_job


def noop_adapter(directory, name: str) -> None:
    """An adapter-shaped directory whose weights (and so version) differ by `name`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / WEIGHTS_FILE).write_bytes(f"weights of {name}".encode())
    (directory / "adapter_config.json").write_text("{}")


def noop_checkpoint(directory, name: str, step: int) -> None:
    noop_adapter(directory / "adapter", f"{name}-{step}")
    (directory / "state").mkdir()
    (directory / "state" / "trainer_state.json").write_text(json.dumps({"step": step}))


def big_file(path, mib: int) -> str:
    """`mib` MiB of varied bytes (more than one multipart part); returns their sha256."""
    block = hashlib.sha256(b"x").digest() * (1 << 15)  # 1 MiB
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(mib):
            chunk = i.to_bytes(4, "little") + block[4:]
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def test_the_url_picks_the_backend(store_settings):
    artifacts = open_store(store_settings)
    assert isinstance(artifacts, S3Store if store_settings.storage_url.startswith("s3://") else LocalStore)


def test_a_large_file_goes_up_and_comes_back_in_chunks(store_settings, tmp_path):
    artifacts = open_store(store_settings)
    tmp = artifacts.temp_dir("files/big.bin") / "big.bin"
    expected = big_file(tmp, 40)  # above the 16 MiB multipart threshold
    artifacts.publish_file(tmp, "files/big.bin")

    chunks = list(artifacts.iter_bytes("files/big.bin"))
    assert max(len(c) for c in chunks) <= 1 << 20
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == expected
    [listed] = artifacts.list_objects("files/")
    assert (listed.key, listed.size) == ("files/big.bin", 40 << 20)
    fetched = artifacts.fetch_file("files/big.bin", near="jobs/j/input")
    assert hashlib.sha256(fetched.read_bytes()).hexdigest() == expected
    artifacts.delete(["files/big.bin"])
    assert not artifacts.exists("files/big.bin")
    with pytest.raises(ArtifactMissing):
        list(artifacts.iter_bytes("files/big.bin"))
    with pytest.raises(ArtifactMissing):
        artifacts.fetch_file("files/big.bin", near="jobs/j/input")


def test_a_directory_is_published_with_its_manifests_last(store_settings, monkeypatch):
    artifacts = open_store(store_settings)
    tmp = artifacts.temp_dir("jobs/j/checkpoints/step-1")
    noop_adapter(tmp / "adapter", "j")
    write_manifest(tmp / "adapter")
    (tmp / "state").mkdir()
    (tmp / "state" / "trainer_state.json").write_text("{}")
    if isinstance(artifacts, S3Store):
        order = []
        upload = artifacts.publish_file
        monkeypatch.setattr(artifacts, "publish_file", lambda p, k: (order.append(k), upload(p, k)))
    artifacts.publish_dir(tmp, "jobs/j/checkpoints/step-1")
    if isinstance(artifacts, S3Store):
        assert order[-1] == "jobs/j/checkpoints/step-1/adapter/manifest.json" and len(order) == 4
    keys = sorted(o.key for o in artifacts.list_objects("jobs/j/checkpoints/step-1"))
    assert keys == [
        "jobs/j/checkpoints/step-1/adapter/adapter_config.json",
        "jobs/j/checkpoints/step-1/adapter/adapter_model.safetensors",
        "jobs/j/checkpoints/step-1/adapter/manifest.json",
        "jobs/j/checkpoints/step-1/state/trainer_state.json",
    ]
    local = artifacts.fetch_dir("jobs/j/checkpoints/step-1", near="jobs/j/resume")
    assert (local / "state" / "trainer_state.json").read_text() == "{}"
    artifacts.delete_prefix("jobs/j/checkpoints/step-1")
    assert list(artifacts.list_objects("jobs/")) == []


def test_keys_cannot_leave_the_store(store_settings):
    artifacts = open_store(store_settings)
    for key in ("../etc/passwd", "/etc/passwd", "files/../../x"):
        with pytest.raises(ValueError):
            artifacts.exists(key)


@pytest.fixture
def claimed(store_settings):
    tenant = create_tenant()
    create_job(tenant, create_file(store_settings, tenant, ARITHMETIC[:1], "prompt_completion"))
    sessions = get_sessionmaker()
    job = claim_job(sessions, "w", store_settings)
    return store_settings, sessions, job, Fence(sessions, job.id, job.attempt)


def model_count() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Model))


def test_a_failure_before_the_commit_leaves_no_row_and_the_retry_publishes(claimed, monkeypatch):
    settings, _sessions, job, fence = claimed
    artifacts = open_store(settings)

    def crash(name):
        if name == "publish_before_commit":
            raise RuntimeError("the process died here")

    monkeypatch.setattr(faults, "crash_point", crash)
    with pytest.raises(RuntimeError):
        store.publish_adapter(artifacts, fence, job, lambda d: noop_adapter(d, job.id), trained_tokens=1)
    assert model_count() == 0 and get_job(job.id).status == "running"
    published = {o.key for o in artifacts.list_objects("adapters/")}
    assert {k.rsplit("/", 1)[1] for k in published} == {"adapter_config.json", WEIGHTS_FILE, MANIFEST}

    monkeypatch.setattr(faults, "crash_point", lambda name: None)
    version = store.publish_adapter(
        artifacts, fence, job, lambda d: noop_adapter(d, job.id), trained_tokens=1
    )
    assert get_job(job.id).status == "succeeded"
    with session_scope() as session:
        assert session.get(Model, job.output_model).path == f"adapters/{version}"


def test_an_upload_cut_short_leaves_no_row_and_no_manifest(claimed, monkeypatch):
    settings, _sessions, job, fence = claimed
    artifacts = open_store(settings)
    if isinstance(artifacts, LocalStore):
        pytest.skip("the data dir publishes by one rename: there is no partial upload")
    upload, uploads = artifacts.publish_file, []

    def dies_after_one(path, key):
        if uploads:
            raise ConnectionError("the network went away")
        uploads.append(key)
        upload(path, key)

    monkeypatch.setattr(artifacts, "publish_file", dies_after_one)
    with pytest.raises(ConnectionError):
        store.save_checkpoint(
            artifacts,
            fence,
            job,
            3,
            lambda d: noop_checkpoint(d, job.id, 3),
            {"step": 3},
            keep_checkpoints=3,
        )
    assert model_count() == 0
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Checkpoint)) == 0
        assert store.latest_checkpoint(session, artifacts, job.id) is None
    assert [k for k in uploads if k.endswith(MANIFEST)] == []


def test_checkpoints_beyond_the_limit_are_pruned_from_the_store(claimed):
    settings, _sessions, job, fence = claimed
    artifacts = open_store(settings)
    for step in (1, 2, 3):
        store.save_checkpoint(
            artifacts,
            fence,
            job,
            step,
            lambda d, s=step: noop_checkpoint(d, job.id, s),
            {"step": step},
            keep_checkpoints=2,
        )
    steps = {o.key.split("/")[3] for o in artifacts.list_objects(f"jobs/{job.id}/checkpoints")}
    assert steps == {"step-2", "step-3"}
    with session_scope() as session:
        latest = store.latest_checkpoint(session, artifacts, job.id)
    resumed = store.fetch_checkpoint(artifacts, latest)
    assert json.loads((resumed / "state" / "trainer_state.json").read_text()) == {"step": 3}


def age(artifacts, key: str, seconds: float) -> None:
    """Make an object look `seconds` old (the data dir only; S3 objects cannot be backdated)."""
    path = artifacts.local_path(key)
    os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_the_sweep_removes_only_old_unreferenced_objects(store_settings):
    artifacts = open_store(store_settings)
    tenant = create_tenant()
    kept_file = create_file(store_settings, tenant, ARITHMETIC[:1], "prompt_completion")
    if isinstance(artifacts, S3Store):  # create_file writes into the data dir
        artifacts.publish_file(store_settings.files_dir / f"{kept_file}.jsonl", f"files/{kept_file}.jsonl")
    for key in ("files/file-orphan.jsonl", "adapters/abc/manifest.json", "jobs/j/.tmp-publish-1/x"):
        tmp = artifacts.temp_dir("files/scratch") / "x"
        tmp.write_text("left behind")
        artifacts.publish_file(tmp, key)
    orphans = {"files/file-orphan.jsonl", "adapters/abc/manifest.json", "jobs/j/.tmp-publish-1/x"}

    young = sweep(get_sessionmaker(), artifacts, grace_seconds=3600)
    assert young.removed == [] and young.kept_young == 3

    grace = 60.0
    if isinstance(artifacts, LocalStore):
        for key in [*orphans, f"files/{kept_file}.jsonl"]:
            age(artifacts, key, 2 * grace)
    else:
        grace = 0.0
        time.sleep(1.1)  # S3 times are whole seconds
    dry = sweep(get_sessionmaker(), artifacts, grace_seconds=grace, dry_run=True)
    assert set(dry.removed) == orphans
    assert sum(1 for _ in artifacts.list_objects("adapters/")) == 1
    swept = sweep(get_sessionmaker(), artifacts, grace_seconds=grace)
    assert set(swept.removed) == orphans and swept.removed_bytes == 3 * len("left behind")
    left = {o.key for prefix in ("files/", "adapters/", "jobs/") for o in artifacts.list_objects(prefix)}
    assert left == {f"files/{kept_file}.jsonl"}


@pytest.mark.slow  # two runs of the real command
def test_storage_gc_command(store_settings):
    artifacts = open_store(store_settings)
    tmp = artifacts.temp_dir("files/scratch") / "x"
    tmp.write_text("orphan")
    artifacts.publish_file(tmp, "adapters/orphan/adapter_model.safetensors")
    kept = tuneforge("storage", "gc").stdout
    assert "0 objects (0 bytes) removed; 1 unreferenced but younger than 86400 s kept" in kept
    time.sleep(1.1)
    removed = tuneforge("storage", "gc", "--grace-seconds", "0").stdout
    assert "removed adapters/orphan/adapter_model.safetensors" in removed
    assert list(artifacts.list_objects("adapters/")) == []


def test_the_files_api_streams_uploads_and_downloads_through_the_store(store_settings):
    from app.main import create_app
    from app.services.keys import create_key

    with session_scope() as session:
        _, key = create_key(session, "acme")
    client = TestClient(create_app())  # not entered: no engine starts, the control plane serves
    headers = {"Authorization": f"Bearer {key}"}
    body = "".join(json.dumps(row) + "\n" for row in ARITHMETIC).encode()
    created = client.post(
        "/v1/files",
        headers=headers,
        files={"file": ("arith metic.jsonl", body)},
        data={"purpose": "fine-tune"},
    )
    assert created.status_code == 200, created.text
    file_id = created.json()["id"]
    artifacts = open_store(store_settings)
    assert artifacts.exists(f"files/{file_id}.jsonl")
    assert not list(store_settings.data_dir.glob("files/.tmp-*"))

    content = client.get(f"/v1/files/{file_id}/content", headers=headers)
    assert content.status_code == 200 and content.content == body
    assert content.headers["content-length"] == str(len(body))
    assert "arith%20metic.jsonl" in content.headers["content-disposition"]

    assert client.delete(f"/v1/files/{file_id}", headers=headers).status_code == 200
    assert not artifacts.exists(f"files/{file_id}.jsonl")
    with session_scope() as session:
        assert session.get(File, file_id) is None


def published_adapter(artifacts, name: str) -> tuple[str, str]:
    tmp = artifacts.temp_dir(f"adapters/{name}")
    noop_adapter(tmp, name)
    version = write_manifest(tmp)
    artifacts.publish_dir(tmp, f"adapters/{version}")
    return f"adapters/{version}", version


def test_the_adapter_cache_keeps_verified_versions_least_recently_used_out(s3_settings, tmp_path):
    artifacts = open_store(s3_settings)
    cache = AdapterCache(tmp_path / "cache", max_bytes=1 << 30, max_entries=2)
    a, b, c = (published_adapter(artifacts, name) for name in "abc")
    assert cache.materialize(artifacts, *a) == tmp_path / "cache" / a[1]
    assert (tmp_path / "cache" / a[1] / WEIGHTS_FILE).is_file()
    cache.materialize(artifacts, *b)
    cache.materialize(artifacts, *a)  # a is now the most recently used
    cache.materialize(artifacts, *c)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([a[1], c[1]])

    artifacts.delete_prefix(a[0])  # cached versions are served without the store
    artifacts.delete_prefix(b[0])
    assert cache.materialize(artifacts, *a).is_dir()
    with pytest.raises(AdapterGone):
        cache.materialize(artifacts, *b)

    reopened = AdapterCache(tmp_path / "cache", max_bytes=1, max_entries=10)  # bytes bound
    assert list((tmp_path / "cache").iterdir()) == []
    reopened.materialize(artifacts, *c)  # the one just asked for stays, whatever its size
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [c[1]]


def test_a_corrupted_adapter_object_is_refused_and_never_cached(s3_settings, seaweedfs, tmp_path):
    artifacts = open_store(s3_settings)
    key, version = published_adapter(artifacts, "victim")
    weights = f"{artifacts.prefix}/{key}/{WEIGHTS_FILE}"
    client = seaweedfs.client()
    data = bytearray(client.get_object(Bucket=seaweedfs.bucket, Key=weights)["Body"].read())
    data[-1] ^= 0xFF
    client.put_object(Bucket=seaweedfs.bucket, Key=weights, Body=bytes(data))

    cache = AdapterCache(tmp_path / "cache", max_bytes=1 << 30, max_entries=8)
    with pytest.raises(AdapterFileError, match="does not match"):
        cache.materialize(artifacts, key, version)
    assert list((tmp_path / "cache").iterdir()) == []
