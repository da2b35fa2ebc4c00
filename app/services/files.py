"""Training files: every line validated before the file is stored; stored atomically."""

import hashlib
import shutil
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import InvalidRequest, NotFound, PayloadTooLarge
from app.core.settings import Settings
from app.core.storage import ArtifactStore
from app.core.training_rows import BadLine, read_rows
from app.models import File, Tenant, new_id
from app.services.pagination import page

PURPOSE = "fine-tune"


def validate_training_jsonl(path: Path) -> tuple[str, int]:
    """Read every line; return (format, examples) or raise InvalidRequest naming the first bad line."""
    fmt, examples = None, 0
    try:
        with open(path, "rb") as f:
            for _, row in read_rows(f):
                fmt, examples = row.format, examples + 1
    except BadLine as exc:
        raise InvalidRequest(
            f"Invalid training file: {exc}.", param="file", code="invalid_file_format"
        ) from None
    if not examples:
        raise InvalidRequest(
            "Invalid training file: it holds no examples; give at least one JSON line.",
            param="file",
            code="invalid_file_format",
        )
    return fmt, examples


def file_key(file_id: str) -> str:
    return f"files/{file_id}.jsonl"


def store_file(
    session: Session,
    settings: Settings,
    store: ArtifactStore,
    tenant: Tenant,
    *,
    upload: BinaryIO,
    filename: str,
    purpose: str,
) -> File:
    if purpose != PURPOSE:
        raise InvalidRequest(
            f"purpose {purpose!r} is not supported; upload training data with purpose 'fine-tune'.",
            param="purpose",
        )
    file_id = new_id("file")
    # Spooled to the local disk (validation reads it again), then published: renamed into the
    # data dir, or uploaded to S3 in parts.
    tmp_dir = store.temp_dir(file_key(file_id))
    tmp = tmp_dir / f"{file_id}.jsonl"
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for block in iter(lambda: upload.read(1 << 20), b""):
                size += len(block)
                if size > settings.max_upload_bytes:
                    raise PayloadTooLarge(
                        f"File is larger than the {settings.max_upload_bytes} byte limit; "
                        "split it or raise TUNEFORGE_MAX_UPLOAD_BYTES.",
                        param="file",
                    )
                digest.update(block)
                out.write(block)
        fmt, examples = validate_training_jsonl(tmp)
        store.publish_file(tmp, file_key(file_id))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    row = File(
        id=file_id,
        tenant_id=tenant.id,
        filename=filename,
        purpose=purpose,
        bytes=size,
        sha256=digest.hexdigest(),
        format=fmt,
        examples=examples,
    )
    session.add(row)
    try:
        session.commit()
    except Exception:
        store.delete([file_key(file_id)])
        raise
    return row


def get_file(session: Session, tenant: Tenant, file_id: str, *, param: str = "file_id") -> File:
    row = session.get(File, file_id)
    if row is None or row.tenant_id != tenant.id:
        raise NotFound(f"No such file: '{file_id}'.", param=param)
    return row


def list_files(
    session: Session,
    tenant: Tenant,
    *,
    purpose: str | None,
    after: str | None,
    limit: int,
    order: str,
) -> tuple[list[File], bool]:
    query = select(File).where(File.tenant_id == tenant.id)
    if purpose:
        query = query.where(File.purpose == purpose)
    pivot = None
    if after:
        cursor = get_file(session, tenant, after, param="after")
        pivot = (cursor.created_at, cursor.id)
    return page(session, query, (File.created_at, File.id), pivot, limit, descending=order == "desc")


def delete_file(session: Session, store: ArtifactStore, tenant: Tenant, file_id: str) -> None:
    row = get_file(session, tenant, file_id)
    session.delete(row)
    session.commit()
    store.delete([file_key(file_id)])
