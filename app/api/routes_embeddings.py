"""``POST /v1/embeddings``: validate, embed (cache → batcher → encoder → realign), encode."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from app.api.deps import ServiceDep
from app.api.schemas import EmbeddingRequest, EmbeddingResponse, ErrorResponse
from app.config import Settings
from app.embedder import EmbedResult
from app.errors import EmptyInputError, InputError, NotFoundError, TooManyInputsError

router = APIRouter()
NPY = "application/x-npy"
#: Client left: nginx's convention; nobody reads this response.
CLIENT_CLOSED = 499


def check_inputs(texts: list[str], settings: Settings) -> None:
    """The request limits, in one place."""
    if not texts:
        raise EmptyInputError("input must contain at least one text")
    if len(texts) > settings.max_inputs_per_request:
        raise TooManyInputsError(
            f"{len(texts)} inputs exceed the limit of {settings.max_inputs_per_request} per request"
        )
    for i, text in enumerate(texts):
        if not text.strip():
            raise EmptyInputError(f"input[{i}] is empty")
        if len(text) > settings.max_text_chars:
            raise TooManyInputsError(
                f"input[{i}] has {len(text)} characters, over the limit of {settings.max_text_chars}"
            )
        if "\x00" in text:
            raise InputError(f"input[{i}] contains a NUL character")


async def _until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)},
)
async def create_embeddings(
    body: EmbeddingRequest, request: Request, service: ServiceDep
) -> Response:
    texts = body.texts()
    check_inputs(texts, service.settings)
    if body.model is not None and body.model not in (
        service.served_name,
        service.encoder.fingerprint.model_id,
    ):
        raise NotFoundError(
            f"model {body.model!r} is not served here; this service runs {service.served_name!r}"
        )
    profile = service.embedder.profile(body.profile, body.alignment)

    work = asyncio.ensure_future(service.embedder.embed(texts, profile, body.alignment))
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()  # the handler itself was cancelled (e.g. shutdown): take the work along
        raise
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        return Response(status_code=CLIENT_CLOSED)
    result = work.result()
    headers = {
        "x-queue-time": f"{result.queue_s * 1000:.3f}",
        "x-inference-time": f"{result.inference_s * 1000:.3f}",
        "x-cache-time": f"{result.cache_s * 1000:.3f}",
        "x-cache-hits": str(result.cache_hits),
        "x-prompt-tokens": str(result.tokens),
    }
    if NPY in request.headers.get("accept", ""):
        return _npy_response(result, body.dtype, headers)
    return Response(
        _json_body(result, body, service.served_name),
        media_type="application/json",
        headers=headers,
    )


def _wire(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """Rows as the little-endian element type the client asked for (base64 and .npy)."""
    return vectors.astype("<f2" if dtype == "float16" else "<f4")


def _json_body(result: EmbedResult, body: EmbeddingRequest, model: str) -> bytes:
    vectors = result.vectors.numpy()
    data: list[dict[str, Any]]
    if body.encoding_format == "base64":
        arr = _wire(vectors, body.dtype)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(row.tobytes()).decode("ascii"),
            }
            for i, row in enumerate(arr)
        ]
    else:
        data = [
            {"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(vectors)
        ]
    payload = {
        "object": "list",
        "data": data,
        "model": model,
        "profile": result.profile,
        "alignment": body.alignment,
        "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
        "truncated": result.truncated,
    }
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def _npy_response(result: EmbedResult, dtype: str, headers: dict[str, str]) -> Response:
    buf = io.BytesIO()
    np.save(buf, _wire(result.vectors.numpy(), dtype), allow_pickle=False)
    headers = {**headers, "x-truncated": ",".join(map(str, result.truncated))}
    return Response(buf.getvalue(), media_type=NPY, headers=headers)
