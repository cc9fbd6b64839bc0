"""``/v1/models`` (OpenAI list shape) and ``/v1/profiles``."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ServiceDep
from app.api.schemas import ModelCard, ModelList, ProfileList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(service: ServiceDep) -> ModelList:
    enc = service.encoder
    card = ModelCard(
        id=service.served_name,
        created=service.started_at,
        fingerprint=enc.fingerprint.model_id,
        dim=enc.dim,
        context_length=enc.context_length,
        device=str(enc.device),
        dtype=enc.fingerprint.dtype,
    )
    return ModelList(data=[card])


@router.get("/v1/profiles", response_model=ProfileList)
async def list_profiles(service: ServiceDep) -> ProfileList:
    reg = service.profiles
    return ProfileList(default=reg.default, data=[reg.profiles[n].summary() for n in reg.names()])


@router.get("/v1/profiles/{name}")
async def get_profile(name: str, service: ServiceDep) -> dict[str, object]:
    return service.profiles.get(name).summary()
