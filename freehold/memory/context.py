"""Context assembly: which of a conversation's history enters one turn's prompt, under a token budget.

Pure and model-independent: text in, a plan out. Tokens are counted by an injected `count(text) -> int`, plus
`ContextBudget.message_overhead` per message (the chat template's role markers); the plan's `num_tokens` is the sum
the budget bounds. The prompt, in order:

    instructions                         (system)  as given, never dropped
    summary of the earlier conversation  (system)  the running summary, when there is one (cut at words to its share)
    recent turns, verbatim               (as sent) a contiguous run of the newest turns
    recalled passages                    (system)  older passages and explicit memories retrieved for the input
    the new input                        (as sent) never dropped

Policies:
  TRUNCATE  OpenAI's `truncation: "auto"`: as many of the newest turns as fit, the oldest dropped. No summary, no
            recall.
  MEMORY    `memory_share` of the budget is kept for the summary (at most a third of that share: `summary_room`)
            and the recalled passages; the rest holds recent turns. The recent window is anchored: the turn it
            started at last time (`anchor`) stays its first turn while the window from there still fits, so
            consecutive turns share the prompt up to the recalled block (prefix-cache hits); when it no longer
            fits, the window restarts at the newest turns that fill `refill` of its room, and stays there for the
            next few turns.

A turn is a user message and what follows it up to the next user message (a tool call stays with its output):
turns are kept or dropped whole. Turns that left the window after the summary's last turn are returned as
`to_summarize` (`unsummarized`: the caller writes the next summary from them, in at most `summary_room` tokens less
the header; see freehold.server.response_context). `reserved_tokens` counts what the prompt holds besides its
messages (the tools' JSON) against the budget.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

Counter = Callable[[str], int]
SUMMARY_HEADER = "Summary of the earlier conversation:\n"
RECALL_HEADER = "Earlier messages and saved memories that may be relevant:\n"


class Policy(enum.Enum):
    MEMORY = "memory"
    TRUNCATE = "truncate"


@dataclass(frozen=True)
class ContextBudget:
    budget_tokens: int
    policy: Policy = Policy.MEMORY
    memory_share: float = 0.3  # MEMORY: the part of the budget for summary + recalled passages
    refill: float = 0.5  # MEMORY: a restarted window fills this part of its room
    message_overhead: int = 4  # tokens a message costs beyond its text (role markers)

    def __post_init__(self) -> None:
        if self.budget_tokens < 1:
            raise ValueError(f"budget_tokens must be at least 1, got {self.budget_tokens}")
        if not 0.0 <= self.memory_share < 1.0 or not 0.0 < self.refill <= 1.0:
            raise ValueError(f"memory_share must be in [0, 1) and refill in (0, 1], got {self}")
        if self.message_overhead < 0:
            raise ValueError(f"message_overhead must be >= 0, got {self.message_overhead}")

    @property
    def summary_room(self) -> int:
        """MEMORY: the most tokens the summary message may take (header and overhead included)."""
        return int(self.budget_tokens * self.memory_share) // 3


@dataclass(frozen=True)
class Message:
    """One message of the history, as the assembler sees it: its item id, role and text."""
    id: str
    role: str
    text: str


@dataclass(frozen=True)
class HistoryTurn:
    messages: tuple[Message, ...]
    num_tokens: int  # its messages verbatim, overhead included

    @property
    def id(self) -> str:
        return self.messages[0].id

    @property
    def item_ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.messages)


@dataclass(frozen=True)
class Passage:
    """A piece of an older message or an explicit memory, as recall returns it."""
    source_id: str  # the item id or memory id it comes from
    text: str
    num_tokens: int  # as `count` counts it (no overhead: passages share one message)


class Recall(Protocol):
    def search(self, query: str, allowed: set[str]) -> list[Passage]:
        """Passages whose source_id is in `allowed`, best first."""


@dataclass(frozen=True)
class Summary:
    text: str
    through: str  # the id of the last turn it covers


@dataclass(frozen=True)
class Assembly:
    """What enters the prompt (`messages` renders it), and what was left out."""
    instructions: str | None
    summary: Summary | None
    recent: tuple[HistoryTurn, ...]  # verbatim, oldest first
    recalled: tuple[Passage, ...]  # best first
    dropped: tuple[HistoryTurn, ...]  # older turns not in `recent`
    to_summarize: tuple[HistoryTurn, ...]  # dropped turns newer than the summary given (included or not)
    input_tokens: int  # the new input's messages
    num_tokens: int  # everything above, overhead included: <= budget_tokens
    parts: dict[str, int] = field(default_factory=dict)  # tokens of instructions, tools, summary, recent, recalled,
    # input

    @property
    def anchor(self) -> str | None:
        """The first recent turn's id: pass it as `anchor` next turn."""
        return self.recent[0].id if self.recent else None

    def summary_message(self) -> str | None:
        return SUMMARY_HEADER + self.summary.text if self.summary is not None else None

    def recall_message(self) -> str | None:
        return recall_text(self.recalled) if self.recalled else None


