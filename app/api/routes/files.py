from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, StreamingResponse

from app.api.deps import SessionDep, StoreDep, TenantDep
from app.api.openapi import error_responses, text_response
from app.core.errors import PayloadTooLarge
from app.core.settings import get_settings
from app.schemas import Deleted, FilePublic, ListPage
from app.services import files as service

router = APIRouter(tags=["files"], responses=error_responses(401))
# Multipart framing around the file itself; a body larger than limit + this is refused unread.
MULTIPART_OVERHEAD = 64 * 1024


@router.post("/files", response_model=FilePublic, responses=error_responses(400, 413))
def upload_file(
    request: Request,
    session: SessionDep,
    store: StoreDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="JSONL, one training example per line.")],
    purpose: Annotated[Literal["fine-tune"], Form()],
):
    """Upload a JSONL training file (purpose `fine-tune`); every line is validated."""
    settings = get_settings()
    declared = int(request.headers.get("content-length") or 0)
    if declared > settings.max_upload_bytes + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(
            f"Upload of {declared} bytes exceeds the {settings.max_upload_bytes} byte limit.", param="file"
        )
    row = service.store_file(
        session,
        settings,
        store,
        tenant,
        upload=file.file,
        filename=file.filename or "upload.jsonl",
        purpose=purpose,
    )
    return FilePublic.model_validate(row)


@router.get("/files", response_model=ListPage[FilePublic], responses=error_responses(400, 404))
def list_files(
    session: SessionDep,
    tenant: TenantDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
):
    rows, more = service.list_files(session, tenant, purpose=purpose, after=after, limit=limit, order=order)
    return ListPage[FilePublic].of([FilePublic.model_validate(r) for r in rows], more)


@router.get("/files/{file_id}", response_model=FilePublic, responses=error_responses(404))
def retrieve_file(file_id: str, session: SessionDep, tenant: TenantDep):
    return FilePublic.model_validate(service.get_file(session, tenant, file_id))


@router.get(
    "/files/{file_id}/content",
    response_class=FileResponse,
    responses={**text_response("application/jsonl", "The file as uploaded."), **error_responses(404)},
)
def file_content(file_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep):
    row = service.get_file(session, tenant, file_id)
    key = service.file_key(row.id)
    path = store.local_path(key)
    if path is not None:
        return FileResponse(path, media_type="application/jsonl", filename=row.filename)
    # Streamed from object storage as it arrives, with the headers FileResponse would send.
    return StreamingResponse(
        store.iter_bytes(key),
        media_type="application/jsonl",
        headers={"content-length": str(row.bytes), "content-disposition": _attachment(row.filename)},
    )


def _attachment(filename: str) -> str:
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


@router.delete("/files/{file_id}", response_model=Deleted, responses=error_responses(404))
def delete_file(file_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep):
    service.delete_file(session, store, tenant, file_id)
    return Deleted(id=file_id, object="file")
