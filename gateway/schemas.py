"""Response models: what the API promises, and what /openapi.json documents."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(..., description="machine-readable, e.g. payload_too_large, unsupported_media_type")
    message: str = Field(..., description="human-readable; never contains image bytes")


class ErrorBody(BaseModel):
    """Every error the gateway returns has this shape."""

    error: ErrorDetail


class SearchHit(BaseModel):
    id: str = Field(..., description="int64 content id, as a string (JavaScript loses precision past 2^53)")
    label: str
    score: float = Field(..., description="cosine similarity, 1 = same direction")
    path: str = Field(..., description="file path relative to the image root")
    url: str
    thumb_url: str


class BreedGuess(BaseModel):
    label: str
    confidence: float = Field(..., ge=0.0, le=1.0)
    source: Literal["probs", "knn"] = Field(
        ..., description="probs: the model's classifier head; knn: score-weighted vote of the top-k labels")


class Timings(BaseModel):
    decode: float
    infer: float
    search: float
    total: float


class ModelInfo(BaseModel):
    name: str
    arch: str
    weights: str = Field(..., description="where the weights come from, e.g. 'ImageNet weights (torchvision)'")
    untrained: bool = Field(..., description="random weights: results show the plumbing, not quality")


class SearchResponse(BaseModel):
    results: list[SearchHit]
    breed_guess: BreedGuess | None
    timings_ms: Timings
    model: ModelInfo


class ImageAdded(BaseModel):
    id: str
    label: str
    path: str
    url: str
    thumb_url: str
    created: bool = Field(..., description="false when the same content was already indexed (label updated)")


class ImageDeleted(BaseModel):
    id: str
    deleted: bool
    file_removed: bool = Field(..., description="true when the file was one POST /v1/images had stored")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, bool]
    detail: dict[str, str] = Field(default_factory=dict)
    model: ModelInfo | None = Field(None, description="the model the gateway serves, from its model card")


class NotReady(Readiness):
    error: ErrorDetail
