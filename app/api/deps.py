"""Request dependencies: a database session per request and the caller's tenant from the API key."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import get_read_sessionmaker, get_sessionmaker
from app.core.errors import Unauthorized
from app.core.security import hash_key
from app.models import ApiKey, Tenant


def get_session() -> Iterator[Session]:
    with get_sessionmaker()() as session:
        yield session


def get_read_session() -> Iterator[Session]:
    with get_read_sessionmaker()() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
# For routes that only read: on SQLite it never waits for the write lock (see app.core.db).
ReadSessionDep = Annotated[Session, Depends(get_read_session)]


def get_tenant(request: Request) -> Tenant:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized(
            "Missing API key. Send it as 'Authorization: Bearer <key>'; "
            "create one with 'tuneforge keys create --tenant NAME'."
        )
    # Its own short read-only session, looked up on every request (a revoked key is refused at
    # once). The Tenant comes back detached with its columns loaded; routes use tenant.id/.name.
    with get_read_sessionmaker()() as session, session.begin():
        row = session.execute(
            select(Tenant, ApiKey)
            .join(ApiKey, ApiKey.tenant_id == Tenant.id)
            .where(ApiKey.key_hash == hash_key(key.strip()))
        ).first()
    if row is None or row.ApiKey.revoked_at is not None:
        raise Unauthorized("Incorrect or revoked API key provided.")
    return row.Tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]
