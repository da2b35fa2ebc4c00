"""Manifests record the sha256 of each block of the weights file; both load paths verify the
blocks (and the file's size) against them, and still verify manifests written before blocks
existed against the whole-file sha256."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from app.core.adapter_files import AdapterFileError
from app.core.artifacts import BLOCK_BYTES, sha256_file, write_manifest
from app.core.db import session_scope
from app.core.settings import EMBEDDED_BASE_MODEL
from app.core.storage import open_store
from app.inference.adapters import load_adapter_staged
from app.inference.messages import AdapterRef
from app.services.adapter_import import import_adapter
from app.services.keys import get_or_create_tenant
from tests.inference_support import load_adapter_weights, write_peft_adapter

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MISMATCH = "does not match its manifest"


def load_both(ref: AdapterRef, base_dir):
    """Both load paths; each returns only verified weights."""
    weights = load_adapter_weights(ref, base_dir)
    staged = load_adapter_staged(ref, base_dir, torch.float32, pin=False)
    for module, (A, B, scale) in weights.items():  # the same tensors, where the pool will read them
        part = staged.parts[module]
        assert (part.rank, part.scale) == (A.shape[0], scale)
        assert torch.equal(staged.flat[part.a_at : part.a_at + A.numel()].view_as(A), A)
        assert torch.equal(staged.flat[part.b_at : part.b_at + B.numel()].view_as(B), B)
    return weights


def refused_by_both(ref: AdapterRef, base_dir) -> None:
    with pytest.raises(AdapterFileError, match=MISMATCH):
        load_adapter_weights(ref, base_dir)
    with pytest.raises(AdapterFileError, match=MISMATCH):
        load_adapter_staged(ref, base_dir, torch.float32, pin=False)


@pytest.fixture
def adapter(tmp_path, base_model_dir) -> AdapterRef:
    """A published adapter several blocks long, its manifest written by write_manifest."""
    directory = tmp_path / "adapter"
    write_peft_adapter(directory, base_model_dir, seed=7, rank=4, targets=ALL_LINEAR)
    version = write_manifest(directory, base_model=EMBEDDED_BASE_MODEL)
    return AdapterRef(version, directory)


def weights_file(ref: AdapterRef):
    return ref.adapter_dir / "adapter_model.safetensors"


def block_digests(data: bytes) -> list[str]:
    return [hashlib.sha256(data[i : i + BLOCK_BYTES]).hexdigest() for i in range(0, len(data), BLOCK_BYTES)]


def test_manifest_has_the_sha256_and_the_digest_of_every_block(adapter, base_model_dir):
    data = weights_file(adapter).read_bytes()
    manifest = json.loads((adapter.adapter_dir / "manifest.json").read_text())
    assert manifest["sha256"] == adapter.version == hashlib.sha256(data).hexdigest()
    blocks = manifest["sha256_blocks"]
    assert blocks["block_bytes"] == BLOCK_BYTES
    expected = block_digests(data)
    assert len(expected) > 2 and len(data) % BLOCK_BYTES  # several blocks, the last one partial
    assert blocks["digests"] == expected
    weights = load_both(adapter, base_model_dir)
    tensors = load_file(weights_file(adapter))
    module = next(iter(weights))
    torch.testing.assert_close(weights[module][0], tensors[f"base_model.model.{module}.lora_A.weight"])


@pytest.mark.parametrize("where", ["middle", "last"])
def test_one_flipped_byte_is_refused(adapter, base_model_dir, where):
    path = weights_file(adapter)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if where == "middle" else -1] ^= 0x01  # tensor data: the header still parses
    path.write_bytes(data)
    refused_by_both(adapter, base_model_dir)


@pytest.mark.parametrize("cut", [1, BLOCK_BYTES - 1, "to a block boundary"])
def test_a_truncated_or_extended_file_is_refused(adapter, base_model_dir, cut):
    path = weights_file(adapter)
    data = path.read_bytes()
    # At a block boundary every remaining block still matches: only the block count tells.
    end = len(data) // BLOCK_BYTES * BLOCK_BYTES if cut == "to a block boundary" else len(data) - cut
    path.write_bytes(data[:end])
    refused_by_both(adapter, base_model_dir)
    path.write_bytes(data + bytes(BLOCK_BYTES))
    refused_by_both(adapter, base_model_dir)


def test_a_manifest_whose_sha256_is_not_the_version_is_refused(adapter, base_model_dir):
    refused_by_both(AdapterRef("0" * 64, adapter.adapter_dir), base_model_dir)


def test_a_manifest_without_block_digests_is_verified_whole(adapter, base_model_dir):
    manifest_path = adapter.adapter_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["sha256_blocks"]
    manifest_path.write_text(json.dumps(manifest))
    assert load_both(adapter, base_model_dir)
    path = weights_file(adapter)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)
    refused_by_both(adapter, base_model_dir)
    path.write_bytes(data[:-1])
    refused_by_both(adapter, base_model_dir)


def test_an_imported_adapter_gets_block_digests_and_loads(settings, tmp_path, base_model_dir):
    source = tmp_path / "source"
    write_peft_adapter(source, base_model_dir, seed=8, rank=4, targets=ALL_LINEAR)
    with session_scope() as session:
        tenant = get_or_create_tenant(session, "acme")
        row = import_adapter(
            session,
            open_store(settings),
            tenant.id,
            "acme",
            "blocks",
            source,
            EMBEDDED_BASE_MODEL,
            base_model_dir,
        )
        version, stored = row.version, settings.data_dir / row.path
    assert version == sha256_file(source / "adapter_model.safetensors")
    manifest = json.loads((stored / "manifest.json").read_text())
    data = (stored / "adapter_model.safetensors").read_bytes()
    assert manifest["sha256"] == version
    assert manifest["sha256_blocks"]["digests"] == block_digests(data)
    ref = AdapterRef(version, stored)
    assert load_both(ref, base_model_dir)
    weights = bytearray(data)
    weights[len(weights) // 2] ^= 0x80
    (stored / "adapter_model.safetensors").write_bytes(weights)
    refused_by_both(ref, base_model_dir)
