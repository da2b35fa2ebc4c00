"""Importing a PEFT LoRA adapter directory: checked against its base model, copied into the
artifact store under its sha256 with a manifest, registered as a model id."""

import json
import shutil
from pathlib import Path

from sqlalchemy.orm import Session

from app.core.adapter_files import ADAPTER_FILES, AdapterFileError, check_adapter_dir
from app.core.artifacts import WEIGHTS_FILE, sha256_file, write_manifest
from app.core.storage import ArtifactStore
from app.models import Model

# peft's save_pretrained writes a model card too; it is left behind, never copied.
IGNORED_FILES = ("README.md",)


def import_adapter(
    session: Session,
    store: ArtifactStore,
    tenant_id: str,
    tenant_name: str,
    name: str,
    source: Path,
    base_model: str,
    base_dir: Path,
) -> Model:
    """Copy a PEFT adapter directory into adapters/<sha256>/ and register the model id
    ft:<base>:<tenant>:<name> (kind 'import')."""
    extra = sorted(p.name for p in source.iterdir() if p.name not in ADAPTER_FILES + IGNORED_FILES)
    if extra:
        raise AdapterFileError(f"unexpected files in the adapter directory: {', '.join(extra)}")
    check_adapter_dir(source, base_dir)
    config = json.loads((source / "adapter_config.json").read_text())
    declared = Path(str(config.get("base_model_name_or_path") or base_model)).name
    if declared.lower() != base_model.lower():
        raise AdapterFileError(f"the adapter was trained on {declared}, not on {base_model}")
    model_id = f"ft:{base_model}:{tenant_name}:{name}"
    if session.get(Model, model_id) is not None:
        raise AdapterFileError(f"the model {model_id} already exists; delete it first")
    version = sha256_file(source / WEIGHTS_FILE)
    final = f"adapters/{version}"
    tmp = store.temp_dir(final)
    try:
        for file in ADAPTER_FILES:
            shutil.copyfile(source / file, tmp / file)
        copied = write_manifest(tmp, base_model=base_model, source="import", model=model_id)
        if copied != version:
            raise AdapterFileError("adapter_model.safetensors changed while it was imported")
        store.publish_dir(tmp, final)  # content-addressed: an existing copy holds the same bytes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    row = Model(
        id=model_id,
        tenant_id=tenant_id,
        base_model=base_model,
        kind="import",
        version=version,
        path=final,
    )
    session.add(row)
    session.flush()
    return row
