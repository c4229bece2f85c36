"""A Responses API turn's context assembled under a token budget (freehold.memory.context), when the request asks:

    truncation: "auto"                      policy truncate: the newest turns that fit (OpenAI's definition)
    freehold: {"context": {"policy": "memory" | "truncate", "budget_tokens": N, "namespace": "default"}}

`memory` (the default with `freehold.context`) adds a memory block: passages of older turns and of the namespace's
/v1/memories (namespace "default", where /v1/memories puts a memory given none, unless the request names another)
recalled for the new input (freehold.memory.recall, BM25 over the conversation's own items, indexed as it grows;
kept in this process per conversation or response chain, rebuilt from the store after a restart), and the running
summary. Recall needs the `retrieval` extra (bm25s), imported on first use: without it a memory-policy request is
a 400 naming the extra, and truncation still works. The budget defaults to the context length less
max_output_tokens (less a quarter of the context when max_output_tokens is unset); the tools' JSON counts against
it. Tokens are the model tokenizer's count of each message's text plus `ContextBudget.message_overhead` per
message: the chat template's own tokens may differ a little.

The running summary is written by the model after a turn commits, in a background task (`SummaryTasks`: at most
one per conversation or chain, MAX_SUMMARIES generating at once, none once the server is closing), when turns left
the window since the stored summary's last turn (`write_summary`). It is generated in at most the summary's share
of the budget (`ContextBudget.summary_room` less its header), from the oldest such turns that fit the model's
context, and covers through the last of them; the next turn uses it once it is stored. Its state (summary, the
window's first turn) lives in freehold.memory.memories under the conversation id, or under the response id for a
previous_response_id chain.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

from freehold.errors import InvalidRequestError
from freehold.memory.context import (SUMMARY_HEADER, Assembly, ContextBudget, ContextTooLargeError, HistoryTurn,
                                     Message, Policy, Summary, assemble, cut_to_tokens, split_turns, unsummarized)
from freehold.memory.items import message_text
from freehold.memory.memories import DEFAULT_NAMESPACE, MemoryStore, check_namespace
from freehold.server.responses_input import input_messages, stored_parts
from freehold.server.responses_protocol import (ContextReport, IncludedItem, RecalledPassage, ResponsesRequest,
                                                TypedParts)

if TYPE_CHECKING:  # the retrieval extra: imported on first use (`recall_type`)
    from freehold.memory.recall import HybridRecall

log = logging.getLogger("freehold.server")
MAX_INDEXES = 64  # conversations / chains whose recall index this process keeps
MAX_COUNTS = 100_000
SUMMARY_TOKENS = 192  # the most a summary is generated in (less when the budget's share is smaller)
MIN_SUMMARY_TOKENS = 24  # a share smaller than this writes no summary
MAX_SUMMARIES = 1  # summaries generating at once, over all conversations
TEMPLATE_SLACK = 64  # the summary prompt's template tokens, not counted message by message
_NO_PARTS = TypedParts.model_validate({"input": [], "tools": []})
SUMMARY_PROMPT = ("Update the summary of a conversation. Keep every fact, name, number and decision; drop "
                  "small talk. Answer with the new summary only, in at most {words} words.")


@dataclass(frozen=True)
class ContextPlan:
    messages: list[dict[str, Any]]
    report: ContextReport
    assembly: Assembly
    state_key: str | None  # where this turn's context state is kept (conversation or new response id; None: not)
    budget: ContextBudget


def recall_type() -> type[HybridRecall]:
    """freehold.memory.recall's HybridRecall, imported now; a 400 naming the extra when bm25s is not installed."""
    try:
        from freehold.memory.recall import HybridRecall
    except ImportError as exc:
        raise InvalidRequestError(f"the memory policy recalls with BM25, which needs the retrieval extra ({exc}): "
                                  "pip install 'freehold[retrieval]', or ask for policy 'truncate'",
                                  param="freehold.context.policy") from None
    return HybridRecall


