"""Serving as a client meets it: `tuneforge api` on a real port with the real model, seeded LoRA
adapters in the artifact store, plain HTTP (httpx) and the official openai client."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from app.core.migrate import upgrade
from app.core.settings import EMBEDDED_BASE_MODEL, Settings
from tests.conftest import link_base_model, running_api, tuneforge
from tests.inference_support import create_test_key, publish_test_adapter, write_peft_adapter

BASE = EMBEDDED_BASE_MODEL
ADAPTERS = {f"ft:{BASE}:acme:a{i}": seed for i, seed in enumerate((11, 22, 33, 44), start=1)}
A1 = f"ft:{BASE}:acme:a1"
GLOBEX_MODEL = f"ft:{BASE}:globex:secret"
CORRUPT = f"ft:{BASE}:acme:corrupt"
PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "List three colours.",
    "Explain what a LoRA adapter is in one sentence.",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, base_model_dir):
    data_dir = tmp_path_factory.mktemp("data")
    link_base_model(data_dir, base_model_dir)
    env = {
        "TUNEFORGE_DATA_DIR": str(data_dir),
        "TUNEFORGE_DATABASE_URL": f"sqlite:///{data_dir / 'tuneforge.db'}",
        "TUNEFORGE_DEVICE": "cpu",
        "TUNEFORGE_GPU_ADAPTER_SLOTS": "6",
        # 5 SSE chunks a second in all: one stream gets a chunk every 200 ms at most, so even the
        # CPU model's tokens are joined (the default, 4,000, joins them only under load).
        "TUNEFORGE_STREAM_CHUNKS_PER_S": "5",
    }
    settings = Settings(data_dir=data_dir, database_url=env["TUNEFORGE_DATABASE_URL"], device="cpu")
    upgrade(settings.resolved_database_url)
    keys = {t: create_test_key(settings, t) for t in ("acme", "globex")}
    for model_id, seed in ADAPTERS.items():
        publish_test_adapter(settings, "acme", model_id, seed)
    publish_test_adapter(settings, "globex", GLOBEX_MODEL, 55)
    corrupt = publish_test_adapter(settings, "acme", CORRUPT, 66)
    weights = data_dir / corrupt.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with running_api(env) as url:
        yield {"url": url, "keys": keys, "settings": settings, "env": env}


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir)


def _headers(server, tenant="acme"):
    return {"Authorization": f"Bearer {server['keys'][tenant]}"}


def post(server, path, body, tenant="acme") -> httpx.Response:
    return httpx.post(f"{server['url']}{path}", json=body, headers=_headers(server, tenant), timeout=120)


def chat_body(model, content, **kw):
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 8,
        **kw,
    }


def stream_chunks(server, path, body, tenant="acme") -> list[dict]:
    import json

    chunks = []
    with httpx.stream(
        "POST",
        f"{server['url']}{path}",
        json={**body, "stream": True},
        headers=_headers(server, tenant),
        timeout=120,
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return chunks
            chunks.append(json.loads(line.removeprefix("data: ")))
    raise AssertionError("the stream ended without data: [DONE]")


def chat_text(server, model, content, **kw) -> str:
    response = post(server, "/v1/chat/completions", chat_body(model, content, **kw))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("model", [BASE, A1])
def test_stream_and_plain_greedy_outputs_are_identical_with_right_usage(server, tokenizer, model):
    body = chat_body(model, PROMPTS[0], max_tokens=10)
    plain = post(server, "/v1/chat/completions", body).json()
    assert plain["object"] == "chat.completion"
    chunks = stream_chunks(
        server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}
    )
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == plain["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == plain["choices"][0][
        "finish_reason"
    ]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    prompt_ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
    usage = plain["usage"]
    assert usage["prompt_tokens"] == len(tokenizer(prompt_ids, add_special_tokens=False)["input_ids"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if plain["choices"][0]["finish_reason"] == "length":
        assert usage["completion_tokens"] == 10

    completion = {
        "model": model,
        "prompt": "The three primary colours are",
        "max_tokens": 9,
        "temperature": 0,
    }
    plain = post(server, "/v1/completions", completion).json()
    assert plain["object"] == "text_completion"
    chunks = stream_chunks(server, "/v1/completions", completion)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert plain["usage"]["prompt_tokens"] == len(tokenizer("The three primary colours are")["input_ids"])
    assert plain["usage"]["completion_tokens"] == 9 and plain["choices"][0]["finish_reason"] == "length"
    short = post(
        server,
        "/generate",
        {"model": model, "prompt": completion["prompt"], "max_new_tokens": 9, "temperature": 0},
    ).json()
    assert short == {
        "model": model,
        "text": plain["choices"][0]["text"],
        "usage": plain["usage"],
        "finish_reason": "length",
    }


def test_a_paced_stream_joins_tokens_into_chunks_with_the_plain_text(server):
    body = {"model": BASE, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
    plain = post(server, "/v1/completions", body).json()
    started = time.monotonic()
    chunks = stream_chunks(server, "/v1/completions", body)
    elapsed = time.monotonic() - started
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["text"]]
    assert "".join(texts) == plain["choices"][0]["text"]
    assert plain["usage"]["completion_tokens"] == 40
    # At most a chunk per 200 ms slot (the first at once), so fewer chunks than tokens.
    assert len(texts) <= elapsed / 0.2 + 2 and len(texts) < 40, texts


def test_stop_strings_end_the_text_the_same_way_streamed_or_not(server):
    body = {
        "model": BASE,
        "prompt": "Count: 1, 2, 3, 4, 5,",
        "max_tokens": 20,
        "temperature": 0,
        "stop": [" 8", "9,"],
    }
    plain = post(server, "/v1/completions", body).json()
    text = plain["choices"][0]["text"]
    assert plain["choices"][0]["finish_reason"] == "stop" and " 8" not in text
    chunks = stream_chunks(server, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_sixteen_concurrent_requests_over_four_adapters_and_base_match_solo_runs(server):
    models = [BASE, *ADAPTERS]
    requests = [
        chat_body(models[i % len(models)], PROMPTS[i % len(PROMPTS)], max_tokens=6 + i % 5) for i in range(16)
    ]

    def run(body):
        response = post(server, "/v1/chat/completions", body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"], response.json()["usage"]

    solo = [run(body) for body in requests]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, requests))
    for body, alone, batched in zip(requests, solo, together, strict=False):
        assert batched == alone, body
    # The adapters really change the output (the test would prove nothing otherwise).
    base_text = chat_text(server, BASE, PROMPTS[0])
    assert all(chat_text(server, model, PROMPTS[0]) != base_text for model in ADAPTERS)


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", chat_body(BASE, "hi", max_tokens=-1), "max_tokens"),
        ("/v1/chat/completions", chat_body(BASE, "hi", temperature=50), "temperature"),
        ("/v1/chat/completions", chat_body(BASE, "hi", top_p=0), "top_p"),
        ("/v1/chat/completions", chat_body(BASE, "hi", n=2), "n"),
        ("/v1/chat/completions", chat_body(BASE, "hi", max_tokens=100_000), "max_tokens"),
        ("/v1/chat/completions", chat_body(BASE, "hello " * 100_000), "messages"),
        ("/v1/completions", {"model": BASE, "prompt": "hello " * 100_000}, "prompt"),
        ("/generate", {"model": BASE, "prompt": "hi", "max_new_tokens": -5}, "max_new_tokens"),
        ("/generate", {"model": BASE, "prompt": "hi", "temperature": 2.5}, "temperature"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(server, path, body, param):
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("model, tenant", [("no-such-model", "acme"), (GLOBEX_MODEL, "acme"), (A1, "globex")])
def test_unknown_and_other_tenants_models_are_404(server, model, tenant):
    for path, body in (
        ("/v1/chat/completions", chat_body(model, "hi")),
        ("/v1/completions", {"model": model, "prompt": "hi"}),
        ("/generate", {"model": model, "prompt": "hi"}),
    ):
        response = post(server, path, body, tenant)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "model_not_found"
    assert httpx.post(f"{server['url']}/generate", json={"model": BASE, "prompt": "hi"}).status_code == 401


def test_bad_and_revoked_keys_get_401_on_inference_routes(server):
    """The key is looked up with the model, in the same worker-thread hop: a wrong key is still
    refused before any model lookup or generation, and a revoked one on the very next request."""
    key = create_test_key(server["settings"], "initech")
    requests = (
        ("/v1/chat/completions", chat_body(BASE, "hi", max_tokens=1)),
        ("/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 1}),
        ("/generate", {"model": "no-such-model", "prompt": "hi", "max_new_tokens": 1}),
    )
    for path, body in requests:
        bad = httpx.post(f"{server['url']}{path}", json=body, headers={"Authorization": "Bearer tf-wrong"})
        assert bad.status_code == 401, bad.text
        assert bad.json()["error"]["type"] == "authentication_error"
    headers = {"Authorization": f"Bearer {key}"}
    assert (
        httpx.post(
            f"{server['url']}{requests[1][0]}", json=requests[1][1], headers=headers, timeout=60
        ).status_code
        == 200
    )
    listing = tuneforge("keys", "list", "--tenant", "initech", env=server["env"]).stdout
    tuneforge(
        "keys",
        "revoke",
        next(line.split("\t")[0] for line in listing.splitlines() if key[:10] in line),
        env=server["env"],
    )
    for path, body in requests:
        revoked = httpx.post(f"{server['url']}{path}", json=body, headers=headers)
        assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]["message"]


def test_corrupt_adapter_is_refused_and_disturbs_nothing(server):
    before = chat_text(server, A1, PROMPTS[1])
    for stream in (False, True):
        response = post(server, "/v1/chat/completions", chat_body(CORRUPT, "hi", stream=stream))
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["code"] == "adapter_invalid" and "manifest" in error["message"]
    assert chat_text(server, A1, PROMPTS[1]) == before


def test_deleted_model_is_404_and_a_recreated_id_serves_the_new_weights(server):
    settings = server["settings"]
    model_id = f"ft:{BASE}:acme:recreated"
    publish_test_adapter(settings, "acme", model_id, 101)
    publish_test_adapter(settings, "acme", f"ft:{BASE}:acme:reference", 202)
    old = chat_text(server, model_id, PROMPTS[3], max_tokens=12)
    deleted = httpx.delete(f"{server['url']}/v1/models/{model_id}", headers=_headers(server), timeout=30)
    assert deleted.status_code == 200, deleted.text
    response = post(server, "/v1/chat/completions", chat_body(model_id, PROMPTS[3]))
    assert response.status_code == 404
    publish_test_adapter(settings, "acme", model_id, 202)
    new = chat_text(server, model_id, PROMPTS[3], max_tokens=12)
    assert new == chat_text(server, f"ft:{BASE}:acme:reference", PROMPTS[3], max_tokens=12)
    assert new != old


def test_imported_adapters_and_checkpoints_are_served_and_counted(server, tmp_path, base_model_dir):
    directory = write_peft_adapter(tmp_path / "mine", base_model_dir, seed=77)
    imported = (
        tuneforge(
            "models", "import", "--tenant", "acme", "--name", "imported", str(directory), env=server["env"]
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    checkpoint = f"{A1}:ckpt-step-10"
    publish_test_adapter(server["settings"], "acme", checkpoint, 88, kind="checkpoint")
    listed = httpx.get(f"{server['url']}/v1/models", headers=_headers(server), timeout=30).json()
    assert {imported, checkpoint} <= {m["id"] for m in listed["data"]}
    outputs = {chat_text(server, model, PROMPTS[0]) for model in (imported, checkpoint, A1)}
    assert len(outputs) == 3
    text = httpx.get(f"{server['url']}/metrics", timeout=10).text
    assert f'tuneforge_tokens_generated_total{{model="{imported}"}}' in text
    for name in (
        "tuneforge_time_to_first_token_seconds_bucket",
        "tuneforge_inference_submit_seconds_bucket",
        "tuneforge_inference_queue_depth",
        'tuneforge_resident_adapters{tier="gpu"}',
        "tuneforge_adapter_load_seconds_count",
    ):
        assert name in text


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server['url']}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_client_disconnect_mid_stream_frees_its_row_at_once(server):
    cancelled_before = _metric(
        server, 'tuneforge_inference_requests_total{model="SmolLM2-135M-Instruct",outcome="cancelled"}'
    )
    body = {"model": BASE, "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{server['url']}/v1/completions", json=body, headers=_headers(server), timeout=60
    ) as response:
        lines = response.iter_lines()
        data = [line for line, _ in zip((x for x in lines if x.startswith("data: ")), range(3), strict=False)]
        assert len(data) == 3
    deadline = time.monotonic() + 5
    while _metric(server, "tuneforge_inference_running") > 0:
        assert time.monotonic() < deadline, "the disconnected stream still holds its batch row"
        time.sleep(0.1)
    assert (
        _metric(
            server, 'tuneforge_inference_requests_total{model="SmolLM2-135M-Instruct",outcome="cancelled"}'
        )
        == cancelled_before + 1
    )


def test_client_disconnect_before_a_plain_answer_cancels_it(server):
    """A non-streamed request whose client gives up (here: a 1 s read timeout) stops generating
    too, rather than running its 1,500 tokens for nobody."""
    cancelled = 'tuneforge_inference_requests_total{model="SmolLM2-135M-Instruct",outcome="cancelled"}'
    cancelled_before = _metric(server, cancelled)
    body = {"model": BASE, "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server['url']}/v1/completions", json=body, headers=_headers(server), timeout=1.0)
    deadline = time.monotonic() + 5
    while _metric(server, "tuneforge_inference_running") > 0:
        assert time.monotonic() < deadline, "the abandoned request still holds its batch row"
        time.sleep(0.1)
    assert _metric(server, cancelled) == cancelled_before + 1


def test_official_openai_client_streaming_and_not(server):
    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key=server["keys"]["acme"])
    messages = [{"role": "user", "content": PROMPTS[2]}]
    answer = client.chat.completions.create(model=A1, messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    stream = client.chat.completions.create(
        model=A1,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == answer.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens

    text = client.completions.create(model=BASE, prompt="Paris is", max_tokens=6, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=BASE, prompt="Paris is", max_tokens=6, temperature=0, stream=True
        )
    )
    assert streamed == text.choices[0].text and text.usage.completion_tokens == 6
    sampled = client.chat.completions.create(
        model=A1, messages=messages, max_tokens=8, temperature=0.8, top_p=0.9, seed=7
    )
    again = client.chat.completions.create(
        model=A1, messages=messages, max_tokens=8, temperature=0.8, top_p=0.9, seed=7
    )
    assert sampled.choices[0].message.content == again.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=messages, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BASE, messages=messages, max_tokens=4, temperature=50)
