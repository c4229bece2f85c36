"""`freehold eval memory`: do the facts that matter get into a long conversation's prompt under a token budget?

Generated conversations (`make_conversation`): each turn a user message and a reply of pydoc filler
(`pydoc_data.topics`, about 100 words each); a few facts planted early ("Note for later: the deploy key is stored
in vault slot 7."), and questions about them in the last turns. Every turn is assembled under the budget by
freehold.memory.context, for each policy:

    memory    recent turns + passages recalled by freehold.memory.recall (BM25, plus dense with an embedder)
    truncate  the newest turns that fit (OpenAI's truncation "auto": the last N tokens)
    sink      the whole conversation every turn under the KV policy "sink" (freehold.kv.sink) with the budget as
              its window: the model attends to the first tokens and the last `budget` ones, the rest is evicted
              as the prompt streams through (`run_sink`)

Measured per policy: fact recall (the planted sentence is in the assembled prompt of the turn asking about it:
model-independent), answer accuracy with a model (its answer holds the expected answer, lowercased with
punctuation removed; skipped with --no-model), prompt tokens per turn (the budget's count), shared-prefix share
(of each prompt's tokens, those in whole leading messages equal to the previous turn's prompt: what a prefix cache
can reuse, at most), the engine's cached-token share (with a model and `every_turn`: every turn's prompt runs through
the engine, with prefix caching, and its `cached_tokens` over its prompt tokens are summed), and assembly ms per
turn (indexing the new turn, retrieval and the plan; the last 10 turns reported separately). No running summary
is written here (that needs the model for every window move): recall comes from retrieval alone. The sink row's
cached share counts its question turns only (each streams the whole conversation; only its sink blocks can hit).
"""
from __future__ import annotations

import random
import re
import statistics
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Sequence

from freehold.memory.context import Assembly, ContextBudget, Counter, HistoryTurn, Message, Policy, assemble

if TYPE_CHECKING:  # recall needs the retrieval extra: imported when a memory policy runs
    from freehold.memory.recall import Embed

INSTRUCTIONS = "You are a helpful assistant. Answer the user's question briefly, using the conversation."
HEADERS = ["policy", "fact recall", "accuracy", "prompt tok/turn", "shared prefix", "cached (engine)", "assembly ms",
           "assembly ms (last 10)", "questions"]
# a model call: (messages, max_tokens) -> (text, cached prompt tokens, prompt tokens), as the engine counts them
Answer = Callable[[list[dict[str, str]], int], tuple[str, int, int]]
_FACTS = [
    ("the deploy key is stored in vault slot {n}", "In which vault slot is the deploy key stored?", "{n}"),
    ("the staging database password rotates every {n} days",
     "Every how many days does the staging database password rotate?", "{n}"),
    ("the on-call pager code is {w}{n}", "What is the on-call pager code?", "{w}{n}"),
    ("the backup bucket is called {w}-archive", "What is the backup bucket called?", "{w}-archive"),
    ("the team offsite will be held in {city}", "Where will the team offsite be held?", "{city}"),
    ("my manager's name is {name}", "What is my manager's name?", "{name}"),
    ("the API rate limit is {n} requests per minute", "What is the API rate limit, in requests per minute?", "{n}"),
    ("the build server's hostname is {w}-ci", "What is the build server's hostname?", "{w}-ci"),
]
_WORDS = ["falcon", "cobalt", "juniper", "quartz", "harbor", "maple", "orbit", "saffron"]
_CITIES = ["Lisbon", "Tallinn", "Porto", "Ghent", "Bergen", "Krakow", "Lyon", "Turin"]
_NAMES = ["Ingrid", "Tomasz", "Amara", "Keiko", "Rafael", "Olena", "Dmitri", "Priya"]


@dataclass(frozen=True)
class Fact:
    statement: str
    question: str
    answer: str


@dataclass(frozen=True)
class Conversation:
    turns: list[tuple[str, str]]  # (user, assistant), oldest first
    questions: dict[int, Fact]  # turn index -> the fact its user message asks about


