"""The distribution inspector: probabilities, entropy, effective candidates, table and chart."""
import math

import pytest
import torch

from freehold.sampling.inspect import format_table, inspect_distribution, save_chart


def decode(token_id: int) -> str:
    return f"tok{token_id}"


def test_uniform_distribution_has_log_v_entropy_and_v_candidates():
    (result,) = inspect_distribution(torch.zeros(8), decode, temperatures=[1.0], top_n=3)
    assert result.entropy_nats == pytest.approx(math.log(8))
    assert result.entropy_bits == pytest.approx(3.0)
    assert result.effective_candidates == pytest.approx(8.0)
    assert result.num_nonzero == 8
    assert len(result.top_tokens) == 3 and all(t.prob == pytest.approx(0.125) for t in result.top_tokens)


def test_greedy_and_top_p_narrow_the_distribution():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    greedy, cool, hot = inspect_distribution(logits, decode, temperatures=[0.0, 0.5, 1.5])
    assert greedy.entropy_nats == 0.0 and greedy.effective_candidates == 1.0
    assert greedy.top_tokens[0] == (0, "tok0", 1.0)
    assert cool.entropy_nats < hot.entropy_nats
    assert [t.token_id for t in hot.top_tokens] == [0, 1, 2, 3, 4]
    assert sum(t.prob for t in hot.top_tokens) == pytest.approx(1.0)
    (nucleus,) = inspect_distribution(logits, decode, temperatures=[1.0], top_p=0.7)
    assert nucleus.num_nonzero == 2  # p = [0.64, 0.24, ...]: the top two first reach 0.7


def test_format_table_and_chart(tmp_path):
    results = inspect_distribution(torch.randn(20, generator=torch.Generator().manual_seed(0)), decode,
                                   temperatures=[0.5, 1.0], min_p=0.05, top_n=5)
    table = format_table(results)
    assert "temperature=0.5" in table and "temperature=1" in table and "effective candidates" in table
    assert table.count("'tok") == 10
    path = save_chart(results, tmp_path / "dist.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
