"""Prompt logprobs in the engine (SamplingParams.prompt_logprobs) on a tiny random Llama: equal to log_softmax of a
plain full forward at every position, the same under chunked prefill, prefix-cache hits and preemption, and the
same numbers the sampler reports when those tokens are generated; max_tokens 0 is prefill only."""
import pytest
import torch

from freehold.errors import InvalidRequestError
from freehold.types import FinishReason, SamplingParams
from tests.conftest import TINY, tiny_engine, tiny_model
from tests.unit.test_engine import prompts

K = 3


def reference(model, prompt):
    """log_softmax of a cache-free forward: row p scores token p + 1."""
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.tensor(prompt), torch.arange(len(prompt))))
    return torch.log_softmax(logits.float(), dim=-1)


def run(engine, requests):
    """requests: {id: (prompt, params)} -> id -> (prompt_logprobs, outputs' tokens, outputs' logprobs, reasons)."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    got = {rid: {"prompt": None, "tokens": {}, "logprobs": {}, "reasons": {}, "reports": 0} for rid in requests}
    while engine.has_unfinished():
        for out in engine.step():
            g = got[out.request_id]
            if out.prompt_logprobs is not None:
                g["prompt"], g["reports"] = out.prompt_logprobs, g["reports"] + 1
            for o in out.outputs:
                g["tokens"].setdefault(o.index, []).extend(o.token_ids)
                g["logprobs"].setdefault(o.index, []).extend(o.logprobs or [])
                if o.finish_reason is not None:
                    g["reasons"][o.index] = o.finish_reason
        engine.check_integrity()
    return got


def check_against_reference(model, prompt, values, k=K):
    ref = reference(model, prompt)
    assert len(values) == len(prompt) and values[0] is None
    for p in range(1, len(prompt)):
        v = values[p]
        assert v.token_id == prompt[p]
        assert v.logprob == pytest.approx(float(ref[p - 1, prompt[p]]), abs=1e-4), f"position {p}"
        assert v.rank == 1 + int((ref[p - 1] > ref[p - 1, prompt[p]]).sum())
        top_values, top_ids = ref[p - 1].topk(k)
        assert [t for t, _ in v.top] == top_ids.tolist()
        assert [lp for _, lp in v.top] == pytest.approx(top_values.tolist(), abs=1e-4)


def test_prompt_logprobs_equal_a_full_forward_and_max_tokens_0_is_prefill_only():
    model = tiny_model()
    ps = prompts(7, 4, lo=2, hi=90)
    engine = tiny_engine(model)
    params = SamplingParams(max_tokens=0, prompt_logprobs=K)
    got = run(engine, {str(i): (p, params) for i, p in enumerate(ps)})
    for i, p in enumerate(ps):
        g = got[str(i)]
        check_against_reference(model, p, g["prompt"])
        assert g["reports"] == 1
        assert g["tokens"] == {0: []} and g["reasons"] == {0: FinishReason.LENGTH}
    assert engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.parametrize("budget", [7, 16, 33])
def test_chunked_prefill_gives_the_same_values(budget):
    model = tiny_model()
    prompt = prompts(3, 1, lo=100, hi=100)[0]
    whole = run(tiny_engine(model), {"a": (prompt, SamplingParams(max_tokens=0, prompt_logprobs=K))})["a"]["prompt"]
    engine = tiny_engine(model, max_num_batched_tokens=budget)
    chunked = run(engine, {"a": (prompt, SamplingParams(max_tokens=0, prompt_logprobs=K))})["a"]["prompt"]
    for a, b in zip(whole[1:], chunked[1:]):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)  # fp32 sums differ by split
    check_against_reference(model, prompt, chunked)


def test_prefix_cache_hits_do_not_drop_prompt_logprobs():
    model = tiny_model()
    engine = tiny_engine(model)
    prompt = prompts(4, 1, lo=70, hi=70)[0]
    run(engine, {"warm": (prompt, SamplingParams(max_tokens=1, temperature=0.0))})  # caches the prompt's blocks
    got = run(engine, {"a": (prompt, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=K))})["a"]
    check_against_reference(model, prompt, got["prompt"])
    assert engine.requests == {}
    # without prompt logprobs the same prompt is served from the cache (the skip is only for these requests)
    before = engine.pool.num_hits
    run(engine, {"b": (prompt, SamplingParams(max_tokens=1, temperature=0.0))})
    assert engine.pool.num_hits > before


def test_preempted_prefill_keeps_its_values():
    model = tiny_model()
    ps = prompts(11, 8, lo=60, hi=110)
    engine = tiny_engine(model, kv_cache_memory=24 * 16 * TINY.kv_bytes_per_token(torch.float32),
                         max_num_batched_tokens=40, max_num_seqs=8)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, prompt_logprobs=K)
    got = run(engine, {str(i): (p, params) for i, p in enumerate(ps)})
    assert engine.num_preemptions > 0
    for i, p in enumerate(ps):
        check_against_reference(model, p, got[str(i)]["prompt"])
        assert got[str(i)]["reports"] == 1


def test_prompt_logprobs_equal_the_generated_logprobs_of_the_same_tokens():
    """Generate with logprobs, then score prompt + generated as a prompt: the same values."""
    model = tiny_model()
    engine = tiny_engine(model)
    prompt = prompts(5, 1, lo=20, hi=20)[0]
    gen = run(engine, {"g": (prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                     logprobs=K))})["g"]
    tokens, generated = gen["tokens"][0], gen["logprobs"][0]
    echo = run(engine, {"e": (prompt + tokens, SamplingParams(max_tokens=0, prompt_logprobs=K))})["e"]["prompt"]
    for g, e in zip(generated, echo[len(prompt):]):
        assert (g.token_id, g.rank, [t for t, _ in g.top]) == (e.token_id, e.rank, [t for t, _ in e.top])
        assert g.logprob == pytest.approx(e.logprob, abs=1e-4)


def test_n_completions_share_one_report_and_siblings_still_generate():
    model = tiny_model()
    engine = tiny_engine(model)
    prompt = prompts(6, 1, lo=40, hi=40)[0]
    got = run(engine, {"n": (prompt, SamplingParams(max_tokens=5, n=3, seed=1, ignore_eos=True,
                                                     prompt_logprobs=0))})["n"]
    assert got["reports"] == 1 and all(len(got["tokens"][i]) == 5 for i in range(3))
    check_against_reference(model, prompt, got["prompt"], k=0)


def test_max_tokens_0_needs_prompt_logprobs_and_k_is_bounded():
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(max_tokens=0)
    assert err.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(prompt_logprobs=21)
    assert err.value.param == "prompt_logprobs"


def test_llm_generate_returns_prompt_logprobs(default_llm):
    prompt = default_llm.encode_prompt("The capital of France is")
    gen = default_llm.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))[0]
    assert gen.completions[0].token_ids == [] and gen.completions[0].finish_reason is FinishReason.LENGTH
    check_against_reference(default_llm.loaded.model, prompt, gen.prompt_logprobs, k=2)
    assert default_llm.generate(prompt, SamplingParams(max_tokens=1))[0].prompt_logprobs is None
