from fastapi import APIRouter, Request

from app.api.deps import ReadSessionDep, SessionDep, StoreDep, TenantDep
from app.api.openapi import error_responses
from app.core.base_models import available_base_models
from app.core.errors import InvalidRequest
from app.core.settings import get_settings
from app.schemas import Deleted, ListPage, ModelPublic
from app.services import models as service

router = APIRouter(tags=["models"], responses=error_responses(401))
BASE_OWNER = "system"


def base_public(name: str) -> ModelPublic:
    return ModelPublic(id=name, created=service.BASE_MODEL_CREATED_AT, owned_by=BASE_OWNER)


@router.get("/models", response_model=ListPage[ModelPublic])
def list_models(request: Request, session: ReadSessionDep, tenant: TenantDep):
    """What this server can serve: its base models, then the caller's fine-tunes, checkpoints and
    imported adapters on them."""
    served = getattr(request.app.state, "served", None)
    bases = served.servable() if served is not None else []
    data = [base_public(n) for n in bases]
    data += [ModelPublic.model_validate(m) for m in service.list_models(session, tenant, bases)]
    return ListPage[ModelPublic].of(data, False)


@router.get("/models/{model_id:path}", response_model=ModelPublic, responses=error_responses(404))
def retrieve_model(model_id: str, session: ReadSessionDep, tenant: TenantDep):
    if model_id in available_base_models(get_settings()):
        return base_public(model_id)
    return ModelPublic.model_validate(service.get_model(session, tenant, model_id))


@router.delete("/models/{model_id:path}", response_model=Deleted, responses=error_responses(400, 404))
def delete_model(model_id: str, request: Request, session: SessionDep, store: StoreDep, tenant: TenantDep):
    """Delete a fine-tuned model: it is unloaded and later requests for it get 404."""
    settings = get_settings()
    if model_id in available_base_models(settings):
        raise InvalidRequest(
            f"'{model_id}' is a base model; only fine-tuned models can be deleted.", param="model"
        )
    row = service.delete_model(session, store, tenant, model_id)
    served = getattr(request.app.state, "served", None)
    if served is not None:
        served.unload(row.version)
    return Deleted(id=model_id, object="model")
