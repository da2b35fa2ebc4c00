"""One API process serving several base models (TUNEFORGE_SERVE_BASE_MODELS): each base gets its own
engine and requests route by model id; a configured base that is not served, or a served one that
cannot be (unknown family, not configured), is refused clearly while the others serve."""

import json

import httpx
import pytest
import torch
from openai import BadRequestError, OpenAI
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from app.core.migrate import upgrade
from app.core.settings import Settings
from tests.conftest import link_base_model, running_api, tuneforge
from tests.inference_support import create_test_key, write_peft_adapter
from tests.model_families_support import build_base

SERVED = ["tiny-qwen3", "tiny-gemma2", "tiny-gpt2", "ghost"]
PROMPT = "The weather today is"
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def bases(tmp_path_factory, base_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    root = tmp_path_factory.mktemp("bases")
    for family in ("qwen3", "gemma2", "llama"):
        build_base(family, root / f"tiny-{family}", tokenizer)
    # A family Tuneforge does not support: its config is all a refusal needs to read.
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2).save_pretrained(root / "tiny-gpt2")
    return {name: root / name for name in ("tiny-qwen3", "tiny-gemma2", "tiny-llama", "tiny-gpt2")}


@pytest.fixture(scope="module")
def server(tmp_path_factory, base_model_dir, bases):
    data_dir = tmp_path_factory.mktemp("data")
    link_base_model(data_dir, base_model_dir)
    env = {
        "TUNEFORGE_DATA_DIR": str(data_dir),
        "TUNEFORGE_DATABASE_URL": f"sqlite:///{data_dir / 'tuneforge.db'}",
        "TUNEFORGE_DEVICE": "cpu",
        "TUNEFORGE_BASE_MODELS": json.dumps({name: str(path) for name, path in bases.items()}),
        "TUNEFORGE_SERVE_BASE_MODELS": json.dumps(SERVED),
    }
    settings = Settings(data_dir=data_dir, database_url=env["TUNEFORGE_DATABASE_URL"])
    upgrade(settings.resolved_database_url)
    key = create_test_key(settings, "acme")
    adapters = {}
    for seed, base in enumerate(("tiny-qwen3", "tiny-gemma2"), start=1):
        directory = write_peft_adapter(
            data_dir.parent / f"adapter-{base}",
            bases[base],
            seed,
            targets=("q_proj", "v_proj", "down_proj"),
            std=0.3,
        )
        imported = tuneforge(
            "models", "import", "--tenant", "acme", "--name", "mine", "--base", base, str(directory), env=env
        )
        adapters[base] = (imported.stdout.strip().splitlines()[-1], directory)
    with running_api(env) as url:
        yield {"url": url, "key": key, "env": env, "adapters": adapters}


def transformers_text(base_dir, adapter_dir=None) -> str:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    return tokenizer.decode(out[0, ids.shape[1] :])


def test_each_base_and_its_adapters_are_served_by_their_own_engine(server, bases):
    client = OpenAI(base_url=f"{server['url']}/v1", api_key=server["key"])

    def complete(model: str) -> str:
        answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
        return answer.choices[0].text

    for base in ("tiny-qwen3", "tiny-gemma2"):
        model_id, adapter_dir = server["adapters"][base]
        # Greedy text equal to transformers + PEFT on that base: the request reached its base's engine.
        assert complete(base) == transformers_text(bases[base])
        assert complete(model_id) == transformers_text(bases[base], adapter_dir)
        assert complete(model_id) != complete(base)

    listed = {m.id for m in client.models.list()}
    assert listed == {"tiny-qwen3", "tiny-gemma2", *(m for m, _ in server["adapters"].values())}


def test_a_configured_base_that_is_not_served_gets_400_naming_the_setting(server):
    client = OpenAI(base_url=f"{server['url']}/v1", api_key=server["key"])
    with pytest.raises(BadRequestError) as refused:
        client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=4)
    error = refused.value.body
    assert error["code"] == "model_not_served"
    assert "TUNEFORGE_SERVE_BASE_MODELS" in error["message"]
    with pytest.raises(BadRequestError) as unsupported:
        client.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=4)
    assert "'gpt2' model" in unsupported.value.body["message"]


def test_readyz_and_the_cli_say_which_bases_are_refused_and_why(server):
    ready = httpx.get(f"{server['url']}/readyz", timeout=10)
    assert ready.status_code == 200
    body = ready.json()
    assert body["checks"]["engine:tiny-qwen3"] == body["checks"]["engine:tiny-gemma2"] == "ok"
    assert set(body["refused"]) == {"tiny-gpt2", "ghost"}
    assert "'gpt2' model" in body["refused"]["tiny-gpt2"]
    assert "qwen3" in body["refused"]["tiny-gpt2"]  # the supported families
    assert "TUNEFORGE_BASE_MODELS" in body["refused"]["ghost"]

    rows = {
        line.split("\t")[0]: line.split("\t")
        for line in tuneforge("models", "bases", env=server["env"]).stdout.splitlines()[1:]
    }
    assert rows["tiny-qwen3"][1:2] == ["Qwen3"] and rows["tiny-qwen3"][4:] == ["yes", "yes"]
    assert rows["tiny-gemma2"][4:] == ["yes", "yes"]
    assert rows["tiny-llama"][4:] == ["yes", "no: not in TUNEFORGE_SERVE_BASE_MODELS"]
    assert rows["SmolLM2-135M-Instruct"][2:4] == ["135M", "float32"]
    assert rows["tiny-gpt2"][4].startswith("no: not a supported family")
    assert rows["ghost"][5].startswith("no: in TUNEFORGE_SERVE_BASE_MODELS but not in")
