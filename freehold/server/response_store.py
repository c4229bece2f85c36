"""What a Responses API request continues and what it keeps, on the server's `ConversationStore` (under --data-dir);
and the stored responses' routes: GET / DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items.

    store                 default true, as OpenAI's, on a server with a data directory; with --data-dir none the
                          default is false and `store: true` is a 400
    previous_response_id  the new response sees that response's input and output items (and those of the responses
                          it continued), then its own input; instructions are not carried over, as on OpenAI
    conversation          "conv_..." or {"id": "conv_..."}: the conversation's items, then the request's input; the
                          turn's input and output items are appended to the conversation. Turns (and item edits) of
                          one conversation run one at a time, in arrival order.

A stored response is committed when its run finishes, whatever its status (completed, incomplete, failed), in one
transaction with its input and output items (and the conversation's new items). A run that does not finish (the
client left, the server stopped or was killed) leaves no item and no response (the context plan's state, written
when the turn is planned, stays: a conversation's recent-window anchor may have moved). Of a response made with
store=false only the id is kept, so that continuing it is a 400 saying so rather than a 404. A commit under way when the client leaves still
finishes, and the conversation's lock is released only after it. An input item whose id the response already
continues (an earlier output item sent back), or one id twice in the input, is a 400 naming `input[i].id` before
the model runs. Context that does not fit is a 400
(context_length_exceeded); a conversation or chain past the store's limits (`StoreLimits`: 1000 items, 16 MiB) is
a 400 too. A request with truncation "auto" or freehold.context gets its context assembled under a token budget
instead of every stored item (freehold.server.response_context).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import APIRouter, Request

from freehold.errors import InvalidRequestError, NotFoundError
from freehold.memory.store import Turn, item_bytes
from freehold.server.conversations import Conversations, ItemList, conversations_of, page
from freehold.server.responses_input import check_new_ids
from freehold.server.responses_protocol import ResponseObject, ResponsesRequest
from freehold.server.serving import Serving
from freehold.server.streaming import EventStreamResponse

router = APIRouter()
log = logging.getLogger("freehold.server")


@dataclass
class TurnState:
    """What one response continues (`history`: stored items, oldest first) and what it will store."""

    store: bool
    history: list[dict[str, Any]]
    input_items: list[dict[str, Any]]
    previous_response_id: str | None = None
    conversation_id: str | None = None
    release: Callable[[], None] = lambda: None  # the conversation's lock, held until the turn is committed

    def release_after(self, commit: asyncio.Future) -> None:
        """Hand the lock over to `commit`: released when it is done; `release` does nothing from now on."""
        release, self.release = self.release, lambda: None

        def done(task: asyncio.Future) -> None:
            release()
            if not task.cancelled() and task.exception() is not None:
                log.error("committing a turn whose client left failed: %s", task.exception())
        commit.add_done_callback(done)


async def open_turn(serving: Serving, body: ResponsesRequest, input_items: list[dict[str, Any]]) -> TurnState:
    """Checks `store`, `previous_response_id` and `conversation`; reads what the response continues, holding the
    conversation's lock (the caller releases it: `TurnState.release`)."""
    conversations: Conversations | None = serving.conversations
    store = body.store if body.store is not None else conversations is not None
    conversation_id = _conversation_id(body.conversation)
    if body.previous_response_id is not None and conversation_id is not None:
        raise InvalidRequestError("previous_response_id and conversation cannot both be set: a response continues "
                                  "one or the other", param="conversation")
    asked = "store" if body.store else "previous_response_id" if body.previous_response_id is not None \
        else "conversation" if conversation_id is not None else None
    if conversations is None:
        if asked is not None:
            raise InvalidRequestError(f"'{asked}' needs stored responses, and this server keeps none: it was started "
                                      "with --data-dir none", param=asked)
        check_new_ids(input_items, [])
        return TurnState(False, [], input_items)
    if conversation_id is not None:
        if body.store is False:
            raise InvalidRequestError("a response in a conversation is stored with it: store cannot be false",
                                      param="store")
        return await _in_conversation(conversations, conversation_id, input_items)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        history = await _renamed(conversations.run(conversations.store.continued_items, body.previous_response_id),
                                 "previous_response_id")
        await conversations.run(_check_new, conversations, history, input_items, "the chain of responses",
                                "previous_response_id")
    else:
        check_new_ids(input_items, [])
    return TurnState(store, history, input_items, previous_response_id=body.previous_response_id)