class ContextTooLargeError(ValueError):
    """The instructions and the new input alone pass the budget."""


def recall_text(passages: Sequence[Passage]) -> str:
    return RECALL_HEADER + "\n".join(f"- {p.text}" for p in passages)


def unsummarized(dropped: Sequence[HistoryTurn], recent: Sequence[HistoryTurn],
                 through: str | None) -> tuple[HistoryTurn, ...]:
    """The dropped turns newer than the turn `through` (the stored summary's last; None or gone: all of them)."""
    ids = [t.id for t in (*dropped, *recent)]
    first = ids.index(through) + 1 if through in ids else 0
    return tuple(dropped[first:])


def cut_to_tokens(text: str, count: Counter, room: int) -> str:
    """The longest head of `text` that `count` counts at most `room` tokens, cut at a space when it has one ("" when
    nothing fits). Binary search over characters: O(log len) counts."""
    if count(text) <= room:
        return text
    low, high = 0, len(text)  # count(text[:low]) <= room < count(text[:high])
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count(text[:mid]) <= room else (low, mid)
    head = text[:low]
    space = head.rfind(" ")
    return (head[:space] if space > 0 else head).rstrip()


def split_turns(messages: Sequence[Message], count: Counter, overhead: int) -> list[HistoryTurn]:
    """Messages -> turns (each starts at a user message, or at the first message)."""
    groups: list[list[Message]] = []
    for m in messages:
        if not groups or m.role == "user":
            groups.append([])
        groups[-1].append(m)
    return [HistoryTurn(tuple(g), sum(count(m.text) + overhead for m in g)) for g in groups]


def assemble(budget: ContextBudget, count: Counter, instructions: str | None, history: Sequence[HistoryTurn],
             input_texts: Sequence[str], recall: Recall | None = None, summary: Summary | None = None,
             anchor: str | None = None, memory_ids: Sequence[str] = (), reserved_tokens: int = 0) -> Assembly:
    """The plan for one turn (see the module docstring). `input_texts`: the new input's messages; `memory_ids`:
    explicit memories recall may return besides the dropped turns' items; `reserved_tokens`: the prompt's tokens
    outside its messages (tools). ContextTooLargeError if the instructions, tools and input alone do not fit."""
    overhead = budget.message_overhead
    fixed = {"instructions": count(instructions) + overhead if instructions else 0, "tools": reserved_tokens,
             "input": sum(count(t) + overhead for t in input_texts)}
    room = budget.budget_tokens - sum(fixed.values())
    if room < 0:
        alone = "the instructions, the tools and the new input" if reserved_tokens else \
            "the instructions and the new input"
        raise ContextTooLargeError(f"{alone} alone take {sum(fixed.values())} tokens, over the context budget of "
                                   f"{budget.budget_tokens}")
    if budget.policy is Policy.TRUNCATE:
        start = _newest_start(history, room)
        return _plan(instructions, None, history, start, (), fixed, summary_through=None)
    memory_room = int(budget.budget_tokens * budget.memory_share)
    kept_summary = _cut_summary(summary, count, overhead, min(budget.summary_room, room))
    summary_tokens = _summary_tokens(kept_summary, count, overhead)
    start = _anchored_start(history, max(0, room - memory_room), anchor, budget.refill)
    recall_room = min(memory_room, room - _tokens(history[start:])) - summary_tokens
    allowed = {i for turn in history[:start] for i in turn.item_ids} | set(memory_ids)
    recalled: tuple[Passage, ...] = ()
    if recall is not None and allowed and recall_room > overhead:
        recalled = _fill(recall.search(" ".join(input_texts), allowed), recall_room - overhead, count)
    return _plan(instructions, kept_summary, history, start, recalled, fixed,
                 summary_through=summary.through if summary is not None else None,
                 extra={"summary": summary_tokens,
                        "recalled": count(recall_text(recalled)) + overhead if recalled else 0})


