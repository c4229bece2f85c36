"""Engine behaviour on a tiny random Llama: batch invariance, preemption, chunked prefill, block accounting,
prefix-cache exactness and staleness. The reference is a plain full recompute without any cache."""
import random

import pytest
import torch

from freehold.config import KVDtype
from freehold.errors import InvalidRequestError, PromptTooLongError
from freehold.kv.block_pool import block_key
from freehold.types import FinishReason, SamplingParams
from tests.conftest import TINY, TINY_EOS, tiny_engine, tiny_model

GREEDY = dict(temperature=0.0, ignore_eos=True)


def reference_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            h = model(torch.tensor(ids), torch.arange(len(ids)))
            ids.append(int(model.compute_logits(h[-1:]).argmax()))
    return ids[len(prompt):]


def run_to_end(engine, arrivals=None, check=False):
    """arrivals: {step: [(request_id, prompt, params)]}; returns request_id -> (tokens, finish_reason)."""
    arrivals, out, step = dict(arrivals or {}), {}, 0
    while engine.has_unfinished() or arrivals:
        for rid, prompt, params in arrivals.pop(step, []):
            engine.add_request(rid, prompt, params)
        for o in engine.step():
            toks, _ = out.get(o.request_id, ([], None))
            out[o.request_id] = (toks + o.outputs[0].token_ids, o.outputs[0].finish_reason)
        if check:
            engine.check_integrity()
        step += 1
    return out


