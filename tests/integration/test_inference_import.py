"""`tuneforge models import`: a PEFT adapter directory checked against the base model, copied
into the artifact store under its sha256 with a manifest, registered as a Model row."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from sqlalchemy import select
from transformers import AutoModelForCausalLM

from app.core.artifacts import sha256_file
from app.core.db import session_scope
from app.core.settings import EMBEDDED_BASE_MODEL
from app.models import Model, Tenant
from tests.conftest import link_base_model, tuneforge
from tests.inference_support import write_peft_adapter

pytestmark = pytest.mark.slow  # every test here runs the `tuneforge` console script


@pytest.fixture(scope="module")
def peft_saved_adapter(tmp_path_factory, base_model_dir):
    """An adapter written by peft's own save_pretrained, as the training worker publishes them."""
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    directory = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def test_import_publishes_the_adapter_and_registers_the_model(settings, base_model_dir, peft_saved_adapter):
    link_base_model(settings.data_dir, base_model_dir)
    result = tuneforge(
        "models", "import", "--tenant", "acme", "--name", "support-bot", str(peft_saved_adapter)
    )
    model_id = result.stdout.strip().splitlines()[-1]
    assert model_id == f"ft:{EMBEDDED_BASE_MODEL}:acme:support-bot"
    version = sha256_file(peft_saved_adapter / "adapter_model.safetensors")
    stored = settings.adapters_dir / version
    assert json.loads((stored / "manifest.json").read_text())["sha256"] == version
    assert sorted(p.name for p in stored.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    with session_scope() as session:
        row = session.get(Model, model_id)
        tenant = session.scalar(select(Tenant).where(Tenant.name == "acme"))
        assert (row.kind, row.version, row.tenant_id, row.base_model) == (
            "import",
            version,
            tenant.id,
            EMBEDDED_BASE_MODEL,
        )
        assert settings.data_dir / row.path == stored

    again = tuneforge(
        "models", "import", "--tenant", "acme", "--name", "support-bot", str(peft_saved_adapter), check=False
    )
    assert again.returncode == 2 and "already exists" in again.stderr


def _broken(tmp_path, peft_saved_adapter, base_model_dir, how):
    directory = tmp_path / how
    shutil.copytree(peft_saved_adapter, directory)
    if how == "extra-file":
        (directory / "training_args.bin").write_bytes(b"pickle")
    elif how == "wrong-shapes":
        weights = directory / "adapter_model.safetensors"
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        name = next(n for n in tensors if n.endswith("lora_A.weight"))
        tensors[name] = torch.zeros(4, 123)
        save_file(tensors, weights)
    elif how == "mixed-dtypes":
        weights = directory / "adapter_model.safetensors"
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        name = next(n for n in tensors if n.endswith("lora_B.weight"))
        tensors[name] = tensors[name].to(torch.bfloat16)
        save_file(tensors, weights)
    elif how == "truncated":
        weights = directory / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "other-base":
        config = json.loads((directory / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "TinyLlama-1.1B-Chat"
        (directory / "adapter_config.json").write_text(json.dumps(config))
    elif how == "dora":
        write_peft_adapter(directory, base_model_dir, seed=1)
        config = json.loads((directory / "adapter_config.json").read_text())
        config["use_dora"] = True
        (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    "how, message",
    [
        ("extra-file", "unexpected files"),
        ("wrong-shapes", "do not fit the base"),
        ("mixed-dtypes", "holds BF16/F32 tensors; save all LoRA tensors in one of F32, BF16, F16"),
        ("truncated", "truncated"),
        ("other-base", "trained on TinyLlama"),
        ("dora", "use_dora"),
    ],
)
def test_import_refuses_adapters_that_cannot_be_served(
    settings, base_model_dir, peft_saved_adapter, tmp_path, how, message
):
    link_base_model(settings.data_dir, base_model_dir)
    directory = _broken(tmp_path, peft_saved_adapter, base_model_dir, how)
    result = tuneforge("models", "import", "--tenant", "acme", "--name", how, str(directory), check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    with session_scope() as session:
        assert session.scalars(select(Model)).all() == []
    assert not settings.adapters_dir.exists() or not any(settings.adapters_dir.iterdir())
