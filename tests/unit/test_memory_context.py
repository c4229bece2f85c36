"""freehold.memory.context (context assembly under a token budget) and freehold.memory.recall (hybrid retrieval over
a conversation's history), without a model: tokens counted as words, BM25 only (no embedder)."""
from __future__ import annotations

import pytest

from freehold.memory.context import (ContextBudget, ContextTooLargeError, Message, Policy, Summary, assemble,
                                     cut_to_tokens, split_turns, unsummarized)
from freehold.memory.recall import HybridRecall, split_passages

FACT = "the deploy key is stored in vault slot 7."
FILLER = ("The interpreter reads statements from the file and executes them in order. Each statement may bind "
          "names in the current namespace, and compound statements contain groups of other statements. ")


def words(text: str) -> int:
    return len(text.split())


def conversation(num_turns: int, fact_at: int | None = 2) -> list[Message]:
    out = []
    for i in range(num_turns):
        note = f" Please remember: {FACT}" if i == fact_at else ""
        out.append(Message(f"u{i}", "user", f"Turn {i}. {FILLER}{note}"))
        out.append(Message(f"a{i}", "assistant", f"Answer {i}. {FILLER}"))
    return out


def plan(num_turns: int, budget: int, policy: Policy = Policy.MEMORY, **kw):
    messages = conversation(num_turns)
    recall = HybridRecall(words)
    for m in messages:
        recall.add(m.id, m.text)
    b = ContextBudget(budget, policy)
    turns = split_turns(messages, words, b.message_overhead)
    return assemble(b, words, "You are helpful.", turns, ["Which vault slot holds the deploy key?"], recall, **kw)


def rendered_tokens(a) -> int:
    """The plan's prompt counted message by message, as the budget counts it."""
    texts = [a.instructions, a.summary_message(), *(m.text for t in a.recent for m in t.messages),
             a.recall_message(), "Which vault slot holds the deploy key?"]
    return sum(words(t) + 4 for t in texts if t)


@pytest.mark.parametrize("policy", list(Policy))
@pytest.mark.parametrize("budget", [60, 200, 517, 2000])
def test_the_budget_holds_and_the_plan_counts_what_it_renders(policy, budget):
    a = plan(60, budget, policy, summary=Summary("The user works on deploys.", "u1"))
    assert a.num_tokens == rendered_tokens(a) <= budget
    assert sum(a.parts.values()) == a.num_tokens


def test_recent_turns_are_the_newest_contiguous_run_kept_verbatim():
    a = plan(60, 2000)
    ids = [t.id for t in a.recent]
    assert ids == [f"u{i}" for i in range(60 - len(ids), 60)] and len(ids) >= 2
    assert [t.id for t in a.dropped] + ids == [f"u{i}" for i in range(60)]
    assert a.recent[-1].messages[1].text.startswith("Answer 59.")  # whole turns: the reply stays with its question


def test_memory_recalls_the_planted_fact_that_truncation_drops():
    memory, truncated = plan(60, 600), plan(60, 600, Policy.TRUNCATE)
    assert any(FACT in p.text for p in memory.recalled)
    assert memory.recalled[0].source_id == "u2"  # best first
    assert not truncated.recalled and "u2" not in [t.id for t in truncated.recent]
    assert truncated.parts["recent"] > memory.parts["recent"]  # truncation spends the whole budget on recent turns


def test_truncation_keeps_as_many_newest_turns_as_fit():
    a = plan(60, 600, Policy.TRUNCATE)
    one_more = a.dropped[-1].num_tokens
    assert a.num_tokens <= 600 < a.num_tokens + one_more and a.summary is None


def test_recall_never_returns_what_is_already_verbatim():
    a = plan(3, 5000)  # everything fits: nothing is dropped, nothing recalled
    assert not a.dropped and not a.recalled and len(a.recent) == 3


