"""The control plane as a user meets it: `tuneforge api` on a real port, driven by the official
openai client and plain HTTP, on SQLite and on PostgreSQL."""

import json
import os

import httpx
import openai
import pytest

from tests.conftest import fresh_postgres_database, link_base_model, running_api, tuneforge

MAX_UPLOAD = 200_000
BASE = "SmolLM2-135M-Instruct"

GOOD_LINES = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request, tmp_path_factory, base_model_dir):
    data_dir = tmp_path_factory.mktemp("data")
    link_base_model(data_dir, base_model_dir)
    with fresh_postgres_database() if request.param == "postgres" else _nothing() as pg_url:
        env = {
            "TUNEFORGE_DATA_DIR": str(data_dir),
            "TUNEFORGE_DATABASE_URL": pg_url or f"sqlite:///{data_dir / 'tuneforge.db'}",
            "TUNEFORGE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
            "TUNEFORGE_DEVICE": "cpu",
        }
        keys = {
            t: tuneforge("keys", "create", "--tenant", t, env=env).stdout.strip().splitlines()[-1]
            for t in ("acme", "globex")
        }
        with running_api(env) as url:
            yield {"url": url, "keys": keys, "env": env, "data_dir": data_dir}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def client(server, tenant="acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=server["keys"][tenant], max_retries=0)


def upload(server, tmp_path, lines, tenant="acme", name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    with open(path, "rb") as f:
        return client(server, tenant).files.create(file=f, purpose="fine-tune")


def create_job(server, file_id, tenant="acme", **kw):
    return client(server, tenant).fine_tuning.jobs.create(model=BASE, training_file=file_id, **kw)


def test_file_upload_list_retrieve_content_delete(server, tmp_path):
    c = client(server)
    f = upload(server, tmp_path, GOOD_LINES)
    assert f.object == "file" and f.purpose == "fine-tune" and f.bytes > 0
    assert f.id in [x.id for x in c.files.list()]
    assert c.files.retrieve(f.id).filename == "train.jsonl"
    assert c.files.content(f.id).read() == (tmp_path / "train.jsonl").read_bytes()
    assert c.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)
    assert f.id not in [x.id for x in c.files.list()]


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ("{not json", "not valid JSON"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
            "assistant",
        ),
        ({"prompt": "x", "completion": ""}, "completion"),
        ({"question": "x"}, "expected one of"),
        ([1, 2], "JSON object"),
    ],
)
def test_malformed_file_is_refused_naming_its_first_bad_line(server, tmp_path, bad_line, reason):
    c = client(server)
    before = {x.id for x in c.files.list()}
    with pytest.raises(openai.BadRequestError) as err:
        upload(server, tmp_path, [*GOOD_LINES, bad_line, bad_line])
    body = err.value.body
    assert "line 3" in body["message"] and reason in body["message"], body
    assert body["param"] == "file"
    # Nothing half-written is listed or left on disk.
    assert {x.id for x in c.files.list()} == before
    assert not list((server["data_dir"] / "files").glob(".tmp-*"))


def test_empty_file_and_wrong_purpose_are_refused(server, tmp_path):
    with pytest.raises(openai.BadRequestError, match="no examples"):
        upload(server, tmp_path, [])
    (tmp_path / "x.jsonl").write_text(json.dumps(GOOD_LINES[0]) + "\n")
    with open(tmp_path / "x.jsonl", "rb") as f, pytest.raises(openai.BadRequestError, match="fine-tune"):
        client(server).files.create(file=f, purpose="assistants")