class SummaryTasks:
    """The running summaries being written, in background tasks: at most one per state key (a turn that ends while
    its conversation's summary is still being written starts none), at most MAX_SUMMARIES generating at once."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Task] = {}
        self._slots = asyncio.Semaphore(MAX_SUMMARIES)

    def __len__(self) -> int:
        return len(self._running)

    def start(self, key: str, write: Callable[[], Awaitable[None]], closing: Callable[[], bool]) -> bool:
        """Run `write` in the background unless one runs for `key` or `closing()`; whether it started."""
        if key in self._running or closing():
            return False

        async def run() -> None:
            async with self._slots:
                if not closing():
                    await write()
        task = asyncio.get_running_loop().create_task(run())
        self._running[key] = task
        task.add_done_callback(lambda _: self._running.pop(key, None))
        return True


class RecallIndexes:
    """The recall index of each recent conversation or chain (least recently used dropped past MAX_INDEXES), the
    token counts of texts seen lately, and the summaries being written."""

    def __init__(self) -> None:
        self._indexes: OrderedDict[str, HybridRecall] = OrderedDict()
        self._counts: OrderedDict[str, int] = OrderedDict()
        self.summaries = SummaryTasks()

    def counter(self, encode: Callable[[str], list[int]]) -> Callable[[str], int]:
        """`len(encode(text))`, remembered for the last MAX_COUNTS texts (history is counted again every turn)."""
        def count(text: str) -> int:
            found = self._counts.pop(text, None)
            self._counts[text] = len(encode(text)) if found is None else found
            while len(self._counts) > MAX_COUNTS:
                self._counts.popitem(last=False)
            return self._counts[text]
        return count

    def get(self, key: str | None, count: Callable[[str], int]) -> HybridRecall:
        index = self._indexes.pop(key, None) if key is not None else None
        return index if index is not None else recall_type()(count)

    def put(self, key: str, index: HybridRecall) -> None:
        self._indexes[key] = index
        while len(self._indexes) > MAX_INDEXES:
            self._indexes.popitem(last=False)


def requested_budget(body: ResponsesRequest, max_model_len: int) -> ContextBudget | None:
    """The request's budget and policy; None when it asks for neither (then nothing is dropped)."""
    context = body.freehold.context if body.freehold is not None else None
    if body.truncation not in (None, "disabled", "auto"):
        raise InvalidRequestError(f"truncation must be 'disabled' or 'auto', got {body.truncation!r}",
                                  param="truncation")
    if context is None and body.truncation != "auto":
        return None
    policy = Policy(context.policy) if context is not None and context.policy else \
        Policy.MEMORY if context is not None else Policy.TRUNCATE
    default = max_model_len - (body.max_output_tokens or max_model_len // 4)
    tokens = context.budget_tokens if context is not None and context.budget_tokens is not None else default
    if not 1 <= tokens <= max_model_len:
        raise InvalidRequestError(f"freehold.context.budget_tokens must be in [1, {max_model_len}] (the context "
                                  f"length), got {tokens}", param="freehold.context.budget_tokens")
    if context is not None and context.namespace is not None:
        check_namespace(context.namespace)
    if policy is Policy.MEMORY:
        recall_type()  # the retrieval extra, checked before any lookup
    return ContextBudget(tokens, policy)


def plan_context(memories: MemoryStore, indexes: RecallIndexes, count: Callable[[str], int], body: ResponsesRequest,
                 parts: TypedParts, history: list[dict[str, Any]], input_items: list[dict[str, Any]],
                 budget: ContextBudget, read_key: str | None, write_key: str | None,
                 tools: Sequence[dict[str, Any]] = ()) -> ContextPlan:
    """The turn's messages under `budget` (blocking: run it off the event loop), `tools` (as the template gets them)
    counted in it as their JSON. The context state is read under `read_key` and this turn's written under
    `write_key` (None: a response that is not stored keeps none)."""
    overhead = budget.message_overhead
    turns = split_turns([Message(item["id"], _role(item), _text(item)) for item in history], count, overhead)
    state = memories.context_state(read_key) if read_key is not None else None
    recall, memory_ids = None, []
    if budget.policy is Policy.MEMORY:
        recall = indexes.get(read_key, count)
        for item in history:
            recall.add(item["id"], _text(item))
        namespace = body.freehold.context.namespace if body.freehold and body.freehold.context else None
        for memory in memories.list(namespace or DEFAULT_NAMESPACE):
            recall.add(memory.id, memory.text)
            memory_ids.append(memory.id)
        if write_key is not None:
            indexes.put(write_key, recall)
    try:
        plan = assemble(budget, count, body.instructions, turns, [_text(item) for item in input_items], recall,
                        summary=state.summary if state else None, anchor=state.anchor if state else None,
                        memory_ids=memory_ids, reserved_tokens=count(json.dumps(list(tools))) if tools else 0)
    except ContextTooLargeError as exc:
        raise InvalidRequestError(str(exc), param="input") from None
    if write_key is not None:
        if read_key is not None and read_key != write_key:
            memories.copy_state(read_key, write_key)
        memories.set_anchor(write_key, plan.anchor)
    return ContextPlan(_messages(body, parts, history, plan), _report(budget, plan, history, count), plan, write_key,
                       budget)


def summary_max_tokens(budget: ContextBudget, count: Callable[[str], int]) -> int:
    """The tokens a summary is generated in: its share of the budget less its header and message overhead, at most
    SUMMARY_TOKENS (0: the share is too small for a summary)."""
    tokens = min(SUMMARY_TOKENS, budget.summary_room - count(SUMMARY_HEADER) - budget.message_overhead)
    return tokens if tokens >= MIN_SUMMARY_TOKENS else 0


async def write_summary(memories: MemoryStore, plan: ContextPlan,
                        generate: Callable[[list[dict[str, str]], int], Awaitable[str]],
                        count: Callable[[str], int], max_prompt_tokens: int) -> None:
    """The next running summary: the stored one updated with the turns that left the window since its last turn
    (read from the store now, not from what fitted this turn's prompt), oldest first, as many as fit a prompt of
    `max_prompt_tokens`; it covers through the last turn included. `generate(messages, max_tokens)` writes it.
    Background task: errors are logged, never raised."""
    key, max_tokens = plan.state_key, summary_max_tokens(plan.budget, count)
    if key is None or max_tokens == 0:
        return
    try:
        stored = (await asyncio.to_thread(memories.context_state, key)).summary
        turns = unsummarized(plan.assembly.dropped, plan.assembly.recent, stored.through if stored else None)
        if not turns:
            return
        previous = stored.text if stored is not None else "(none yet)"
        system = SUMMARY_PROMPT.format(words=max(10, max_tokens * 2 // 3))
        head = f"Summary so far:\n{previous}\n\nNew messages:\n"
        room = max_prompt_tokens - max_tokens - count(system) - count(head) - 2 * plan.budget.message_overhead
        transcript, through = _transcript(turns, count, room)
        if through is None:
            return
        messages = [{"role": "system", "content": system}, {"role": "user", "content": head + transcript}]
        text = (await generate(messages, max_tokens)).strip()
        if text:
            await asyncio.to_thread(memories.set_summary, key, Summary(text, through.id))
    except Exception as exc:  # a failed summary only costs recall: the next turn has the old one
        log.warning("writing the running summary of %s failed: %s", key, exc)


# ---- private ------------------------------------------------------------------------------------------------------
def _transcript(turns: Sequence[HistoryTurn], count: Callable[[str], int], room: int
                ) -> tuple[str, HistoryTurn | None]:
    """The oldest turns whose lines fit `room` tokens, and the last of them (a first turn over the room: its head;
    None: not even that)."""
    lines: list[str] = []
    last, used = None, 0
    for turn in turns:
        text = "\n".join(f"{m.role}: {m.text}" for m in turn.messages)
        tokens = count(text) + 1  # the newline joining it
        if used + tokens > room:
            head = cut_to_tokens(text, count, room) if last is None else ""
            if head:
                lines.append(head)
                last = turn
            break
        lines.append(text)
        used += tokens
        last = turn
    return "\n".join(lines), last


def _role(item: dict[str, Any]) -> str:
    return item.get("role", "assistant") if item.get("type", "message") == "message" else "tool"


def _text(item: dict[str, Any]) -> str:
    text = message_text(item)
    if text is not None:
        return text
    if item.get("type") == "function_call":
        return f"{item.get('name')}({item.get('arguments')})"
    output = item.get("output")
    return output if isinstance(output, str) else ""


def _messages(body: ResponsesRequest, parts: TypedParts, history: list[dict[str, Any]],
              plan: Assembly) -> list[dict[str, Any]]:
    """instructions, summary, recent items, memory block, input: the memory block goes after the recent items when
    the input starts with a message, else (the input answers a tool call) just after the summary."""
    kept_ids = {i for turn in plan.recent for i in turn.item_ids}
    kept = [item for item in history if item["id"] in kept_ids]
    head = [{"role": "system", "content": text} for text in (body.instructions, plan.summary_message()) if text]
    recent_and_input = input_messages(None, body.input, parts, history=stored_parts(kept))
    memory = [{"role": "system", "content": plan.recall_message()}] if plan.recalled else []
    starts_with_message = isinstance(body.input, str) or (parts.input and getattr(parts.input[0], "role", None))
    if not starts_with_message:
        return head + memory + recent_and_input
    num_recent = len(input_messages(None, "", _NO_PARTS, history=stored_parts(kept))) - 1
    return head + recent_and_input[:num_recent] + memory + recent_and_input[num_recent:]


def _report(budget: ContextBudget, plan: Assembly, history: list[dict[str, Any]],
            count: Callable[[str], int]) -> ContextReport:
    kept = [m for turn in plan.recent for m in turn.messages]
    return ContextReport(
        policy=budget.policy.value, budget_tokens=budget.budget_tokens, num_tokens=plan.num_tokens,
        items=[IncludedItem(id=m.id, num_tokens=count(m.text) + budget.message_overhead) for m in kept],
        summary_tokens=plan.parts["summary"],
        recalled=[RecalledPassage(source_id=p.source_id, num_tokens=p.num_tokens, text=p.text) for p in plan.recalled],
        summary_through=plan.summary.through if plan.summary is not None else None,
        num_dropped_items=len(history) - len(kept), parts=dict(plan.parts))
