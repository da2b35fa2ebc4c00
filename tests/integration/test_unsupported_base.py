"""A job on a base of a family Tuneforge does not train fails at once as the user's error, never
mid-way: POST /v1/fine_tuning/jobs refuses it, and a worker that still meets one (the base's files
changed after the job was created) fails it before it loads anything."""

import asyncio
import json

import httpx
import pytest
from sqlalchemy.orm import Session

from app.core.db import get_engine
from app.core.model_families import FAMILIES
from app.core.settings import get_settings
from app.main import create_app
from app.services.keys import create_key
from tests.worker_support import (
    ARITHMETIC,
    create_file,
    create_job,
    create_tenant,
    get_job,
    update_job,
    wait_for,
    worker_thread,
)

SUPPORTED = ", ".join(FAMILIES)


def gpt2_base(directory):
    """A base whose config says gpt2; no weights or tokenizer: nothing past the config is read."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    return directory


def configure_bases(monkeypatch, **bases) -> None:
    monkeypatch.setenv("TUNEFORGE_BASE_MODELS", json.dumps({name: str(path) for name, path in bases.items()}))
    get_settings.cache_clear()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_job_creation_refuses_an_unsupported_family_naming_base_family_and_supported(
    settings, monkeypatch, tmp_path, base_model_dir
):
    configure_bases(monkeypatch, **{"tiny-gpt2": gpt2_base(tmp_path / "gpt2"), "my-llama": base_model_dir})
    with Session(get_engine()) as session, session.begin():
        key = create_key(session, "acme")[1]
    transport = httpx.ASGITransport(app=create_app())  # no lifespan: no engine starts

    async def requests():
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers={"Authorization": f"Bearer {key}"}
        ) as client:
            upload = await client.post(
                "/v1/files",
                data={"purpose": "fine-tune"},
                files={"file": ("train.jsonl", "".join(json.dumps(row) + "\n" for row in ARITHMETIC))},
            )
            assert upload.status_code == 200, upload.text
            body = {"training_file": upload.json()["id"]}
            refused = await client.post("/v1/fine_tuning/jobs", json={**body, "model": "tiny-gpt2"})
            accepted = await client.post("/v1/fine_tuning/jobs", json={**body, "model": "my-llama"})
            listed = await client.get("/v1/fine_tuning/jobs")
            return refused, accepted, listed

    refused, accepted, listed = asyncio.run(requests())
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "model_not_supported" and error["param"] == "model"
    assert "'tiny-gpt2' is a 'gpt2' model" in error["message"] and SUPPORTED in error["message"]
    assert accepted.status_code == 200, accepted.text
    assert [job["model"] for job in listed.json()["data"]] == ["my-llama"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_worker_fails_a_job_on_an_unsupported_family_before_loading_anything(settings, tmp_path):
    base = gpt2_base(tmp_path / "gpt2")
    tenant = create_tenant()
    job_id = create_job(tenant, create_file(settings, tenant, ARITHMETIC[:2], "prompt_completion"))
    update_job(job_id, model="was-llama")  # configured as a Llama when the job was created
    with worker_thread(settings, base_models={"was-llama": base}, poll_seconds=0.1):
        job = wait_for(
            lambda: (job := get_job(job_id)).status in ("succeeded", "failed") and job,
            timeout=60,
            message="the job to finish",
        )
    assert job.status == "failed" and job.attempt == 1 and job.infra_failures == 0
    assert job.error["code"] == "model_not_supported" and job.error["param"] == "model"
    assert "'was-llama' is a 'gpt2' model" in job.error["message"] and SUPPORTED in job.error["message"]
