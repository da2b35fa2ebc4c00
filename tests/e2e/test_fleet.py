"""A fleet with no shared filesystem: two `tuneforge api` replicas and two `tuneforge worker`
processes, each with its own data dir, sharing one PostgreSQL and one S3 server (SeaweedFS).

Jobs are claimed exactly once; a worker killed with -9 mid-job is replaced by the other, which
resumes from the checkpoint in S3; either replica serves any adapter (from its own disk cache);
a deleted model is 404 and a revoked key 401 on every replica within a second."""

import json
import shutil
import signal
import time
from contextlib import ExitStack

import httpx
import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.core.settings import EMBEDDED_BASE_MODEL
from app.models import Job
from tests.conftest import link_base_model, running_api, tuneforge
from tests.inference_support import write_peft_adapter
from tests.worker_support import (
    ARITHMETIC,
    events,
    get_job,
    quick_lease,
    start_worker_process,
    wait_for,
)

pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)

JOBS = 4


def worker_pid(job_id: str) -> int | None:
    owner = get_job(job_id).worker_id  # host:pid:random
    return int(owner.split(":")[1]) if owner else None


def first_step_of_attempt(job_id: str, attempt: int) -> int:
    log = events(job_id)
    start = next(i for i, e in enumerate(log) if e.message.startswith(f"Attempt {attempt} started"))
    return next(e.data["step"] for e in log[start:] if e.data and "train_loss" in e.data)


def test_two_replicas_and_two_workers_share_only_postgres_and_s3(s3_settings, base_model_dir, tmp_path):
    dirs = {name: tmp_path / name for name in ("api-a", "api-b", "worker-1", "worker-2", "cli")}
    for name, directory in dirs.items():
        directory.mkdir()
        if not name.startswith("worker"):  # the noop recipe needs no base model
            link_base_model(directory, base_model_dir)  # base models are local to each host
    cli = {"TUNEFORGE_DATA_DIR": str(dirs["cli"])}
    created = tuneforge("keys", "create", "--tenant", "acme", env=cli).stdout.splitlines()
    key_id, key = created[0].split()[2], created[-1]
    headers = {"Authorization": f"Bearer {key}"}
    # Jobs of 20 steps of 0.15 s, with a checkpoint every 5.
    worker_env = quick_lease(
        TUNEFORGE_TEST_RECIPE="noop",
        TUNEFORGE_TEST_NOOP_STEPS=20,
        TUNEFORGE_TEST_NOOP_STEP_SECONDS=0.15,
        TUNEFORGE_TEST_NOOP_CHECKPOINT_EVERY=5,
    )

    with ExitStack() as stack:
        a = stack.enter_context(running_api({"TUNEFORGE_DATA_DIR": str(dirs["api-a"])}))
        b = stack.enter_context(running_api({"TUNEFORGE_DATA_DIR": str(dirs["api-b"])}))
        workers = {}

        def start(name: str) -> None:
            proc = start_worker_process(tmp_path / f"{name}.log", **worker_env, TUNEFORGE_DATA_DIR=dirs[name])
            workers[name] = proc
            stack.callback(lambda: (proc.kill(), proc.wait()))

        # A file uploaded to one replica is read back from the other, and by the workers.
        body = "".join(json.dumps(row) + "\n" for row in ARITHMETIC)
        upload = httpx.post(
            f"{a}/v1/files",
            headers=headers,
            files={"file": ("arith.jsonl", body.encode())},
            data={"purpose": "fine-tune"},
            timeout=30,
        )
        assert upload.status_code == 200, upload.text
        file_id = upload.json()["id"]
        assert httpx.get(f"{b}/v1/files/{file_id}/content", headers=headers).text == body

        # The first job with only worker-1 up, so that it is the one to kill.
        def create_job(url: str) -> str:
            response = httpx.post(
                f"{url}/v1/fine_tuning/jobs",
                headers=headers,
                json={"model": EMBEDDED_BASE_MODEL, "training_file": file_id},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            return response.json()["id"]

        long_job = create_job(a)
        start("worker-1")
        wait_for(
            lambda: any("Checkpoint saved" in e.message for e in events(long_job)),
            timeout=60,
            message="the first job's first checkpoint",
        )
        start("worker-2")
        jobs = [create_job(a if i % 2 else b) for i in range(JOBS)]
        assert worker_pid(long_job) == workers["worker-1"].pid
        workers["worker-1"].send_signal(signal.SIGKILL)
        workers["worker-1"].wait()
        shutil.rmtree(dirs["worker-1"])  # its host comes back with an empty disk
        dirs["worker-1"].mkdir()
        start("worker-1")
        wait_for(
            lambda: all(get_job(j).status == "succeeded" for j in [long_job, *jobs]),
            timeout=90,
            message="every job to succeed",
        )

        resumed = get_job(long_job)
        assert resumed.attempt == 2 and resumed.infra_failures == 1
        checkpointed = max(e.data["step"] for e in events(long_job) if e.message.startswith("Checkpoint"))
        assert first_step_of_attempt(long_job, 2) > 5  # resumed from a checkpoint, not from step 0
        assert first_step_of_attempt(long_job, 2) <= checkpointed + 1
        with session_scope() as session:
            others = session.scalars(select(Job).where(Job.id.in_(jobs))).all()
        assert all(j.attempt == 1 for j in others)  # each claimed exactly once
        for job_id in jobs:
            starts = [e for e in events(job_id) if e.message.startswith("Attempt ")]
            assert len(starts) == 1
        for name in ("worker-1", "worker-2"):  # training files and checkpoints came and went
            assert [p for p in dirs[name].rglob("*") if p.is_file()] == [], name

        # An adapter imported from yet another host is served by both replicas, each from its cache.
        adapter = write_peft_adapter(tmp_path / "peft", base_model_dir, seed=7)
        imported = tuneforge(
            "models", "import", "--tenant", "acme", "--name", "shared", str(adapter), env=cli
        ).stdout.splitlines()
        model_id = imported[-1]
        chat = {
            "model": model_id,
            "messages": [{"role": "user", "content": "Say something."}],
            "temperature": 0,
            "max_tokens": 6,
        }
        answers = []
        for url in (a, b):
            response = httpx.post(f"{url}/v1/chat/completions", headers=headers, json=chat, timeout=120)
            assert response.status_code == 200, response.text
            answers.append(response.json()["choices"][0]["message"]["content"])
        assert answers[0] == answers[1]
        for name in ("api-a", "api-b"):
            assert len(list((dirs[name] / "adapter_cache").iterdir())) == 1

        # Deleted through one replica: 404 on both within a second.
        assert httpx.delete(f"{a}/v1/models/{model_id}", headers=headers).status_code == 200
        deleted_at = time.monotonic()
        for url in (b, a):
            wait_for(
                lambda url=url: (
                    httpx.post(
                        f"{url}/v1/chat/completions", headers=headers, json=chat, timeout=30
                    ).status_code
                    == 404
                ),
                timeout=1,
                message=f"the deleted model to be 404 on {url}",
                interval=0.05,
            )
        assert time.monotonic() - deleted_at < 1

        # Revoked from the command line: refused by both replicas within a second.
        assert httpx.get(f"{b}/v1/models", headers=headers).status_code == 200
        tuneforge("keys", "revoke", key_id, env=cli)
        revoked_at = time.monotonic()
        for url in (a, b):
            wait_for(
                lambda url=url: httpx.get(f"{url}/v1/models", headers=headers).status_code == 401,
                timeout=1,
                message=f"the revoked key to be refused on {url}",
                interval=0.05,
            )
        assert time.monotonic() - revoked_at < 1