def test_oversize_upload_gets_413(server, tmp_path):
    line = {"text": "x" * 1000}
    with pytest.raises(openai.APIStatusError) as err:
        upload(server, tmp_path, [line] * (MAX_UPLOAD // 1000 + 10))
    assert err.value.status_code == 413
    assert err.value.body["code"] == "file_too_large"


def test_job_create_list_retrieve_cancel(server, tmp_path):
    c = client(server)
    f = upload(server, tmp_path, GOOD_LINES)
    job = create_job(
        server,
        f.id,
        suffix="demo",
        seed=7,
        hyperparameters={"n_epochs": 2, "batch_size": "auto"},
        metadata={"team": "ml"},
    )
    assert job.object == "fine_tuning.job" and job.status == "queued"
    assert job.organization_id.startswith("org-") and job.seed == 7
    assert job.hyperparameters.n_epochs == 2
    # "auto" stays "auto" until a worker has tokenized the file
    # (tests/integration/test_auto_hyperparameters.py).
    assert job.hyperparameters.batch_size == "auto"
    assert job.method.supervised.hyperparameters.learning_rate_multiplier == "auto"
    assert job.metadata == {"team": "ml"}
    assert c.fine_tuning.jobs.retrieve(job.id).status == "queued"
    assert job.id in [j.id for j in c.fine_tuning.jobs.list()]
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id)]
    assert "Job queued" in messages
    assert list(c.fine_tuning.jobs.checkpoints.list(job.id)) == []
    cancelled = c.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a job that is cancelled"):
        c.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.BadRequestError, match="Cannot pause"):
        c.fine_tuning.jobs.pause(job.id)


def test_pause_and_resume_a_queued_job(server, tmp_path):
    c = client(server)
    job = create_job(server, upload(server, tmp_path, GOOD_LINES).id)
    assert c.fine_tuning.jobs.pause(job.id).status == "paused"
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.pause(job.id)
    assert c.fine_tuning.jobs.resume(job.id).status == "queued"
    with pytest.raises(openai.BadRequestError, match="Cannot resume"):
        c.fine_tuning.jobs.resume(job.id)