# ---- private ------------------------------------------------------------------------------------------------------
def _tokens(turns: Sequence[HistoryTurn]) -> int:
    return sum(t.num_tokens for t in turns)


def _newest_start(history: Sequence[HistoryTurn], room: int) -> int:
    """The smallest start whose turns (start..end) fit `room`."""
    start, used = len(history), 0
    while start > 0 and used + history[start - 1].num_tokens <= room:
        start -= 1
        used += history[start].num_tokens
    return start


def _anchored_start(history: Sequence[HistoryTurn], room: int, anchor: str | None, refill: float) -> int:
    ids = [t.id for t in history]
    if anchor in ids:
        start = ids.index(anchor)
        if _tokens(history[start:]) <= room:
            return start
    return _newest_start(history, int(room * refill))


def _cut_summary(summary: Summary | None, count: Counter, overhead: int, room: int) -> Summary | None:
    """The summary, its text cut at words to fit `room` when over (None: none, or not even a word fits)."""
    if summary is None or _summary_tokens(summary, count, overhead) <= room:
        return summary
    text = cut_to_tokens(summary.text, count, room - overhead - count(SUMMARY_HEADER))
    while text and count(SUMMARY_HEADER + text) + overhead > room:  # the join counted apart differs a little
        text = cut_to_tokens(text, count, count(text) - 1)
    return Summary(text, summary.through) if text else None


def _summary_tokens(summary: Summary | None, count: Counter, overhead: int) -> int:
    return count(SUMMARY_HEADER + summary.text) + overhead if summary is not None else 0


def _fill(passages: Sequence[Passage], room: int, count: Counter) -> tuple[Passage, ...]:
    """Best first, each that still fits (a long one is skipped, a shorter later one may fit), estimating a passage
    at its tokens plus two for its "- " and newline; then the block is counted as rendered, and the last passages
    are dropped while it is over `room` (so the budget holds whatever the counter does at the joins)."""
    out, used = [], count(RECALL_HEADER)
    for p in passages:
        if used + p.num_tokens + 2 <= room:
            out.append(p)
            used += p.num_tokens + 2
    while out and count(recall_text(out)) > room:
        out.pop()
    return tuple(out)


def _plan(instructions: str | None, summary: Summary | None, history: Sequence[HistoryTurn], start: int,
          recalled: tuple[Passage, ...], fixed: dict[str, int], summary_through: str | None,
          extra: dict[str, int] | None = None) -> Assembly:
    recent, dropped = tuple(history[start:]), tuple(history[:start])
    parts = {"instructions": fixed["instructions"], "tools": fixed["tools"], "summary": 0, "recent": _tokens(recent),
             "recalled": 0, "input": fixed["input"], **(extra or {})}
    return Assembly(instructions, summary, recent, recalled, dropped, unsummarized(dropped, recent, summary_through),
                    fixed["input"], sum(parts.values()), parts)
