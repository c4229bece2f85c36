"""`freehold bench spec`'s oracle estimate: the n-gram proposer replayed over a known output."""
import pytest

from freehold.bench.spec import _oracle_ratio

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]
COPY = [3, 4, 5, 6, 7, 8, 9, 1, 2, 3]  # the prompt's run again: after "1 2 3" the proposer has "4 5 ... 2"


@pytest.mark.parametrize("costs, want", [((1.0, 0.0), 9.0), ((1.0, 1.0), 18 / 10)])
def test_a_copied_run_is_verified_in_one_step(costs, want):
    # 9 timed tokens (the first comes from the prefill): plain decoding 9 steps of 1 token, the oracle one step of
    # 8 accepted drafts + the bonus token (T = 9)
    assert _oracle_ratio(PROMPT, COPY, costs, 8) == pytest.approx(want)


def test_drafts_are_capped_by_k():
    # k = 4: steps of 5 tokens (4 drafts + bonus), 9 tokens in 2 steps (5 + 4: the last one never a draft's)
    assert _oracle_ratio(PROMPT, COPY, (1.0, 0.0), 4) == pytest.approx(9 / 2)


@pytest.mark.parametrize("costs, want", [((1.0, 0.0), 6 / 3), ((1.0, 1.0), 12 / 9)])
def test_only_the_drafts_that_match_count(costs, want):
    # 6 timed tokens: the proposer offers "4 5 6 7 8", 3 match, then the bonus 100 (T = 4); after "6 100" nothing
    # matches, so 101 and 102 take a step each (T = 1): 3 steps against 6
    assert _oracle_ratio(PROMPT, [3, 4, 5, 6, 100, 101, 102], costs, 8) == pytest.approx(want)


def test_nothing_timed_is_no_estimate():
    assert _oracle_ratio(PROMPT, [3], (1.0, 1.0), 8) is None
