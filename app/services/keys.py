"""Tenants and their API keys."""

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.orm import Session

from app.core.errors import Unauthorized
from app.core.security import display_prefix, generate_key, hash_key
from app.models import ApiKey, Tenant, now

# Built once: building a statement costs more than running it.
_TENANT_BY_KEY_HASH = (
    select(Tenant.id, Tenant.name, ApiKey.revoked_at)
    .join(ApiKey, ApiKey.tenant_id == Tenant.id)
    .where(ApiKey.key_hash == bindparam("key_hash"))
)


def lookup_tenant(session: Session | Connection, key: str) -> Tenant:
    """The key's tenant, looked up on every request (a revoked key is refused at once). Read as
    plain columns (loading ORM entities costs several times more CPU, on every request) into a
    transient Tenant with the columns routes use, id and name: never add it to a session."""
    row = session.execute(_TENANT_BY_KEY_HASH, {"key_hash": hash_key(key)}).first()
    if row is None or row.revoked_at is not None:
        raise Unauthorized("Incorrect or revoked API key provided.")
    return Tenant(id=row.id, name=row.name)


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str) -> tuple[ApiKey, str]:
    """Returns the stored key row and the plaintext key, which is never stored."""
    tenant = get_or_create_tenant(session, tenant_name)
    key = generate_key()
    row = ApiKey(tenant_id=tenant.id, prefix=display_prefix(key), key_hash=hash_key(key))
    session.add(row)
    session.flush()
    return row, key


def list_keys(session: Session, tenant_name: str | None = None) -> list[tuple[ApiKey, Tenant]]:
    query = select(ApiKey, Tenant).join(Tenant).order_by(ApiKey.created_at, ApiKey.id)
    if tenant_name:
        query = query.where(Tenant.name == tenant_name)
    return [(k, t) for k, t in session.execute(query)]


def revoke_key(session: Session, key_id: str) -> bool:
    row = session.get(ApiKey, key_id)
    if row is None:
        return False
    if row.revoked_at is None:
        row.revoked_at = now()
    return True
