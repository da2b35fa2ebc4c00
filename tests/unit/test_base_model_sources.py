"""Configured base models from a local directory or a hub id in the standard Hugging Face cache, as
`tuneforge models bases` reports them on a host that reaches no hub (HF_HUB_OFFLINE=1)."""

import json

import pytest
from transformers import AutoTokenizer

from tests.conftest import tuneforge
from tests.model_families_support import build_base


@pytest.mark.slow
def test_a_hub_id_resolves_through_the_hugging_face_cache(tmp_path, base_model_dir):
    # The standard cache layout: models--ORG--NAME/refs/main names the snapshot in snapshots/.
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-qwen3"
    build_base("qwen3", repo / "snapshots" / revision, AutoTokenizer.from_pretrained(base_model_dir))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    local = tmp_path / "local-phi3"
    build_base("phi3", local, AutoTokenizer.from_pretrained(base_model_dir))
    env = {
        "TUNEFORGE_DATA_DIR": str(tmp_path / "data"),
        "TUNEFORGE_BASE_MODELS": json.dumps(
            {"qwen-hub": "acme/tiny-qwen3", "phi-local": str(local), "gone": "acme/not-cached"}
        ),
        "TUNEFORGE_SERVE_BASE_MODELS": json.dumps(["qwen-hub", "phi-local"]),
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
    }
    lines = tuneforge("models", "bases", env=env).stdout.splitlines()
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert rows["qwen-hub"][1] == "Qwen3" and rows["qwen-hub"][4:] == ["yes", "yes"]
    assert rows["phi-local"][1] == "Phi-3" and rows["phi-local"][4:] == ["yes", "yes"]
    assert "neither a local directory nor a hub id in the Hugging Face cache" in rows["gone"][5]
