"""Request and response models of the public HTTP contract (DESIGN.md §3)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from app.realign import Alignment


class EmbeddingRequest(BaseModel):
    """OpenAI-shaped; unknown fields (e.g. ``user``) are ignored so OpenAI SDKs work."""

    model_config = ConfigDict(extra="ignore")

    input: StrictStr | list[StrictStr] = Field(description="A text or a list of texts.")
    profile: StrictStr | None = Field(default=None, description="Profile name; default if absent.")
    alignment: Alignment = "realign"
    encoding_format: Literal["float", "base64"] = "float"
    dtype: Literal["float32", "float16"] = Field(
        default="float32", description="Element type of base64 and .npy outputs."
    )
    model: StrictStr | None = Field(
        default=None, description="If given, must match the served model."
    )

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """Documented for OpenAPI; the route serialises the same shape directly with orjson."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    profile: str | None
    alignment: str
    usage: Usage
    truncated: list[int] = Field(description="Indices of inputs cut at the context length.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "realign-serve"
    fingerprint: str
    dim: int
    context_length: int
    device: str
    dtype: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ProfileList(BaseModel):
    object: Literal["list"] = "list"
    default: str | None
    data: list[dict[str, Any]]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str


class ErrorResponse(BaseModel):
    error: ErrorBody