@dataclass
class PolicyReport:
    policy: str
    recalled: list[bool] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    shared_tokens: list[int] = field(default_factory=list)
    engine_cached: list[int] = field(default_factory=list)  # per model call: cached_tokens, prompt tokens
    engine_prompt: list[int] = field(default_factory=list)
    assembly_ms: list[float] = field(default_factory=list)
    last_ms: list[float] = field(default_factory=list)

    def row(self) -> list:
        accuracy = sum(self.correct) / len(self.correct) if self.correct else "-"
        cached = sum(self.engine_cached) / sum(self.engine_prompt) if self.engine_prompt else "-"
        return [self.policy, sum(self.recalled) / len(self.recalled), accuracy,
                statistics.mean(self.prompt_tokens), sum(self.shared_tokens) / sum(self.prompt_tokens), cached,
                statistics.mean(self.assembly_ms), statistics.mean(self.last_ms), len(self.recalled)]

    def call(self, answer: Answer, messages: list[dict[str, str]], max_tokens: int) -> str:
        text, cached, prompt = answer(messages, max_tokens)
        self.engine_cached.append(cached)
        self.engine_prompt.append(prompt)
        return text


def make_conversation(seed: int, num_turns: int, num_facts: int = 5, words_per_message: int = 100) -> Conversation:
    if num_turns < 2 * num_facts + 5:
        raise ValueError(f"{num_turns} turns is too few for {num_facts} facts (at least {2 * num_facts + 5})")
    rng = random.Random(seed)
    filler = _filler_words()
    facts = [_fact(rng, i) for i in rng.sample(range(len(_FACTS)), num_facts)]
    plant_at = sorted(rng.sample(range(1, max(num_facts + 1, num_turns // 5)), num_facts))
    ask_at = list(range(num_turns - num_facts, num_turns))
    turns = []
    for t in range(num_turns):
        user = "Can you explain this part of the Python docs? " + _chunk(filler, rng, words_per_message)
        if t in plant_at:
            user = f"Note for later: {facts[plant_at.index(t)].statement}. Also, {user[0].lower()}{user[1:]}"
        if t in ask_at:
            user = facts[ask_at.index(t)].question
        turns.append((user, "Sure. " + _chunk(filler, rng, words_per_message)))
    return Conversation(turns, {t: facts[i] for i, t in enumerate(ask_at)})


def run_policy(conversation: Conversation, budget: ContextBudget, count: Counter, embed: Embed | None = None,
               answer: Answer | None = None, report: PolicyReport | None = None, max_tokens: int = 24,
               every_turn: bool = False) -> PolicyReport:
    """Assemble every turn of the conversation under `budget`; recall (and, with `answer`, accuracy) at the
    question turns; with `every_turn`, every other turn's prompt runs through the model too (one token)."""
    count = lru_cache(maxsize=None)(count)
    report = report or PolicyReport(budget.policy.value)
    recall = None
    if budget.policy is Policy.MEMORY:
        from freehold.memory.recall import HybridRecall  # the retrieval extra (`freehold eval memory` checks it)
        recall = HybridRecall(count, embed)
    turns: list[HistoryTurn] = []
    anchor, previous = None, None
    for t, (user, reply) in enumerate(conversation.turns):
        t0 = time.perf_counter()
        if recall is not None and t > 0:
            for m in turns[-1].messages:
                recall.add(m.id, m.text)
        plan = assemble(budget, count, INSTRUCTIONS, turns, [user], recall, anchor=anchor)
        ms = (time.perf_counter() - t0) * 1e3
        anchor = plan.anchor
        messages = render(plan, user)
        report.assembly_ms.append(ms)
        if t >= len(conversation.turns) - 10:
            report.last_ms.append(ms)
        report.prompt_tokens.append(plan.num_tokens)
        report.shared_tokens.append(_shared_tokens(previous, messages, count, budget.message_overhead))
        previous = messages
        fact = conversation.questions.get(t)
        if fact is not None:
            report.recalled.append(any(fact.statement in m["content"] for m in messages))
            if answer is not None:
                report.correct.append(_normalized(fact.answer) in _normalized(report.call(answer, messages,
                                                                                          max_tokens)))
        elif answer is not None and every_turn:
            report.call(answer, messages, 1)
        turn_messages = (Message(f"u{t}", "user", user), Message(f"a{t}", "assistant", reply))
        turns.append(HistoryTurn(turn_messages, sum(count(m.text) + budget.message_overhead for m in turn_messages)))
    return report


def run_sink(conversation: Conversation, window: int, count: Counter, overhead: int,
             render_ids: Callable[[list[dict[str, str]]], list[int]], decode: Callable[[list[int]], str],
             answer: Answer | None = None, report: PolicyReport | None = None, max_tokens: int = 24,
             sink_tokens: int = 16) -> PolicyReport:
    # sink_tokens: the sinks as the engine keeps them (whole blocks: SinkWindow.num_sink_tokens)
    """Every turn's prompt is the whole conversation, streamed under the KV policy "sink" with `window` (`answer`
    must run its requests that way). Recall: the planted sentence is within the last `window` tokens of the rendered
    prompt (the window the question is read with, at its shortest; the sinks hold the template's first tokens).
    Prompt tokens per turn: the whole conversation (what the engine must stream: only the sink blocks can come from
    the prefix cache); shared prefix: the sinks."""
    report = report or PolicyReport("sink")
    history = [{"role": "system", "content": INSTRUCTIONS}]
    for t, (user, reply) in enumerate(conversation.turns):
        messages = history + [{"role": "user", "content": user}]
        report.assembly_ms.append(0.0)  # nothing is assembled
        if t >= len(conversation.turns) - 10:
            report.last_ms.append(0.0)
        report.prompt_tokens.append(sum(count(m["content"]) + overhead for m in messages))
        report.shared_tokens.append(min(sink_tokens, report.prompt_tokens[-1]) if t else 0)
        fact = conversation.questions.get(t)
        if fact is not None:
            report.recalled.append(fact.statement in decode(render_ids(messages)[-window:]))
            if answer is not None:
                report.correct.append(_normalized(fact.answer) in _normalized(report.call(answer, messages,
                                                                                          max_tokens)))
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return report


def render(plan: Assembly, user: str) -> list[dict[str, str]]:
    """The plan as chat messages, in the prompt's order (freehold.memory.context)."""
    out = [{"role": "system", "content": plan.instructions}] if plan.instructions else []
    if plan.summary is not None:
        out.append({"role": "system", "content": plan.summary_message()})
    out += [{"role": m.role, "content": m.text} for turn in plan.recent for m in turn.messages]
    if plan.recalled:
        out.append({"role": "system", "content": plan.recall_message()})
    return out + [{"role": "user", "content": user}]


def num_tokens(conversation: Conversation, count: Counter) -> int:
    return sum(count(u) + count(a) for u, a in conversation.turns)


# ---- private ------------------------------------------------------------------------------------------------------
def _filler_words() -> list[str]:
    from pydoc_data.topics import topics
    return " ".join(topics[k] for k in sorted(topics)).split()


def _chunk(words: list[str], rng: random.Random, n: int) -> str:
    start = rng.randrange(len(words) - n)
    return " ".join(words[start:start + n])


def _fact(rng: random.Random, i: int) -> Fact:
    values = {"n": str(rng.randrange(2, 99)), "w": rng.choice(_WORDS), "city": rng.choice(_CITIES),
              "name": rng.choice(_NAMES)}
    statement, question, answer = _FACTS[i]
    return Fact(statement.format(**values), question, answer.format(**values))


def _shared_tokens(previous: list[dict[str, str]] | None, messages: list[dict[str, str]], count: Counter,
                   overhead: int) -> int:
    shared = 0
    for a, b in zip(previous or [], messages[:-1]):  # the new input is never shared
        if a != b:
            break
        shared += count(b["content"]) + overhead
    return shared


def _normalized(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s-]", " ", text.lower()).split())


def parse_policies(text: str) -> list[Policy | str]:
    """Context policies (freehold.memory.context) and "sink" (the KV policy, `run_sink`)."""
    try:
        return [p.strip() if p.strip() == "sink" else Policy(p.strip()) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--policies must be a comma-separated list of {[p.value for p in Policy] + ['sink']}, "
                         f"got {text!r}") from None


def summarize(reports: Sequence[PolicyReport]) -> list[list]:
    return [r.row() for r in reports]
