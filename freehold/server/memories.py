"""/v1/memories: Freehold's extension for explicit long-term memories, per namespace, kept with the conversations
(freehold.memory.memories, under --data-dir). A Responses API request recalls a namespace's memories into its
memory block with `freehold: {"context": {"namespace": "..."}}` (freehold.server.response_context).

    POST   /v1/memories                 {"text": "...", "namespace": "default"}  -> the memory
    GET    /v1/memories?namespace=...   the namespace's memories, oldest first (default namespace "default")
    DELETE /v1/memories/{id}            -> {"id", "object": "memory.deleted", "deleted": true}
"""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from freehold.memory.memories import DEFAULT_NAMESPACE, Memory, check_namespace
from freehold.server.conversations import conversations_of
from freehold.server.responses_input import check_unicode

router = APIRouter()


class CreateMemoryRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # unknown fields: freehold.server.compat
    text: str = Field(description="the memory, up to 4000 characters")
    namespace: str = Field(DEFAULT_NAMESPACE, description="a user or project: 1-64 characters")


class MemoryObject(BaseModel):
    id: str
    object: Literal["memory"] = "memory"
    namespace: str
    created_at: int
    text: str


class MemoryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MemoryObject]


class MemoryDeleted(BaseModel):
    id: str
    object: Literal["memory.deleted"] = "memory.deleted"
    deleted: bool = True


def _object(memory: Memory) -> MemoryObject:
    return MemoryObject(id=memory.id, namespace=memory.namespace, created_at=memory.created_at, text=memory.text)


@router.post("/v1/memories", response_model=MemoryObject, summary="Add a long-term memory (Freehold extension)")
async def add_memory(body: CreateMemoryRequest, request: Request, response: Response) -> MemoryObject:
    conversations = conversations_of(request)
    response.headers.update(request.app.state.serving.check_fields(body))
    check_unicode([("text", body.text), ("namespace", body.namespace)])
    return _object(await conversations.run(conversations.memories.add, body.namespace, body.text))


@router.get("/v1/memories", response_model=MemoryList, summary="A namespace's memories (Freehold extension)")
async def list_memories(request: Request, namespace: str = DEFAULT_NAMESPACE) -> MemoryList:
    conversations = conversations_of(request)
    check_namespace(namespace)
    return MemoryList(data=[_object(m) for m in await conversations.run(conversations.memories.list, namespace)])


@router.delete("/v1/memories/{memory_id}", response_model=MemoryDeleted,
               summary="Delete a memory (Freehold extension)")
async def delete_memory(memory_id: str, request: Request) -> MemoryDeleted:
    conversations = conversations_of(request)
    await conversations.run(conversations.memories.delete, memory_id)
    return MemoryDeleted(id=memory_id)