def test_method_form_and_tuneforge_hyperparameters(server, tmp_path):
    f = upload(server, tmp_path, GOOD_LINES)
    job = create_job(
        server,
        f.id,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": 1,
                    "lora_r": 8,
                    "target_modules": ["q_proj", "v_proj"],
                    "packing": False,
                }
            },
        },
    )
    assert job.method.type == "supervised"
    hp = job.method.supervised.hyperparameters.model_dump()
    assert hp["n_epochs"] == 1
    raw = httpx.get(
        f"{server['url']}/v1/fine_tuning/jobs/{job.id}",
        headers={"Authorization": f"Bearer {server['keys']['acme']}"},
    ).json()
    assert raw["hyperparameters"]["lora_r"] == 8
    assert raw["hyperparameters"]["target_modules"] == ["q_proj", "v_proj"]
    assert raw["hyperparameters"]["learning_rate_multiplier"] == "auto"


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"model": "gpt-17"}, "model"),
        ({"training_file": "file-missing"}, "training_file"),
        ({"validation_file": "file-missing"}, "validation_file"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
        ({"hyperparameters": {"lora_dropout": 1.5}}, "hyperparameters.lora_dropout"),
        ({"hyperparameters": {"target_modules": []}}, "hyperparameters.target_modules"),
        ({"hyperparameters": {"warmup": 3}}, "hyperparameters.warmup"),
        ({"suffix": "has spaces"}, "suffix"),
        ({"method": {"type": "dpo"}}, "method.type"),
    ],
)
def test_bad_job_requests_get_400_naming_the_parameter(server, tmp_path, kw, param):
    f = upload(server, tmp_path, GOOD_LINES)
    body = {"model": BASE, "training_file": f.id, **kw}
    r = httpx.post(
        f"{server['url']}/v1/fine_tuning/jobs",
        json=body,
        headers={"Authorization": f"Bearer {server['keys']['acme']}"},
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_idempotency_key(server, tmp_path):
    f = upload(server, tmp_path, GOOD_LINES)
    headers = {"Authorization": f"Bearer {server['keys']['acme']}", "Idempotency-Key": os.urandom(8).hex()}
    body = {"model": BASE, "training_file": f.id}
    first = httpx.post(f"{server['url']}/v1/fine_tuning/jobs", json=body, headers=headers)
    again = httpx.post(f"{server['url']}/v1/fine_tuning/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = httpx.post(f"{server['url']}/v1/fine_tuning/jobs", json={**body, "suffix": "x"}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_overlong_idempotency_key_is_refused_naming_the_header(server, tmp_path):
    f = upload(server, tmp_path, GOOD_LINES)
    headers = {"Authorization": f"Bearer {server['keys']['acme']}", "Idempotency-Key": "k" * 300}
    before = len(client(server).fine_tuning.jobs.list(limit=100).data)
    r = httpx.post(
        f"{server['url']}/v1/fine_tuning/jobs",
        json={"model": BASE, "training_file": f.id},
        headers=headers,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "idempotency-key", r.text
    assert len(client(server).fine_tuning.jobs.list(limit=100).data) == before


def test_job_list_pagination(server, tmp_path):
    c = client(server, "globex")
    f = upload(server, tmp_path, GOOD_LINES, tenant="globex")
    ids = [create_job(server, f.id, tenant="globex").id for _ in range(3)]
    first = c.fine_tuning.jobs.list(limit=2)
    assert first.has_more and len(first.data) == 2
    rest = c.fine_tuning.jobs.list(limit=100, after=first.data[-1].id)
    seen = [j.id for j in first.data] + [j.id for j in rest.data]
    assert len(seen) == len(set(seen)) and set(ids) <= set(seen)


def test_models_list_retrieve_delete(server):
    c = client(server)
    models = {m.id: m for m in c.models.list()}
    assert models[BASE].owned_by == "system"
    assert c.models.retrieve(BASE).id == BASE
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("ft:nothing:here")
    with pytest.raises(openai.NotFoundError):
        c.models.delete("ft:nothing:here")
    with pytest.raises(openai.BadRequestError, match="base model"):
        c.models.delete(BASE)


def test_bad_missing_and_revoked_keys_get_401(server):
    bad = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="tf-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(f"{server['url']}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    key = tuneforge("keys", "create", "--tenant", "acme", env=server["env"]).stdout.splitlines()[-1]
    assert (
        httpx.get(f"{server['url']}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    )
    listing = tuneforge("keys", "list", "--tenant", "acme", env=server["env"]).stdout
    key_id = next(line.split("\t")[0] for line in listing.splitlines() if key[:10] in line)
    tuneforge("keys", "revoke", key_id, env=server["env"])
    assert (
        httpx.get(f"{server['url']}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    )
    assert "revoked" in tuneforge("keys", "list", env=server["env"]).stdout


def test_other_tenants_objects_are_404(server, tmp_path):
    f = upload(server, tmp_path, GOOD_LINES, tenant="acme")
    job = create_job(server, f.id, tenant="acme")
    other = client(server, "globex")
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        other.files.delete(f.id)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        list(other.fine_tuning.jobs.list_events(job.id))
    # Using another tenant's file in a job reads as a missing file.
    with pytest.raises(openai.BadRequestError) as err:
        create_job(server, f.id, tenant="globex")
    assert err.value.body["param"] == "training_file"
    assert job.id not in [j.id for j in other.fine_tuning.jobs.list()]
    assert f.id not in [x.id for x in other.files.list()]
    # The owner still sees both, untouched.
    assert client(server).fine_tuning.jobs.retrieve(job.id).status == "queued"


def test_health_ready_metrics_need_no_key(server):
    assert httpx.get(f"{server['url']}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server['url']}/readyz", timeout=30)
    assert ready.status_code in (200, 503) and ready.json()["checks"]["database"] == "ok"
    text = httpx.get(f"{server['url']}/metrics").text
    assert 'tuneforge_jobs{status="queued"}' in text
    assert "tuneforge_http_requests_total" in text


def test_unknown_route_and_bad_json_are_openai_shaped(server):
    h = {"Authorization": f"Bearer {server['keys']['acme']}"}
    r = httpx.get(f"{server['url']}/v1/nothing", headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.post(
        f"{server['url']}/v1/fine_tuning/jobs",
        content=b"{nope",
        headers={**h, "content-type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
