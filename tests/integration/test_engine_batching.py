"""Batch invariance on the real default model in its default configuration (int4 weights, bf16 KV cache): 16 prompts
generated together (mixed lengths on both matmul paths, staggered arrivals, a KV budget small enough to force
preemption, chunked prefill) equal each prompt generated alone. The same on a tiny fp32 model:
tests/unit/test_engine.py."""
from freehold.config import EngineConfig
from freehold.engine.engine import Engine
from freehold.types import SamplingParams

PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def run(engine, arrivals):
    out, step = {}, 0
    while engine.has_unfinished() or arrivals:
        for rid, prompt in arrivals.pop(step, []):
            engine.add_request(rid, prompt, PARAMS)
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
        engine.check_integrity()
        step += 1
    return out


def test_sixteen_prompts_together_equal_alone(auto_llm):
    from freehold.eval.ppl import default_text
    llm = auto_llm
    corpus = llm.tokenizer.encode(default_text()[:60000], add_special_tokens=False)
    prompts = [corpus[i * 700: i * 700 + 20 + 23 * i] for i in range(16)]  # 20..365 tokens
    cfg, model = llm.loaded.config, llm.loaded.model
    per_token = cfg.kv_bytes_per_token(EngineConfig().cache_dtype)  # the default KV cache (bf16 on CPU)
    engine = Engine(model, cfg, llm.tokenizer.eos_token_ids,
                    EngineConfig(kv_cache_memory=80 * 16 * per_token, max_num_batched_tokens=128, max_num_seqs=16))
    arrivals = {}
    for i, p in enumerate(prompts):
        arrivals.setdefault(i // 4 * 3, []).append((str(i), p))
    together = run(engine, arrivals)
    assert engine.num_preemptions > 0
    assert engine.pool.num_free == engine.pool.num_blocks
    for i, p in enumerate(prompts):
        alone = Engine(model, cfg, llm.tokenizer.eos_token_ids,
                       EngineConfig(kv_cache_memory=32 * 16 * per_token, enable_prefix_caching=False))
        assert run(alone, {0: [("x", p)]})["x"] == together[str(i)], f"prompt {i} differs"
