"""Speculative decoding on the real default model (default weights): greedy output token for token identical to
plain decoding over 20+ prompts, alone and in a mixed batch where some rows speculate, some do not and some are
constrained by a grammar; the KV cache intact after every step; the CLI flag."""
from __future__ import annotations


import pytest

from freehold.config import SpeculativeMode
from freehold.types import SamplingParams

EXTRACTIVE = ["assert", "break", "continue", "lambda", "pass", "del", "global", "return", "yield", "nonlocal"]
OPEN = ["Tell me about the moon.", "Write a poem about rain.", "What is a good breakfast?", "How do magnets work?",
        "Describe a busy market.", "Why do cats purr?", "Give three tips for studying.", "What is Python?",
        "Explain photosynthesis simply.", "Plan a day trip to the sea."]


@pytest.fixture(scope="module")
def spec_llm(auto_llm):
    """What LLM(kv_cache_memory=512 << 20, speculative=NGRAM) builds, on the session's load of the default weights
    (tests/conftest.py) instead of a second load: its own engine (the model is only read)."""
    import copy

    from freehold.config import EngineConfig
    from freehold.engine.engine import Engine
    llm = copy.copy(auto_llm)
    llm.engine = Engine(auto_llm.loaded.model, auto_llm.loaded.config, auto_llm.tokenizer.eos_token_ids,
                        EngineConfig(kv_cache_memory=512 << 20, speculative=SpeculativeMode.NGRAM))
    return llm


def prompts(llm) -> list[list[int]]:
    from pydoc_data.topics import topics
    extractive = [llm.chat_prompt([{"role": "user", "content": "Repeat this text exactly:\n\n"
                                    + topics[t].strip()[:700]}]) for t in EXTRACTIVE]
    return extractive + [llm.chat_prompt([{"role": "user", "content": q}]) for q in OPEN]


def run(engine, requests: list[tuple[list[int], SamplingParams]], speculate: bool) -> list[list[int]]:
    engine.speculator.enabled = speculate
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(str(i), prompt, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.error is None, o.error
            out[o.request_id] += o.outputs[0].token_ids
        engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks  # every block released (cached ones count as free)
    return [out[str(i)] for i in range(len(requests))]


def test_greedy_output_is_identical_alone_and_in_a_mixed_batch(spec_llm):
    from freehold.constrain.compiler import ConstraintCompiler
    from freehold.constrain.spec import JsonSchema
    engine = spec_llm.engine
    greedy = SamplingParams(max_tokens=48, temperature=0.0)
    compiler = ConstraintCompiler(spec_llm.tokenizer, spec_llm.loaded.config.vocab_size)
    schema = JsonSchema.from_value({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                         "required": ["name", "age"]})
    constrained = SamplingParams(max_tokens=48, temperature=0.0, constraint=compiler.compile(schema))
    requests = [(p, greedy) for p in prompts(spec_llm)]
    requests += [(spec_llm.chat_prompt([{"role": "user", "content": "A person as JSON: Ada, 36."}]), constrained)] * 2
    # the prompts' blocks cached first, so that both runs below read the same prefix KV: prompts sharing a prefix
    # (the chat template's) that start in one step each compute it, on their own matmul path (the rows of a prompt
    # of freehold.quant.compute.GEMM_MIN_PROMPT_TOKENS or more take the GEMM), and the cache keeps the copy
    # registered first (docs/performance.md, issue 19)
    run(engine, [(p, SamplingParams(max_tokens=1, temperature=0.0)) for p, _ in requests], speculate=False)
    before = engine.stats()
    plain = run(engine, requests, speculate=False)
    speculated = run(engine, requests, speculate=True)
    after = engine.stats()
    for i, (a, b) in enumerate(zip(plain, speculated)):
        assert a == b, f"request {i} differs"
    drafts, accepted = (after.num_draft_tokens - before.num_draft_tokens,
                        after.num_accepted_tokens - before.num_accepted_tokens)
    # speculation ran, with acceptances and rejections (at batch 22 the policy keeps drafts short)
    assert accepted >= 10 and drafts > accepted
    before = engine.stats()
    for i in (0, 3, 12):  # alone (batch 1: long drafts), against the plain batch
        assert run(engine, [requests[i]], speculate=True)[0] == plain[i]
    assert engine.stats().num_accepted_tokens - before.num_accepted_tokens > 20


def test_cli_generate_with_speculation_prints_the_same_text(capsys):
    """The command in this process (each run loads the model as a user's run does)."""
    from freehold.cli import main
    prompt = "Repeat exactly: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog."
    texts = []
    for mode in ("off", "ngram"):
        code = main(["generate", prompt, "--chat", "--max-tokens", "40", "--speculative", mode])
        out, err = capsys.readouterr()
        assert code == 0, err
        texts.append(out)
    assert texts[0] == texts[1] and texts[0].strip()


def test_an_int4_self_draft_leaves_the_fp32_output_unchanged():
    """The default model's fp32 weights verify drafts from its own int4 weights (the quantized self-draft)."""
    from freehold.llm import LLM
    from freehold.quant.modes import WeightMode
    llm = LLM(progress=False, kv_cache_memory=256 << 20, weights=WeightMode.FP32, speculative="draft",
              num_speculative_tokens=6)
    engine = llm.engine
    requests = [(p, SamplingParams(max_tokens=40, temperature=0.0)) for p in prompts(llm)[::2]]
    plain = run(engine, requests, speculate=False)
    assert run(engine, requests, speculate=True) == plain
    assert run(engine, requests[:1], speculate=True)[0] == plain[0]  # alone
    s = engine.stats()
    assert s.num_accepted_tokens > 0.5 * s.num_draft_tokens > 0  # int4 agrees with fp32 on most greedy tokens
    assert engine.speculator.draft.pool.num_free == engine.speculator.draft.pool.num_blocks
