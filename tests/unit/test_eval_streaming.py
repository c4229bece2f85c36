"""`freehold eval ppl --kv-policy`: the streaming evaluation on a tiny random Llama.

recompute is checked against its definition token by token (a fresh forward over exactly the tokens the sink
policy keeps a count of), the sink stream against the same model's StreamingLLM-free reference where they must
agree (before the first eviction), and the checkpoints against the per-token numbers they summarise."""
import math

import pytest
import torch
import torch.nn.functional as F

from freehold.config import EngineConfig, KVDtype
from freehold.errors import InvalidRequestError
from freehold.eval.streaming import decode_speed, parse_checkpoints, stream_ppl
from freehold.kv.sink import SinkWindow
from tests.conftest import TINY, tiny_model

WINDOW, SINKS, CHUNK = 64, 4, 16  # 16-token blocks: 1 sink block, 4 window blocks, eviction step 1 block


@pytest.fixture(scope="module")
def model():
    return tiny_model(3)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, TINY.vocab_size - 1, (400,), generator=torch.Generator().manual_seed(5)).tolist()


@torch.inference_mode()
def direct_nll(model, ids: list[int], t: int, context: int) -> float:
    """-log p(ids[t] | the `context` tokens before it), positions from 0, no cache."""
    x = torch.tensor(ids[t - context:t + 1])
    logits = model.compute_logits(model(x[:-1], torch.arange(context))[-1:])
    return float(F.cross_entropy(logits, x[-1:]))


def test_recompute_scores_each_token_against_as_many_tokens_as_the_sink_policy_keeps(model, ids):
    kept = SinkWindow.from_tokens(SINKS, WINDOW, 16)
    p0, step = kept.max_cache_len, kept.evict_tokens  # the first eviction point (96) and the step (16)
    context = kept.num_sink_tokens + kept.window_tokens
    r = stream_ppl(model, TINY, EngineConfig(), ids, "recompute", SINKS, WINDOW, CHUNK, [200, 400], every=2)
    # up to p0: every position; after it: every other step of 16 tokens, (p_k, p_k + 16], starting with the first
    expected = list(range(1, p0 + 1)) + [p for k, s in enumerate(range(p0, 399, step)) if k % 2 == 0
                                         for p in range(s + 1, min(s + step + 1, 400))]
    assert r.positions == expected
    for t in (5, p0, p0 + 1, p0 + step, p0 + 2 * step + 3, r.positions[-1]):
        assert t in r.positions
        sees = t if t <= p0 else context + (t - p0 - 1) % step + 1
        assert r.nll[r.positions.index(t)] == pytest.approx(direct_nll(model, ids, t, sees), abs=2e-4)
    assert [c.tokens for c in r.checkpoints] == [200, 400]
    low = [v for p, v in zip(r.positions, r.nll) if p < 200]
    assert r.checkpoints[0].perplexity == pytest.approx(math.exp(sum(low) / len(low)))


def test_sink_stream_agrees_with_full_until_the_first_eviction_and_holds_flat_memory(model, ids):
    kept = SinkWindow.from_tokens(SINKS, WINDOW, 16)
    first = kept.max_cache_len
    sink = stream_ppl(model, TINY, EngineConfig(), ids, "sink", SINKS, WINDOW, CHUNK, [150, 400])
    full = stream_ppl(model, TINY, EngineConfig(), ids, "full", SINKS, WINDOW, CHUNK, [150, 400])
    assert sink.positions == full.positions == list(range(1, 400))
    assert sink.nll[:first] == pytest.approx(full.nll[:first], abs=1e-4)  # positions 1..p_0 see everything
    differ = [abs(a - b) > 1e-3 for a, b in zip(sink.nll[first:], full.nll[first:])]
    assert sum(differ) > 0.9 * len(differ)  # past it, the evicted tokens are gone
    per_token = TINY.kv_bytes_per_token(EngineConfig().cache_dtype)
    assert [c.kv_bytes for c in sink.checkpoints] == [first * per_token] * 2  # flat from 150 to 400 tokens
    assert full.checkpoints[1].kv_bytes == 400 * per_token > full.checkpoints[0].kv_bytes
    for c in sink.checkpoints:
        assert c.perplexity == pytest.approx(math.exp(sum(sink.nll[:c.tokens - 1]) / (c.tokens - 1)))
        assert c.tokens_per_second > 0
    shared = set(range(1, first))
    assert sink.perplexity_at(shared) == pytest.approx(full.perplexity_at(shared), rel=1e-4)


def test_window_only_keeps_no_sinks(model, ids):
    window = stream_ppl(model, TINY, EngineConfig(), ids, "window", SINKS, WINDOW, CHUNK, [400])
    kept = SinkWindow.from_tokens(0, WINDOW, 16)
    assert window.checkpoints[0].kv_bytes == kept.max_cache_len * TINY.kv_bytes_per_token(EngineConfig().cache_dtype)


def test_decode_speed_reports_each_checkpoint_with_flat_memory(model, ids):
    rows = decode_speed(model, TINY, EngineConfig(), ids, SINKS, WINDOW, [120, 400], span=40)
    assert [r[0] for r in rows] == [120, 400]
    kept = SinkWindow.from_tokens(SINKS, WINDOW, 16)
    per_token = TINY.kv_bytes_per_token(EngineConfig().cache_dtype)
    assert all(0 < held <= kept.max_cache_len * per_token for _, _, held in rows)
    assert all(rate > 0 for _, rate, _ in rows)


def test_bad_arguments_name_the_problem(model, ids):
    with pytest.raises(InvalidRequestError, match="kv policy must be one of"):
        stream_ppl(model, TINY, EngineConfig(), ids, "lru", SINKS, WINDOW, CHUNK)
    with pytest.raises(InvalidRequestError, match="one stride in N"):
        stream_ppl(model, TINY, EngineConfig(), ids, "recompute", SINKS, WINDOW, CHUNK, every=0)
    with pytest.raises(InvalidRequestError, match="beyond the context length of 1024"):
        stream_ppl(model, TINY, EngineConfig(), ids, "recompute", SINKS, 2048, CHUNK)
    with pytest.raises(InvalidRequestError, match="--tokens"):
        parse_checkpoints("8k", 100)
    assert parse_checkpoints("8192,50,32768", 1000) == [50, 1000]


def test_recompute_holds_one_window_at_the_cache_element_size(model, ids):
    kept = SinkWindow.from_tokens(SINKS, WINDOW, 16)
    r = stream_ppl(model, TINY, EngineConfig(kv_dtype=KVDtype.BF16), ids, "recompute", SINKS, WINDOW, CHUNK, [400])
    assert r.checkpoints[0].kv_bytes == kept.max_cache_len * TINY.kv_bytes_per_token(torch.bfloat16)


def test_streaming_flags_without_a_kv_policy_are_named(capsys):
    from freehold.cli import main
    assert main(["eval", "ppl", "--decode", "--recompute-every", "4"]) == 2
    assert "--decode, --recompute-every only apply with --kv-policy" in capsys.readouterr().err
