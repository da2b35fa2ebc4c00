from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from app.api.deps import SessionDep, TenantDep
from app.core.errors import InvalidRequest, PayloadTooLarge
from app.core.settings import get_settings
from app.schemas import Deleted, FilePublic, ListPage
from app.services import files as service

router = APIRouter(tags=["files"])
# Multipart framing around the file itself; a body larger than limit + this is refused unread.
MULTIPART_OVERHEAD = 64 * 1024


@router.post("/files", response_model=FilePublic)
def upload_file(
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    file: Annotated[UploadFile | None, Form()] = None,
    purpose: Annotated[str | None, Form()] = None,
):
    """Upload a JSONL training file (purpose `fine-tune`); every line is validated."""
    settings = get_settings()
    declared = int(request.headers.get("content-length") or 0)
    if declared > settings.max_upload_bytes + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(
            f"Upload of {declared} bytes exceeds the {settings.max_upload_bytes} byte limit.", param="file"
        )
    if file is None:
        raise InvalidRequest("Send the file as a multipart form field named 'file'.", param="file")
    if purpose is None:
        raise InvalidRequest("Send the form field 'purpose' with the value 'fine-tune'.", param="purpose")
    row = service.store_file(
        session,
        settings,
        tenant,
        upload=file.file,
        filename=file.filename or "upload.jsonl",
        purpose=purpose,
    )
    return FilePublic.model_validate(row)


@router.get("/files", response_model=ListPage[FilePublic])
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


@router.get("/files/{file_id}", response_model=FilePublic)
def retrieve_file(file_id: str, session: SessionDep, tenant: TenantDep):
    return FilePublic.model_validate(service.get_file(session, tenant, file_id))


@router.get("/files/{file_id}/content")
def file_content(file_id: str, session: SessionDep, tenant: TenantDep):
    row = service.get_file(session, tenant, file_id)
    return FileResponse(
        service.file_path(get_settings(), row.id), media_type="application/jsonl", filename=row.filename
    )


@router.delete("/files/{file_id}", response_model=Deleted)
def delete_file(file_id: str, session: SessionDep, tenant: TenantDep):
    service.delete_file(session, get_settings(), tenant, file_id)
    return Deleted(id=file_id, object="file")
