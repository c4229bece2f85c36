"""OpenAI's files and vector stores API: POST/GET/DELETE /v1/files, /v1/vector_stores, /v1/vector_stores/{id}/files
and POST /v1/vector_stores/{id}/search, on `freehold.retrieval` (durable under `--data-dir`).

Freehold's extension: `ranking_options.ranker` may be "bm25", "dense" or "hybrid" (BM25 and dense fused by
reciprocal rank fusion); OpenAI's "auto", "default-2024-11-15" and "none" mean hybrid. A search while files are still
being ingested answers from the completed ones and sets `X-Freehold-Search-Incomplete: true`.
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from freehold.errors import InvalidRequestError
from freehold.retrieval.chunking import ChunkingStrategy
from freehold.retrieval.records import FileCounts, FileRecord, SearchMode, SearchResult, StoreInfo
from freehold.retrieval.uploads import Upload
from freehold.server.errors import APIError
from freehold.server.ingest import Retrieval

router = APIRouter()
INCOMPLETE_HEADER = "X-Freehold-Search-Incomplete"
_RANKERS = {"auto": SearchMode.HYBRID, "default-2024-11-15": SearchMode.HYBRID, "none": SearchMode.HYBRID,
            "hybrid": SearchMode.HYBRID,  # "none" (OpenAI: no reranker): Freehold has none to skip
            "bm25": SearchMode.BM25, "dense": SearchMode.DENSE}
MAX_RESULTS = 50  # OpenAI's bound on max_num_results


# ---- requests ---------------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # unknown fields: freehold.server.compat


class CreateStoreRequest(_Body):
    name: str | None = None
    file_ids: list[str] | None = Field(None, description="uploads to attach at once")
    chunking_strategy: dict[str, Any] | None = Field(None, description="for file_ids: auto (800/400) or static")
    metadata: dict[str, str] | None = None
    expires_after: Any = Field(None, description="not supported: stores are kept until deleted (400 if set)")


class AttachFileRequest(_Body):
    file_id: str
    attributes: dict[str, str | bool | int | float] | None = Field(None, description="for search filters")
    chunking_strategy: dict[str, Any] | None = None


class RankingOptions(_Body):
    ranker: str | None = Field(None, description="auto (= hybrid), hybrid, bm25 or dense")
    score_threshold: float | None = Field(None, description="drop results scoring below it")


class SearchRequest(_Body):
    query: str | list[str] = Field(description="a list is searched as one query, its parts joined by spaces")
    max_num_results: int | None = Field(None, description="1-50, default 10")
    filters: dict[str, Any] | None = Field(None, description="comparison or compound filters on file attributes")
    ranking_options: RankingOptions | None = None
    rewrite_query: bool | None = Field(None, description="not supported (400 if true)")


# ---- responses ----------------------------------------------------------------------------------------------------
class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"


class Counts(BaseModel):
    in_progress: int
    completed: int
    failed: int
    cancelled: int = 0
    total: int


class VectorStoreObject(BaseModel):
    id: str
    object: Literal["vector_store"] = "vector_store"
    created_at: int
    name: str | None
    usage_bytes: int
    file_counts: Counts
    status: Literal["in_progress", "completed"]
    metadata: dict[str, Any]
    expires_after: None = None
    expires_at: None = None
    last_active_at: int | None = None


class LastError(BaseModel):
    code: Literal["server_error", "unsupported_file", "invalid_file"] = "invalid_file"
    message: str


class VectorStoreFileObject(BaseModel):
    id: str
    object: Literal["vector_store.file"] = "vector_store.file"
    created_at: int
    vector_store_id: str
    status: Literal["in_progress", "completed", "failed", "cancelled"]
    last_error: LastError | None
    usage_bytes: int = 0
    attributes: dict[str, Any]
    chunking_strategy: dict[str, Any]


class ListPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    first_id: str | None
    last_id: str | None
    has_more: bool = False


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


class ContentPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class SearchHitObject(BaseModel):
    file_id: str
    filename: str
    score: float
    attributes: dict[str, Any]
    content: list[ContentPart]


class SearchPage(BaseModel):
    object: Literal["vector_store.search_results.page"] = "vector_store.search_results.page"
    search_query: str
    data: list[SearchHitObject]
    has_more: bool = False
    next_page: None = None


# ---- files ----------------------------------------------------------------------------------------------------------
@router.post("/v1/files", response_model=FileObject, summary="Upload a text file (purpose assistants)")
async def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form(...)) -> FileObject:
    retrieval = _retrieval(request)
    content = await file.read()
    upload = await retrieval.run(lambda: retrieval.uploads.add(file.filename or "upload", content, purpose))
    return _file_object(upload)


@router.get("/v1/files", response_model=ListPage)
async def list_files(request: Request) -> ListPage:
    retrieval = _retrieval(request)
    return _page([_file_object(u) for u in await retrieval.run(retrieval.uploads.list)])


@router.get("/v1/files/{file_id}", response_model=FileObject)
async def get_file(file_id: str, request: Request) -> FileObject:
    retrieval = _retrieval(request)
    return _file_object(await retrieval.run(lambda: retrieval.uploads.get(file_id)))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> Response:
    retrieval = _retrieval(request)
    return Response(await retrieval.run(lambda: retrieval.uploads.content(file_id)),
                    media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", response_model=Deleted)
async def delete_file(file_id: str, request: Request) -> Deleted:
    retrieval = _retrieval(request)
    await retrieval.run(lambda: retrieval.uploads.delete(file_id))
    return Deleted(id=file_id, object="file")


# ---- vector stores ----------------------------------------------------------------------------------------------
@router.post("/v1/vector_stores", response_model=VectorStoreObject, summary="Create a vector store")
async def create_store(body: CreateStoreRequest, request: Request, response: Response) -> VectorStoreObject:
    retrieval = _retrieval(request)
    response.headers.update(request.app.state.serving.check_fields(body))
    if body.expires_after is not None:
        raise InvalidRequestError("expires_after is not supported: Freehold keeps a vector store until it is "
                                  "deleted", param="expires_after")
    chunking = ChunkingStrategy.from_request(body.chunking_strategy)
    for file_id in body.file_ids or []:  # every id checked before the store exists
        await retrieval.run(lambda f=file_id: retrieval.uploads.text(f))
    info = await retrieval.run(lambda: retrieval.stores.create(body.name, body.metadata))
    for file_id in body.file_ids or []:
        await retrieval.run(lambda f=file_id: retrieval.attach(info.id, f, None, chunking))
    return await _store_object(retrieval, info.id)


@router.get("/v1/vector_stores", response_model=ListPage)
async def list_stores(request: Request) -> ListPage:
    retrieval = _retrieval(request)
    return _page(await retrieval.run(lambda: [_store(retrieval, info) for info in retrieval.stores.list()]))


@router.get("/v1/vector_stores/{store_id}", response_model=VectorStoreObject)
async def get_store(store_id: str, request: Request) -> VectorStoreObject:
    return await _store_object(_retrieval(request), store_id)


@router.delete("/v1/vector_stores/{store_id}", response_model=Deleted)
async def delete_store(store_id: str, request: Request) -> Deleted:
    retrieval = _retrieval(request)
    await retrieval.run(lambda: retrieval.stores.delete(store_id))
    return Deleted(id=store_id, object="vector_store.deleted")


@router.post("/v1/vector_stores/{store_id}/files", response_model=VectorStoreFileObject,
             summary="Attach an uploaded file: chunked, embedded and indexed in the background")
async def attach_file(store_id: str, body: AttachFileRequest, request: Request,
                      response: Response) -> VectorStoreFileObject:
    retrieval = _retrieval(request)
    response.headers.update(request.app.state.serving.check_fields(body))
    chunking = ChunkingStrategy.from_request(body.chunking_strategy)
    record = await retrieval.run(lambda: retrieval.attach(store_id, body.file_id, body.attributes, chunking))
    return _store_file(store_id, record)


@router.get("/v1/vector_stores/{store_id}/files", response_model=ListPage)
async def list_store_files(store_id: str, request: Request) -> ListPage:
    retrieval = _retrieval(request)
    records = await retrieval.run(lambda: retrieval.files(store_id))
    return _page([_store_file(store_id, r) for r in records])


@router.get("/v1/vector_stores/{store_id}/files/{file_id}", response_model=VectorStoreFileObject)
async def get_store_file(store_id: str, file_id: str, request: Request) -> VectorStoreFileObject:
    retrieval = _retrieval(request)
    return _store_file(store_id, await retrieval.run(lambda: retrieval.file(store_id, file_id)))


@router.delete("/v1/vector_stores/{store_id}/files/{file_id}", response_model=Deleted)
async def detach_file(store_id: str, file_id: str, request: Request) -> Deleted:
    retrieval = _retrieval(request)
    await retrieval.run(lambda: retrieval.detach(store_id, file_id))
    return Deleted(id=file_id, object="vector_store.file.deleted")


@router.post("/v1/vector_stores/{store_id}/search", response_model=SearchPage,
             summary="Search a vector store: hybrid (BM25 + dense, fused by reciprocal rank), bm25 or dense")
async def search(store_id: str, body: SearchRequest, request: Request, response: Response) -> SearchPage:
    retrieval = _retrieval(request)
    response.headers.update(request.app.state.serving.check_fields(body))
    if body.rewrite_query:
        raise InvalidRequestError("rewrite_query is not supported: the query is searched as given",
                                  param="rewrite_query")
    query = body.query if isinstance(body.query, str) else " ".join(body.query)
    k = 10 if body.max_num_results is None else body.max_num_results
    if not 1 <= k <= MAX_RESULTS:
        raise InvalidRequestError(f"max_num_results must be in [1, {MAX_RESULTS}], got {k}", param="max_num_results")
    options = body.ranking_options or RankingOptions()
    mode = _RANKERS.get(options.ranker or "auto")
    if mode is None:
        raise InvalidRequestError(f"ranking_options.ranker must be one of {', '.join(_RANKERS)}, got "
                                  f"{options.ranker!r}", param="ranking_options.ranker")
    threshold = options.score_threshold or 0.0

    def search_now() -> tuple[SearchResult, int]:
        return (retrieval.stores.search(store_id, query, mode, k, body.filters, threshold),
                retrieval.file_counts(store_id, FileCounts()).in_progress)  # files queued or ingesting
    result, waiting = await retrieval.run(search_now)
    if result.incomplete or waiting:
        response.headers[INCOMPLETE_HEADER] = "true"
    hits = [SearchHitObject(file_id=h.file_id, filename=h.filename, score=h.score, attributes=h.attributes,
                            content=[ContentPart(text=h.text)]) for h in result.hits]
    return SearchPage(search_query=query, data=hits)


# ---- private --------------------------------------------------------------------------------------------------------
def _retrieval(request: Request) -> Retrieval:
    retrieval = getattr(request.app.state.serving, "retrieval", None)
    if retrieval is None:
        raise APIError(404, "vector stores are off on this server: they need an embedding model "
                       "(--embedding-model) and the retrieval extra (pip install 'freehold[retrieval]')",
                       code="vector_stores_disabled")
    return retrieval


def _file_object(upload: Upload) -> FileObject:
    return FileObject(id=upload.id, bytes=upload.bytes, created_at=upload.created_at, filename=upload.filename,
                      purpose=upload.purpose)


def _page(items: list[Any]) -> ListPage:
    return ListPage(data=items, first_id=items[0].id if items else None, last_id=items[-1].id if items else None)


async def _store_object(retrieval: Retrieval, store_id: str) -> VectorStoreObject:
    return await retrieval.run(lambda: _store(retrieval, retrieval.stores.get(store_id)))


def _store(retrieval: Retrieval, info: StoreInfo) -> VectorStoreObject:
    """Off the event loop (file_counts reads the store)."""
    counts: FileCounts = retrieval.file_counts(info.id, info.file_counts)
    total = counts.in_progress + counts.completed + counts.failed
    return VectorStoreObject(
        id=info.id, created_at=info.created_at, name=info.name, usage_bytes=info.usage_bytes,
        file_counts=Counts(in_progress=counts.in_progress, completed=counts.completed, failed=counts.failed,
                           total=total),
        status="in_progress" if counts.in_progress else "completed", metadata=info.metadata)


def _store_file(store_id: str, record: FileRecord) -> VectorStoreFileObject:
    error = LastError(message=record.error) if record.error else None
    return VectorStoreFileObject(id=record.file_id, created_at=record.created_at, vector_store_id=store_id,
                                 status=record.status.value, last_error=error, attributes=record.attributes,
                                 chunking_strategy=record.chunking.to_request())
