"""Grammar bitmasks in the sampler and the engine, on the tiny random Llama with a one-character-per-token vocabulary:
constrained rows draw only what the grammar allows, free rows are untouched, matchers survive preemption and
chunked prefill, n > 1 gets one matcher per sequence, and max_tokens before completion reports "length"."""
import re

import pytest
import torch
import xgrammar as xgr

from freehold.constrain.matcher import BitmaskFiller, GrammarState
from freehold.constrain.spec import Constraint, Regex
from freehold.errors import InvalidRequestError
from freehold.sampling import Sampler, SamplingRow, make_generator
from freehold.types import FinishReason, SamplingParams
from tests.conftest import TINY, TINY_EOS, tiny_engine, tiny_model

VOCAB = TINY.vocab_size
NUM_CHARS = 95  # token i < 95 is chr(32 + i); the rest are special (never allowed) or EOS


def tiny_vocab() -> list[str]:
    vocab = [chr(32 + i) if i < NUM_CHARS else "" for i in range(VOCAB)]
    vocab[TINY_EOS] = "</s>"
    return vocab


_COMPILER = xgr.GrammarCompiler(xgr.TokenizerInfo(tiny_vocab(), xgr.VocabType.RAW, vocab_size=VOCAB,
                                                  stop_token_ids=[TINY_EOS]), cache_enabled=False)


def regex(pattern: str) -> Constraint:
    return Constraint(Regex(pattern), _COMPILER.compile_regex(pattern), VOCAB)


def text(tokens: list[int]) -> str:
    assert all(t < NUM_CHARS for t in tokens), tokens
    return "".join(chr(32 + t) for t in tokens)


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full recompute, without any cache."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)))[-1:]).argmax()))
    return ids[len(prompt):]


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """request id -> per completion (tokens, finish reason)."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    out = {rid: [([], None) for _ in range(params.n)] for rid, (_, params) in requests.items()}
    while engine.has_unfinished():
        for o in engine.step():
            for c in o.outputs:
                tokens, _ = out[o.request_id][c.index]
                out[o.request_id][c.index] = (tokens + c.token_ids, c.finish_reason)
        engine.check_integrity()
    return out


# -- sampler ---------------------------------------------------------------------------------------------------------
def test_bitmask_rows_draw_only_allowed_tokens_and_other_rows_are_untouched():
    sampler = Sampler(VOCAB, "cpu", [TINY_EOS], seed=0)
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    state = GrammarState(regex("[0-9]+"))
    masks = BitmaskFiller(VOCAB, max_threads=1).fill([state, None, state, None])
    digits = torch.zeros(VOCAB, dtype=torch.bool)
    digits[16:26] = True  # "0".."9" are chr(48..57) = tokens 16..25
    params = SamplingParams(temperature=1.0, logprobs=2)
    for seed in range(20):
        rows = [SamplingRow(params, [1], [], make_generator(seed * 4 + i), token_bitmask=m)
                for i, m in enumerate(masks)]
        processed = sampler.process_logits(logits, rows)
        assert torch.equal(processed[1], logits[1]) and torch.equal(processed[3], logits[3])
        assert torch.isneginf(processed[0][~digits]).all() and torch.equal(processed[0][digits], logits[0][digits])
        out = sampler.sample(logits.clone(), rows)
        assert 16 <= out.token_ids[0] <= 25 and 16 <= out.token_ids[2] <= 25
        raw = torch.log_softmax(logits[0], -1)[out.token_ids[0]].item()
        assert out.logprobs[0].logprob == pytest.approx(raw, abs=1e-5), "logprobs are of the raw logits"


def test_greedy_constrained_row_takes_the_best_allowed_token():
    sampler = Sampler(VOCAB, "cpu", [TINY_EOS], seed=0)
    logits = torch.zeros(1, VOCAB)
    logits[0, 40] = 10.0  # "H": not allowed
    logits[0, 18] = 1.0  # "2"
    mask = BitmaskFiller(VOCAB, max_threads=1).fill([GrammarState(regex("[0-9]+"))])[0]
    out = sampler.sample(logits, [SamplingRow(SamplingParams(temperature=0), [1], [], token_bitmask=mask)])
    assert out.token_ids == [18]


# -- engine ----------------------------------------------------------------------------------------------------------
def test_matchers_survive_preemption_and_chunked_prefill_beside_free_requests():
    model = tiny_model()
    # 24 blocks of 16 tokens for 10 sequences of up to ~110 tokens: forces preemption by recompute
    engine = tiny_engine(model, kv_cache_memory=24 * 16 * TINY.kv_bytes_per_token(torch.float32),
                         max_num_batched_tokens=40, max_num_seqs=10)
    pattern = "[a-c]{30}x(yz)?"
    constrained = SamplingParams(max_tokens=40, temperature=1.0, seed=7, constraint=regex(pattern))
    free = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    prompts = {f"c{i}": [3 + i] * (20 + 7 * i) for i in range(6)} | {f"f{i}": [90 - i] * (25 + 9 * i) for i in range(4)}
    out = run(engine, {rid: (p, constrained if rid.startswith("c") else free) for rid, p in prompts.items()})
    assert engine.num_preemptions > 0, "the tiny KV budget should have forced preemption"
    for rid, [(tokens, reason)] in out.items():
        if rid.startswith("c"):
            assert reason is FinishReason.STOP and tokens[-1] == TINY_EOS
            assert re.fullmatch(pattern, text(tokens[:-1])), text(tokens[:-1])
        else:
            assert tokens == reference_greedy(model, prompts[rid], 30), "a free row changed beside constrained ones"
    assert engine.pool.num_free == engine.pool.num_blocks


def test_n_completions_get_one_matcher_each():
    engine = tiny_engine()
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=3, n=4, constraint=regex("(cat|dog|bird)s?"))
    engine.add_request("r", [5, 6, 7], params)
    states = [seq.grammar for seq in engine.requests["r"]]
    assert len({id(s) for s in states}) == 4
    engine.abort_request("r")
    [completions] = run(engine, {"r2": ([5, 6, 7], params)}).values()
    for tokens, reason in completions:
        assert reason is FinishReason.STOP and re.fullmatch("(cat|dog|bird)s?", text(tokens[:-1]))


def test_max_tokens_before_the_grammar_completes_is_length():
    engine = tiny_engine()
    [[(tokens, reason)]] = run(engine, {"r": ([1, 2], SamplingParams(max_tokens=6, constraint=regex("[a-c]{20}")))}
                               ).values()
    assert reason is FinishReason.LENGTH and len(tokens) == 6 and re.fullmatch("[a-c]{6}", text(tokens))


def test_a_terminated_grammar_stops_even_with_ignore_eos():
    engine = tiny_engine()
    params = SamplingParams(max_tokens=20, ignore_eos=True, constraint=regex("ok"))
    [[(tokens, reason)]] = run(engine, {"r": ([1, 2], params)}).values()
    assert reason is FinishReason.STOP and text(tokens[:-1]) == "ok" and tokens[-1] == TINY_EOS


def test_constraints_that_cannot_run_are_rejected():
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(min_tokens=2, constraint=regex("a+"))
    wrong = Constraint(Regex("a"), regex("a").grammar, VOCAB + 32)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        tiny_engine().check_request([1, 2], SamplingParams(constraint=wrong))
