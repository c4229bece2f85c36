"""OpenAI's Conversations API on the server's `ConversationStore` (freehold.memory.store, under --data-dir):

    POST   /v1/conversations                          create (optional `items`, up to 20, and `metadata`)
    GET    /v1/conversations/{id}                     the conversation
    POST   /v1/conversations/{id}                     replace its metadata
    DELETE /v1/conversations/{id}                     delete it and its items
    GET    /v1/conversations/{id}/items               list (`limit` 1-100, default 20; `order` desc by default; `after`)
    POST   /v1/conversations/{id}/items               add up to 20 items
    GET    /v1/conversations/{id}/items/{item_id}     one item
    DELETE /v1/conversations/{id}/items/{item_id}     delete it (answers with the conversation)

Items are checked as /v1/responses checks its input (freehold.server.responses_input), named `items[i]`. A response
made with `conversation` appends to it (freehold.server.response_store). Writes to one conversation (turns, item
edits, deletion) run one at a time, in arrival order (`Conversations.hold`). Metadata: at most 16 pairs, keys up to
64 characters, values up to 512, as OpenAI allows. A server started with `--data-dir none` answers every route here
with a 400.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Literal, TypeVar

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from freehold.errors import InvalidRequestError, NotFoundError
from freehold.memory.memories import MemoryStore
from freehold.memory.store import ConversationStore
from freehold.server.errors import APIError
from freehold.server.response_context import RecallIndexes
from freehold.server.responses_input import (check_new_ids, check_unicode, input_messages, stored_items,
                                             stored_parts, typed_parts)

router = APIRouter()
T = TypeVar("T")
MAX_ITEMS_PER_CALL = 20  # OpenAI's bound on items added at once
MAX_METADATA = (16, 64, 512)  # pairs, key characters, value characters


class Conversations:
    """The server's stored responses and conversations: the store, called off the event loop, and a lock per
    conversation, so that its writers (turns, item edits, deletion) run one at a time, in arrival order."""

    def __init__(self, store: ConversationStore):
        self.store = store
        self.memories = MemoryStore(store.path)  # /v1/memories and context state, in the same SQLite file
        self.indexes = RecallIndexes()  # recall over each conversation's items (freehold.server.response_context)
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # conversation -> (lock, [holders + waiters])

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def hold(self, conversation_id: str) -> Callable[[], None]:
        """Wait for the conversation's lock; returns its release (safe to call more than once)."""
        lock, users = self._locks.setdefault(conversation_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            await lock.acquire()
        except BaseException:
            self._leave(conversation_id, users)
            raise
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                lock.release()
                self._leave(conversation_id, users)
        return release

    @asynccontextmanager
    async def locked(self, conversation_id: str) -> AsyncIterator[None]:
        release = await self.hold(conversation_id)
        try:
            yield
        finally:
            release()

    def _leave(self, conversation_id: str, users: list[int]) -> None:
        users[0] -= 1
        if users[0] == 0:
            del self._locks[conversation_id]


def conversations_of(request: Request) -> Conversations:
    conversations = request.app.state.serving.conversations
    if conversations is None:
        raise APIError(400, "this server keeps no stored responses or conversations: it was started with "
                            "--data-dir none", code="storage_disabled")
    return conversations


# ---- requests and objects -------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # unknown fields: freehold.server.compat


class CreateConversationRequest(_Body):
    items: list[Any] | None = Field(None, description="up to 20 input items to start with")
    metadata: dict[str, str] | None = None


class UpdateConversationRequest(_Body):
    metadata: dict[str, str] | None


class AddItemsRequest(_Body):
    items: list[Any] = Field(description="up to 20 input items")


class ConversationObject(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, str]


class ConversationDeleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True


class ItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


def page(items: list[dict[str, Any]], limit: int, order: str, after: str | None) -> ItemList:
    """One page of `items` (oldest first): `order` asc or desc, starting after the item `after`."""
    if not 1 <= limit <= 100:
        raise InvalidRequestError(f"limit must be between 1 and 100, got {limit}", param="limit")
    if order not in ("asc", "desc"):
        raise InvalidRequestError(f"order must be 'asc' or 'desc', got {order!r}", param="order")
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise NotFoundError(f"no item {after!r} to list after", param="after")
        ordered = ordered[ids.index(after) + 1:]
    data = ordered[:limit]
    return ItemList(data=data, first_id=data[0]["id"] if data else None, last_id=data[-1]["id"] if data else None,
                    has_more=len(ordered) > limit)


# ---- routes -----------------------------------------------------------------------------------------------------
@router.post("/v1/conversations", response_model=ConversationObject, summary="Create a conversation")
async def create_conversation(body: CreateConversationRequest, request: Request,
                              response: Response) -> ConversationObject:
    conversations = conversations_of(request)
    response.headers.update(request.app.state.serving.check_fields(body))
    metadata = _checked_metadata(body.metadata)
    items = _new_items(request, body.items or [], [])
    created = await conversations.run(conversations.store.create_conversation, metadata, items)
    return ConversationObject(id=created.id, created_at=created.created_at, metadata=created.metadata)


@router.get("/v1/conversations/{conversation_id}", response_model=ConversationObject)
async def get_conversation(conversation_id: str, request: Request) -> ConversationObject:
    conversations = conversations_of(request)
    found = await conversations.run(conversations.store.get_conversation, conversation_id)
    return ConversationObject(id=found.id, created_at=found.created_at, metadata=found.metadata)


@router.post("/v1/conversations/{conversation_id}", response_model=ConversationObject,
             summary="Replace a conversation's metadata")
async def update_conversation(conversation_id: str, body: UpdateConversationRequest, request: Request,
                              response: Response) -> ConversationObject:
    conversations = conversations_of(request)
    response.headers.update(request.app.state.serving.check_fields(body))
    metadata = _checked_metadata(body.metadata)
    async with conversations.locked(conversation_id):
        found = await conversations.run(conversations.store.set_metadata, conversation_id, metadata)
    return ConversationObject(id=found.id, created_at=found.created_at, metadata=found.metadata)


@router.delete("/v1/conversations/{conversation_id}", response_model=ConversationDeleted)
async def delete_conversation(conversation_id: str, request: Request) -> ConversationDeleted:
    conversations = conversations_of(request)
    async with conversations.locked(conversation_id):
        await conversations.run(conversations.store.delete_conversation, conversation_id)
    return ConversationDeleted(id=conversation_id)


@router.get("/v1/conversations/{conversation_id}/items", response_model=ItemList)
async def list_items(conversation_id: str, request: Request, limit: int = 20, order: str = "desc",
                     after: str | None = None, include: list[str] | None = Query(None)) -> ItemList:
    conversations = conversations_of(request)
    _refuse_include(include)
    items = await conversations.run(conversations.store.items, conversation_id)
    return page(items, limit, order, after)


@router.post("/v1/conversations/{conversation_id}/items", response_model=ItemList,
             summary="Add items to a conversation")
async def add_items(conversation_id: str, body: AddItemsRequest, request: Request, response: Response,
                    include: list[str] | None = Query(None)) -> ItemList:
    conversations = conversations_of(request)
    _refuse_include(include)
    response.headers.update(request.app.state.serving.check_fields(body))
    async with conversations.locked(conversation_id):
        history = await conversations.run(conversations.store.items, conversation_id)
        items = await conversations.run(_new_items, request, body.items, history)  # types up to 16 MiB of items
        await conversations.run(conversations.store.add_items, conversation_id, items)
    return page(items, MAX_ITEMS_PER_CALL, "asc", None)


@router.get("/v1/conversations/{conversation_id}/items/{item_id}", response_model=None)
async def get_item(conversation_id: str, item_id: str, request: Request,
                   include: list[str] | None = Query(None)) -> dict[str, Any]:
    conversations = conversations_of(request)
    _refuse_include(include)
    return await conversations.run(conversations.store.get_item, conversation_id, item_id)


@router.delete("/v1/conversations/{conversation_id}/items/{item_id}", response_model=ConversationObject)
async def delete_item(conversation_id: str, item_id: str, request: Request) -> ConversationObject:
    conversations = conversations_of(request)
    async with conversations.locked(conversation_id):
        await conversations.run(conversations.store.delete_item, conversation_id, item_id)
        found = await conversations.run(conversations.store.get_conversation, conversation_id)
    return ConversationObject(id=found.id, created_at=found.created_at, metadata=found.metadata)


# ---- checks -----------------------------------------------------------------------------------------------------
def _new_items(request: Request, items: list[Any], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The items to add, checked against the conversation so far (a function_call_output needs its call; ids are
    new) and normalized as stored."""
    if len(items) > MAX_ITEMS_PER_CALL:
        raise InvalidRequestError(f"at most {MAX_ITEMS_PER_CALL} items may be added at once, got {len(items)}",
                                  param="items")
    if not items:
        return []
    check_unicode([("items", items)])
    parts = typed_parts(items, name="items")
    request.app.state.serving.check_fields(parts)
    input_messages(None, items, parts, history=stored_parts(history), name="items")
    stored = stored_items(items, parts)
    check_new_ids(stored, history, name="items")
    return stored


def _checked_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    pairs, key_chars, value_chars = MAX_METADATA
    metadata = metadata or {}
    check_unicode([("metadata", metadata)])  # first: an error naming a key must be able to print it
    if len(metadata) > pairs:
        raise InvalidRequestError(f"metadata holds at most {pairs} pairs, got {len(metadata)}", param="metadata")
    for key, value in metadata.items():
        if len(key) > key_chars or len(value) > value_chars:
            raise InvalidRequestError(f"metadata keys hold at most {key_chars} characters and values {value_chars}: "
                                      f"{key[:80]!r} is over", param=f"metadata.{key[:80]}")
    return metadata


def _refuse_include(include: list[str] | None) -> None:
    if include:
        raise InvalidRequestError(f"include {include[0]!r} is not supported on conversation items: items are "
                                  "returned as stored", param="include")