def prompts(seed, count, lo=3, hi=120):
    rng = random.Random(seed)
    return [[rng.randrange(0, TINY_EOS) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


@pytest.fixture(params=["kernel", "sdpa"])
def prompt_attention(request, monkeypatch):
    """Prompt chunks through the native kernel (CPU, prompts under the threshold) or SDPA (longer prompts, CUDA)."""
    if request.param == "sdpa":
        from freehold.engine import runner
        monkeypatch.setattr(runner, "SDPA_MIN_ROWS_X_CONTEXT", 0)
    return request.param


def test_batch_invariance_with_preemption_and_chunked_prefill(prompt_attention):
    model = tiny_model()
    ps = prompts(1, 16)
    # 40 blocks of 16 tokens for 16 sequences of up to 150 tokens: forces preemption; 48-token budget chunks prompts
    engine = tiny_engine(model, kv_cache_memory=40 * 16 * TINY.kv_bytes_per_token(torch.float32),
                         max_num_batched_tokens=48, max_num_seqs=16)
    arrivals = {}
    for i, p in enumerate(ps):
        arrivals.setdefault(i // 3 * 2, []).append((str(i), p, SamplingParams(max_tokens=24, **GREEDY)))
    out = run_to_end(engine, arrivals, check=True)
    assert engine.num_preemptions > 0, "the tiny budget should have forced preemption"
    for i, p in enumerate(ps):
        assert out[str(i)][0] == reference_greedy(model, p, 24), f"request {i} differs from its solo run"
    assert engine.pool.num_free == engine.pool.num_blocks


def test_randomized_block_accounting_with_aborts():
    rng = random.Random(7)
    engine = tiny_engine(kv_cache_memory=24 * 16 * TINY.kv_bytes_per_token(torch.float32),
                         max_num_batched_tokens=64, max_num_seqs=8)
    live, next_id = [], 0
    for step in range(300):
        if rng.random() < 0.3:
            shared = [5] * rng.choice([0, 16, 20])  # overlapping prefixes exercise the cache
            prompt = shared + [rng.randrange(0, TINY_EOS) for _ in range(rng.randint(1, 60))]
            engine.add_request(str(next_id), prompt, SamplingParams(max_tokens=rng.randint(1, 30), **GREEDY))
            live.append(str(next_id))
            next_id += 1
        if live and rng.random() < 0.05:
            engine.abort_request(live.pop(rng.randrange(len(live))))
        for o in engine.step():
            if o.finished and o.request_id in live:
                live.remove(o.request_id)
        engine.check_integrity()
    for rid in list(live):
        engine.abort_request(rid)
    engine.check_integrity()
    assert not engine.has_unfinished() and engine.pool.num_free == engine.pool.num_blocks


def test_prefix_cache_is_exact_and_reports_cached_tokens(prompt_attention):
    model = tiny_model(3)
    system = prompts(2, 1, 37, 37)[0]  # ends mid-block
    turns = [system + [7, 8, 9], system + [7, 8, 9, 100, 101, 102, 103, 104], system + [50]]
    results = {}
    for caching in (True, False):
        engine = tiny_engine(model, enable_prefix_caching=caching)
        results[caching] = []
        for i, p in enumerate(turns):
            engine.add_request(str(i), p, SamplingParams(max_tokens=8, **GREEDY))
            gen = []
            while engine.has_unfinished():
                for o in engine.step():
                    gen += o.outputs[0].token_ids
                    cached = o.num_cached_tokens
            results[caching].append((gen, cached))
    assert [g for g, _ in results[True]] == [g for g, _ in results[False]]
    assert [c for _, c in results[True]] == [0, 32, 32]  # two full 16-token blocks of the 37-token prefix
    assert all(c == 0 for _, c in results[False])


def layer0_keys(model, tokens):
    with torch.inference_mode():
        x = model.model.embed_tokens(torch.tensor(tokens))
        attn = model.model.layers[0].self_attn
        k = attn.k_proj(model.model.layers[0].input_layernorm(x)).view(len(tokens), TINY.num_kv_heads, -1)
        return model.rope(k, torch.arange(len(tokens)))


def test_cached_blocks_never_hold_stale_kv(prompt_attention):
    model = tiny_model(4)
    engine = tiny_engine(model, kv_cache_memory=12 * 16 * TINY.kv_bytes_per_token(torch.float32),
                         max_num_batched_tokens=40)
    rng, prefixes = random.Random(5), {}
    bases = prompts(6, 3, 40, 40)
    for i in range(30):
        p = rng.choice(bases)[:rng.choice([16, 32, 40])] + [rng.randrange(0, 200) for _ in range(rng.randint(1, 20))]
        engine.add_request(str(i), p, SamplingParams(max_tokens=rng.randint(1, 10), **GREEDY))
        while engine.has_unfinished():
            engine.step()
            engine.check_integrity()
        full = p  # record the prompt prefixes behind each block key
        parent = None
        for b in range(len(full) // 16):
            parent = block_key(parent, full[b * 16:(b + 1) * 16])
            prefixes[parent.digest] = full[:(b + 1) * 16]
    checked = 0
    for block, key in enumerate(engine.pool.keys):
        if key is None or key.digest not in prefixes:
            continue
        expected = layer0_keys(model, prefixes[key.digest])[-16:]
        assert torch.allclose(engine.runner.cache.k[0, block], expected, atol=1e-5), f"block {block} is stale"
        checked += 1
    assert checked > 0


def test_too_long_prompts_are_rejected_with_the_limit():
    engine = tiny_engine(kv_cache_memory=4 * 16 * TINY.kv_bytes_per_token(torch.float32))  # 64 tokens of KV
    with pytest.raises(PromptTooLongError, match="KV cache budget") as exc:
        engine.add_request("a", [1] * 100, SamplingParams())
    assert exc.value.num_tokens == 100 and exc.value.limit == 64
    big = tiny_engine()
    with pytest.raises(PromptTooLongError, match="context"):
        big.add_request("b", [1] * 2000, SamplingParams())
    with pytest.raises(InvalidRequestError):
        big.add_request("c", [], SamplingParams())
    with pytest.raises(InvalidRequestError):
        big.add_request("d", [1, 9999], SamplingParams())


def test_abort_frees_blocks_and_stop_tokens_finish():
    engine = tiny_engine()
    engine.add_request("x", list(range(40)), SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    assert engine.pool.num_free < engine.pool.num_blocks
    engine.abort_request("x")
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks and not engine.has_unfinished()
    model = tiny_model()
    first = reference_greedy(model, [1, 2, 3], 1)[0]
    engine = tiny_engine(model)
    engine.add_request("y", [1, 2, 3], SamplingParams(max_tokens=5, temperature=0, stop_token_ids=(first,)))
    out = run_to_end(engine)
    assert out["y"] == ([first], FinishReason.STOP)


def test_seeded_request_same_alone_and_in_batch():
    model = tiny_model()
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=42)
    alone = tiny_engine(model)
    alone.add_request("s", [1, 2, 3], params)
    solo = run_to_end(alone)["s"][0]
    crowd = tiny_engine(model)
    for i, p in enumerate(prompts(9, 15)):
        crowd.add_request(str(i), p, SamplingParams(max_tokens=12, temperature=1.0))
    crowd.add_request("s", [1, 2, 3], params)
    assert run_to_end(crowd)["s"][0] == solo
    other = tiny_engine(model)
    other.add_request("s", [1, 2, 3], SamplingParams(max_tokens=12, temperature=1.0, seed=43))
    assert run_to_end(other)["s"][0] != solo


def test_n_completions_share_the_prompt_blocks():
    engine = tiny_engine()
    prompt = list(range(1, 70))  # 4 full blocks + 5 tokens
    engine.add_request("n", prompt, SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=11))
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            for c in o.outputs:
                outs.setdefault(c.index, []).extend(c.token_ids)
        engine.check_integrity()
    assert sorted(outs) == [0, 1, 2] and all(len(t) == 6 for t in outs.values())
    assert len({tuple(t) for t in outs.values()}) > 1  # different seeds per completion
    # the two siblings found the parent's 4 full prompt blocks in the cache
    assert engine.pool.num_hits == 2 * 64


def test_bfloat16_engine_runs_and_halves_kv_bytes():
    model = tiny_model().to(torch.bfloat16)
    engine = tiny_engine(model, dtype=torch.bfloat16, kv_dtype=KVDtype.AUTO)  # auto: the activation dtype
    assert engine.budget.bytes_per_token == TINY.kv_bytes_per_token(torch.float32) // 2
    assert engine.runner.cache.k.dtype == torch.bfloat16
    engine.add_request("b", [1, 2, 3, 4], SamplingParams(max_tokens=5, **GREEDY))
    out = run_to_end(engine, check=True)
    fp32 = reference_greedy(tiny_model(), [1, 2, 3, 4], 5)
    assert len(out["b"][0]) == 5 and out["b"][0][0] == fp32[0]  # peaked logits: bf16 agrees on the first token
