"""POST /v1/embeddings (also /embeddings): OpenAI's embeddings API on the server's embedder (`--embedding-model`).

    {"input": "text" | ["text", ...] | [ids] | [[ids], ...], "model"?, "encoding_format"?: "float" | "base64",
     "dimensions"?, "user"?, "truncate"?: true}
    -> {"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model", "usage"}

An input longer than the model's max_seq_length (256 tokens for MiniLM) is cut there, and the response names it in
`X-Freehold-Truncated-Inputs: 0, 3` (the inputs' indices); with `"truncate": false` (Freehold's field) such an
input is a 400 instead, as OpenAI's API answers any over-long input. Base64 vectors are the little-endian float32
bytes, as OpenAI sends them (the official client asks for base64 by default and decodes it).
"""
from __future__ import annotations

import base64
import time
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from freehold.embed import EmbedResult
from freehold.errors import InvalidRequestError
from freehold.server.embedding_worker import EmbeddingWorker
from freehold.server.errors import APIError, ServerShuttingDownError
from freehold.server.protocol import ErrorResponse
from freehold.server.serving import Serving

router = APIRouter()

ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404)}
MAX_INPUTS = 2048  # OpenAI's limit per request
TRUNCATED_HEADER = "X-Freehold-Truncated-Inputs"
_MAX_HEADER_INDICES = 64


class EmbeddingRequest(BaseModel):
    # strict types like freehold.server.protocol; unknown fields are dropped and listed (freehold.server.compat)
    model_config = ConfigDict(extra="allow", strict=True)

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts, token ids, or a list of token-id lists (at most 2048 inputs)")
    model: str | None = Field(None, description="the embedding model's name; absent: the server's embedder")
    encoding_format: Literal["float", "base64"] | None = Field(
        None, description="float (default) or base64 (little-endian float32 bytes)")
    dimensions: int | None = Field(None, description="only the model's own size (not a Matryoshka model)")
    user: str | None = Field(None, description="accepted; recorded nowhere")
    truncate: bool | None = Field(None, description="Freehold: cut over-long inputs at the model's max_seq_length "
                                                    "(default true) or refuse them with a 400 (false)")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


@router.post("/embeddings", response_model=EmbeddingResponse, include_in_schema=False)  # base URL without /v1
@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES,
             summary="Embed texts or token ids with the server's embedding model")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    serving: Serving = request.app.state.serving
    headers = serving.check_fields(body)
    worker = _worker(serving)
    model = _check_model(worker, body.model)
    _check_dimensions(worker, body.dimensions)
    inputs = request_inputs(body.input)
    if serving.closing:
        raise ServerShuttingDownError()
    start = time.perf_counter()
    result = await worker.embed(inputs)
    truncated = [i for i, cut in enumerate(result.truncated) if cut]
    if truncated and body.truncate is False:
        raise InvalidRequestError(f"input[{truncated[0]}] is longer than the model's {worker.embedder.max_seq_length} "
                                  "tokens (send \"truncate\": true to cut it there)", param="input")
    num_tokens = sum(result.num_tokens)
    serving.metrics.embedding_requests.inc()
    serving.metrics.embedding_tokens.inc(num_tokens)
    serving.metrics.embedding_latency.observe(time.perf_counter() - start)
    if truncated:
        headers[TRUNCATED_HEADER] = _indices(truncated)
    return JSONResponse(_response(result, model, body.encoding_format or "float"), headers=headers)


def request_inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    """OpenAI's four input shapes -> a list of texts or a list of token-id lists; 400s naming `input`."""
    if isinstance(value, str):
        value = [value]
    elif value and isinstance(value[0], int):
        value = [value]  # type: ignore[list-item]  # one input given as token ids
    if not value:
        raise InvalidRequestError("'input' is empty: send a text or a list of texts", param="input")
    if len(value) > MAX_INPUTS:
        raise InvalidRequestError(f"'input' has {len(value)} inputs; at most {MAX_INPUTS} per request",
                                  param="input")
    return value  # type: ignore[return-value]


# ---- private ------------------------------------------------------------------------------------------------------
def _worker(serving: Serving) -> EmbeddingWorker:
    if serving.embeddings is None:
        raise APIError(404, "this server has no embedding model (it was started with --embedding-model none)",
                       code="model_not_found")
    return serving.embeddings


def _check_model(worker: EmbeddingWorker, model: str | None) -> str:
    if model is None:
        return worker.model_names[0]
    if model not in worker.model_names:
        raise APIError(404, f"the embedding model {model!r} does not exist here; this server embeds with "
                       f"{', '.join(map(repr, worker.model_names))}", param="model", code="model_not_found")
    return model


def _check_dimensions(worker: EmbeddingWorker, dimensions: int | None) -> None:
    if dimensions is not None and dimensions != worker.embedder.dim:
        raise InvalidRequestError(f"'dimensions' must be {worker.embedder.dim}, the model's own size (it cannot "
                                  f"shorten its vectors), got {dimensions}", param="dimensions")


def _response(result: EmbedResult, model: str, encoding_format: str) -> dict:
    encode = _base64 if encoding_format == "base64" else _floats
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)]
    num_tokens = sum(result.num_tokens)
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}


def _floats(vector: np.ndarray) -> list[float]:
    return vector.tolist()  # float32 -> Python floats: each prints back to the same float32


def _base64(vector: np.ndarray) -> str:
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


def _indices(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:_MAX_HEADER_INDICES]))
    more = len(indices) - _MAX_HEADER_INDICES
    return shown + (f", ... {more} more" if more > 0 else "")
