"""`freehold bench spec`'s perfect-policy estimate: the n-gram proposer replayed over a known output."""
import pytest

from freehold.bench.spec import _perfect_policy_ratio

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]
COPY = [3, 4, 5, 6, 7, 8, 9, 1, 2, 3]  # the prompt's run again: after "1 2 3" the proposer has "4 5 ... 2"


@pytest.mark.parametrize("costs, want", [((1.0, 0.0), 9.0), ((1.0, 1.0), 18 / 10)])
def test_a_copied_run_is_verified_in_one_step(costs, want):
    # 9 timed tokens (the first comes from the prefill): plain decoding 9 steps of 1 token, the perfect policy one
    # step of 8 accepted drafts + the bonus token (T = 9)
    assert _perfect_policy_ratio([PROMPT], [COPY], costs, 8) == pytest.approx(want)


def test_drafts_are_capped_by_k_and_nothing_proposed_is_plain_decoding():
    # k = 4: steps of 5 tokens (4 drafts + bonus), 9 tokens in 2 steps (5 + 4: the last one never a draft's)
    assert _perfect_policy_ratio([PROMPT], [COPY], (1.0, 0.0), 4) == pytest.approx(9 / 2)
    novel = [100, 101, 102, 103, 104, 105]  # no suffix of it occurs earlier: every step decodes one token
    assert _perfect_policy_ratio([PROMPT], [novel], (1.0, 0.5), 8) == pytest.approx(1.0)


def test_a_batch_steps_together():
    # batch 2 (the copy and a novel output): plain 9 steps of T = 2; perfect: step 1 T = 9 + 1, then 8 steps of T = 1
    novel = [100 + i for i in range(10)]
    plain, perfect = 9 * (1 + 2), (1 + 10) + 8 * (1 + 1)
    assert _perfect_policy_ratio([PROMPT, PROMPT], [COPY, novel], (1.0, 1.0), 8) == pytest.approx(plain / perfect)
