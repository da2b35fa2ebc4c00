"""Tenants and their API keys."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.security import display_prefix, generate_key, hash_key
from app.models import ApiKey, Tenant, now


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