def test_consecutive_turns_keep_the_window_start_until_it_no_longer_fits():
    messages = conversation(80)
    b = ContextBudget(800)
    turns = split_turns(messages, words, b.message_overhead)
    anchor, starts = None, []
    for n in range(40, 80):
        a = assemble(b, words, "Be brief.", turns[:n], ["next?"], anchor=anchor)
        assert a.num_tokens <= 800
        starts.append(a.anchor)
        anchor = a.anchor
    changes = sum(x != y for x, y in zip(starts, starts[1:]))
    assert changes <= len(starts) // 2  # a window start is kept for at least two turns in a row on average
    assert len(set(starts)) > 1  # and it does move forward


def test_the_summary_comes_first_and_dropped_turns_after_it_are_to_summarize():
    a = plan(60, 1000, summary=Summary("Deploy work so far.", "u10"))
    assert a.summary is not None and a.parts["summary"] == words(a.summary_message()) + 4
    assert [t.id for t in a.to_summarize] == [t.id for t in a.dropped][11:]
    too_long = plan(60, 1000, summary=Summary("word " * 500, "u10"))
    room = ContextBudget(1000).summary_room  # 100: a third of the memory share
    assert too_long.summary is not None and too_long.summary.through == "u10"  # over its share: cut, not dropped
    assert too_long.parts["summary"] == words(too_long.summary_message()) + 4 == room
    assert ("word " * 500).startswith(too_long.summary.text)
    assert [t.id for t in too_long.to_summarize] == [t.id for t in a.to_summarize]


def test_what_to_summarize_follows_the_stored_summary_not_what_fitted():
    turns = split_turns(conversation(60), words, 4)
    dropped, recent = turns[:40], turns[40:]
    assert [t.id for t in unsummarized(dropped, recent, "u10")] == [f"u{i}" for i in range(11, 40)]
    assert unsummarized(dropped, recent, "u39") == ()  # the summary covers every dropped turn
    assert unsummarized(dropped, recent, "u45") == ()  # it covers more than this window drops: nothing again
    assert len(unsummarized(dropped, recent, None)) == len(unsummarized(dropped, recent, "gone")) == 40


def test_cut_to_tokens_keeps_the_longest_head_at_a_space():
    text = "alpha beta gamma delta epsilon"
    assert cut_to_tokens(text, words, 3) == "alpha beta gamma"
    assert cut_to_tokens(text, words, 10) == text and cut_to_tokens(text, words, 0) == ""
    assert cut_to_tokens("x" * 50, len, 7) == "x" * 7  # no space: cut at characters


def test_tools_count_against_the_budget():
    plain, with_tools = plan(60, 600, Policy.TRUNCATE), plan(60, 600, Policy.TRUNCATE, reserved_tokens=150)
    assert with_tools.parts["tools"] == 150 and with_tools.num_tokens <= 600
    assert with_tools.parts["recent"] < plain.parts["recent"]
    with pytest.raises(ContextTooLargeError, match="the tools"):
        plan(60, 600, Policy.TRUNCATE, reserved_tokens=590)


def test_explicit_memories_are_recalled_by_id():
    recall = HybridRecall(words)
    recall.add("mem_1", "The user's favourite editor is vim.")
    recall.add("mem_2", "The staging cluster runs in Frankfurt.")
    b = ContextBudget(300)
    a = assemble(b, words, None, [], ["where does the staging cluster run?"], recall, memory_ids=["mem_1", "mem_2"])
    assert [p.source_id for p in a.recalled][0] == "mem_2"
    other = assemble(b, words, None, [], ["staging cluster?"], recall, memory_ids=["mem_1"])
    assert other.recalled == ()  # only the allowed memories, and (BM25 alone) only those sharing a query term


def test_input_over_the_budget_is_a_clear_error():
    with pytest.raises(ContextTooLargeError, match="over the context budget of 5"):
        assemble(ContextBudget(5), words, "You are a helpful assistant.", [], ["hi"])
    with pytest.raises(ValueError, match="budget_tokens"):
        ContextBudget(0)


def test_passages_are_whole_sentences_within_the_limit():
    text = "One two three. Four five six seven. " + "word " * 30 + "end."
    passages = split_passages(text, words, 8)
    assert passages[0] == "One two three. Four five six seven." and all(words(p) <= 8 for p in passages)
    assert " ".join(passages).split() == text.split()
