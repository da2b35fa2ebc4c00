"""Request dependencies: a database session per request and the caller's tenant from the API key."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.db import get_read_sessionmaker, get_sessionmaker, read_transaction
from app.core.errors import Unauthorized
from app.core.settings import get_settings
from app.core.storage import ArtifactStore, open_store
from app.models import Tenant
from app.services.keys import lookup_tenant


def get_session() -> Iterator[Session]:
    with get_sessionmaker()() as session:
        yield session


def get_read_session() -> Iterator[Session]:
    with get_read_sessionmaker()() as session:
        yield session


def get_store() -> ArtifactStore:
    """The artifact store of the settings: the data dir, or S3."""
    return open_store(get_settings())


SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
# For routes that only read: on SQLite it never waits for the write lock (see app.core.db).
ReadSessionDep = Annotated[Session, Depends(get_read_session)]


# Reads `Authorization: Bearer <key>` and declares it in the OpenAPI document for every route that
# depends on it; a missing key is refused below, with the OpenAI error body.
_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="An API key made with `tuneforge keys create --tenant NAME`.",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]


def bearer_key(credentials: HTTPAuthorizationCredentials | None) -> str:
    key = credentials.credentials.strip() if credentials else ""
    if not key:
        raise Unauthorized(
            "Missing API key. Send it as 'Authorization: Bearer <key>'; "
            "create one with 'tuneforge keys create --tenant NAME'."
        )
    return key


def get_tenant(credentials: BearerDep) -> Tenant:
    key = bearer_key(credentials)
    # Its own short read-only transaction: the route's session may be a writing one.
    with read_transaction() as connection:
        return lookup_tenant(connection, key)


TenantDep = Annotated[Tenant, Depends(get_tenant)]


async def get_api_key(credentials: BearerDep) -> str:
    return bearer_key(credentials)


# The key alone, checked for presence on the event loop: inference routes look it up together
# with the model, in the one worker-thread hop they take anyway (see app.services.inference).
ApiKeyDep = Annotated[str, Depends(get_api_key)]