async def _in_conversation(conversations: Conversations, conversation_id: str,
                           input_items: list[dict[str, Any]]) -> TurnState:
    release = await conversations.hold(conversation_id)
    try:
        history = await _renamed(conversations.run(conversations.store.items, conversation_id), "conversation")
        await conversations.run(_check_new, conversations, history, input_items,
                                f"the conversation {conversation_id!r}", "conversation")
    except BaseException:
        release()
        raise
    return TurnState(True, history, input_items, conversation_id=conversation_id, release=release)


async def finish_turn(serving: Serving, turn: TurnState, response: ResponseObject) -> None:
    """Commit the finished response with its items (or, with store=false, only its id)."""
    conversations = serving.conversations
    if conversations is None:
        return
    if not turn.store:
        await conversations.run(conversations.store.record_unstored, response.id)
        return
    record = Turn(input_items=turn.input_items,
                  output_items=[item.model_dump(mode="json") for item in response.output],
                  response_id=response.id, response=response.model_dump(mode="json"),
                  previous_response_id=turn.previous_response_id, conversation_id=turn.conversation_id)
    commit = asyncio.ensure_future(conversations.run(conversations.store.commit_turn, record))
    try:
        await asyncio.shield(commit)
    except asyncio.CancelledError:  # the client left: the commit goes on in its thread, the lock waits for it
        turn.release_after(commit)
        raise


class TurnStream(EventStreamResponse):
    """A streamed response that releases its turn's conversation lock once the stream is over (after the body
    generator is closed, so after the turn committed or was abandoned)."""

    def __init__(self, events: Any, headers: dict[str, str], release: Callable[[], None]):
        super().__init__(events, headers)
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _conversation_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict) and set(value) == {"id"}:
        value = value["id"]
    if not isinstance(value, str) or not value:
        raise InvalidRequestError("conversation must be a conversation id (\"conv_...\") or {\"id\": \"conv_...\"}",
                                  param="conversation")
    return value


def _check_new(conversations: Conversations, history: list[dict[str, Any]], new: list[dict[str, Any]],
               what: str, param: str) -> None:
    """The new items' ids are new, and history and new items together within the store's limits (blocking: sizes
    the JSON of up to StoreLimits.max_bytes)."""
    check_new_ids(new, history)
    try:
        conversations.store.check_room(len(history) + len(new), item_bytes(history) + item_bytes(new), what)
    except InvalidRequestError as exc:
        raise InvalidRequestError(str(exc), param=param) from None


async def _renamed(call: Any, param: str) -> Any:
    """The store's answer; its not-found and not-stored errors named after the request's field."""
    try:
        return await call
    except NotFoundError as exc:
        raise NotFoundError(str(exc), param=param) from None
    except InvalidRequestError as exc:
        raise InvalidRequestError(str(exc), param=param) from None


# ---- routes -----------------------------------------------------------------------------------------------------
@router.get("/v1/responses/{response_id}", response_model=ResponseObject, summary="A stored response")
async def get_response(response_id: str, request: Request, stream: bool = False) -> ResponseObject:
    conversations = conversations_of(request)
    if stream:
        raise InvalidRequestError("stream is not supported when retrieving a response: it is returned whole",
                                  param="stream")
    return ResponseObject.model_validate(await conversations.run(conversations.store.get_response, response_id))


@router.delete("/v1/responses/{response_id}", summary="Delete a stored response")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    conversations = conversations_of(request)
    await conversations.run(conversations.store.delete_response, response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items", response_model=ItemList,
            summary="The items a stored response was made from")
async def input_items(response_id: str, request: Request, limit: int = 20, order: str = "desc",
                      after: str | None = None) -> ItemList:
    conversations = conversations_of(request)
    return page(await conversations.run(conversations.store.input_items, response_id), limit, order, after)
