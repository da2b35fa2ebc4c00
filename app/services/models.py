"""Models visible to a tenant: configured base models plus its fine-tunes, checkpoints and imports."""

from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, func, select
from sqlalchemy.orm import Session

from app.core.base_models import available_base_models
from app.core.errors import NotFound
from app.core.settings import Settings
from app.core.storage import ArtifactStore
from app.models import Model, Tenant

BASE_MODEL_CREATED_AT = 1_700_000_000


@dataclass(frozen=True)
class ResolvedModel:
    """What the inference engine needs to serve a model id: its base and, for an adapter, the
    immutable version (content hash) and its key in the artifact store."""

    id: str
    base_model: str
    version: str | None = None
    adapter_key: str | None = None


def model_not_found(model_id: str) -> NotFound:
    return NotFound(
        f"The model '{model_id}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


# Columns, not the ORM entity, in a statement built once: this runs for every inference request,
# and loading an entity (or building the statement) costs several times more CPU than the query.
_MODEL_FOR_SERVING = select(Model.tenant_id, Model.base_model, Model.version, Model.path).where(
    Model.id == bindparam("model_id")
)


def resolve_model(
    session: Session | Connection, settings: Settings, tenant: Tenant, model_id: str
) -> ResolvedModel:
    if model_id in available_base_models(settings):
        return ResolvedModel(id=model_id, base_model=model_id)
    row = session.execute(_MODEL_FOR_SERVING, {"model_id": model_id}).first()
    # Another tenant's model is reported exactly like a missing one.
    if row is None or row.tenant_id != tenant.id:
        raise model_not_found(model_id)
    return ResolvedModel(
        id=model_id,
        base_model=row.base_model,
        version=row.version,
        adapter_key=row.path,
    )


def list_models(session: Session, tenant: Tenant, base_models: list[str]) -> list[Model]:
    """The tenant's models built on any of `base_models`."""
    return list(
        session.scalars(
            select(Model)
            .where(Model.tenant_id == tenant.id, Model.base_model.in_(base_models))
            .order_by(Model.created_at, Model.id)
        )
    )


def get_model(session: Session, tenant: Tenant, model_id: str) -> Model:
    row = session.get(Model, model_id)
    if row is None or row.tenant_id != tenant.id:
        raise model_not_found(model_id)
    return row


def delete_model(session: Session, store: ArtifactStore, tenant: Tenant, model_id: str) -> Model:
    """Delete a tenant's model id and commit; its adapter files go too once no other id points at
    them (a checkpoint's stay with its job's checkpoint)."""
    row = get_model(session, tenant, model_id)
    session.delete(row)
    session.flush()
    still_used = session.scalar(select(func.count()).select_from(Model).where(Model.path == row.path))
    session.commit()
    if not still_used and row.kind != "checkpoint":
        store.delete_prefix(row.path)
    return row
