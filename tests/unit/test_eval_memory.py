"""`freehold eval memory` without a model: tokens counted as words, a recording stand-in for the model calls (the
real model runs in the eval itself; the engine's cached_tokens are tested in the server tests)."""
from __future__ import annotations

import pytest

from freehold.commands import sink_window
from freehold.errors import InvalidRequestError
from freehold.eval.memory import make_conversation, parse_policies, run_policy, run_sink
from freehold.kv.sink import SinkWindow
from freehold.memory.context import ContextBudget, Policy


def words(text: str) -> int:
    return len(text.split())


class Calls:
    """Answers with the message count; 'caches' half of each prompt."""

    def __init__(self):
        self.max_tokens: list[int] = []

    def __call__(self, messages, max_tokens):
        self.max_tokens.append(max_tokens)
        prompt = sum(words(m["content"]) for m in messages)
        return "no idea", prompt // 2, prompt


@pytest.fixture(scope="module")
def conversation():
    return make_conversation(seed=1, num_turns=40, num_facts=3, words_per_message=60)


def test_every_turn_runs_each_prompt_and_reports_the_engine_cached_share(conversation):
    calls = Calls()
    report = run_policy(conversation, ContextBudget(600, Policy.TRUNCATE), words, answer=calls, max_tokens=7,
                        every_turn=True)
    assert len(calls.max_tokens) == 40
    assert calls.max_tokens.count(7) == 3 and calls.max_tokens.count(1) == 37  # questions answered in full
    row = dict(zip(["policy", "recall", "accuracy", "prompt", "shared", "cached"], report.row()))
    assert row["cached"] == pytest.approx(sum(report.engine_cached) / sum(report.engine_prompt))
    assert 0.45 < row["cached"] <= 0.5
    quiet = Calls()
    report = run_policy(conversation, ContextBudget(600, Policy.TRUNCATE), words, answer=quiet)
    assert len(quiet.max_tokens) == 3  # without every_turn: the questions only


def test_sink_sees_the_whole_conversation_but_recalls_only_its_window(conversation):
    ids_of = lambda messages: " ".join(m["content"] for m in messages).split()  # noqa: E731
    decode = " ".join
    narrow = run_sink(conversation, 300, words, 4, ids_of, decode, answer=Calls())
    assert narrow.recalled == [False] * 3  # the facts are planted in the first fifth
    assert narrow.prompt_tokens == sorted(narrow.prompt_tokens)  # the whole conversation, growing every turn
    assert narrow.prompt_tokens[-1] > 40 * 2 * 60
    assert len(narrow.engine_prompt) == 3
    wide = run_sink(conversation, 10 ** 6, words, 4, ids_of, decode)
    assert wide.recalled == [True] * 3 and wide.correct == []


def test_sink_window_is_the_largest_that_fits_the_budget():
    for budget in (256, 1000, 2048):
        window = sink_window(budget)
        assert SinkWindow.from_tokens(4, window, 16).max_cache_len <= budget
        assert SinkWindow.from_tokens(4, window + 16, 16).max_cache_len > budget
    assert sink_window(48) == 16  # a sink block, one window block, one eviction step
    with pytest.raises(InvalidRequestError, match="--budget 40 is too small for the sink policy.*48 tokens"):
        sink_window(40)


def test_policies_parse_with_sink():
    assert parse_policies("memory, sink,truncate") == [Policy.MEMORY, "sink", Policy.TRUNCATE]
    with pytest.raises(ValueError, match="sink"):
        parse_policies("memory,lru")
