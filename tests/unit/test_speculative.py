"""Speculative decoding on a tiny random Llama: the n-gram proposer, the adaptive policy, and verification in the
engine (greedy output unchanged, sampled output distributed as the target's, KV rolled back and blocks intact).
The real default model: tests/integration/test_speculative.py."""
from __future__ import annotations

import itertools
import random

import pytest
import torch
from scipy.stats import chisquare

from freehold.config import EngineConfig, KVDtype, SpeculativeMode
from freehold.engine.speculation import Speculator
from freehold.errors import InvalidRequestError
from freehold.spec.ngram import NgramIndex
from freehold.spec.policy import PROBE_INTERVAL, SpecState, StepCosts
from freehold.types import SamplingParams
from tests.conftest import TINY, tiny_engine, tiny_model

NGRAM = dict(speculative=SpeculativeMode.NGRAM, num_speculative_tokens=4)


def propose(tokens: list[int], k: int, index: NgramIndex | None = None) -> list[int]:
    index = index or NgramIndex()
    return index.propose(lambda a, b: tokens[a:b], len(tokens), k)


# -- proposer and policy -----------------------------------------------------------------------------------------
def test_ngram_proposes_what_followed_the_last_occurrence_of_the_longest_suffix():
    assert propose([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]
    assert propose([7, 2, 3, 8, 1, 2, 3, 4, 6, 2, 3], 2) == [4, 6]  # the most recent occurrence
    assert propose([5, 1, 2, 3, 9, 0, 2, 3, 7, 1, 2, 3], 1) == [9]  # "1 2 3" beats the later "2 3"
    assert propose([1, 2, 3, 4], 3) == [] and propose([1, 2, 1, 2], 5) == [1, 2]  # no match; the run so far
    assert propose([1, 2, 3, 1, 2], 0) == []


def test_ngram_index_grows_with_the_sequence():
    index, tokens = NgramIndex(), [4, 5, 6, 4]
    assert propose(tokens, 2, index) == []
    tokens += [5]
    assert propose(tokens, 2, index) == [6, 4]  # indexed incrementally: the same as a fresh index
    assert propose(tokens, 2) == [6, 4]


def test_policy_follows_acceptance_and_probes_when_off():
    state = SpecState()
    assert state.draft_length(0.01, 8) == 6  # prior 0.5: 0.5^6 > 0.01 > 0.5^7
    for _ in range(10):
        state.record(4, 4)
    assert state.acceptance > 0.9 and state.draft_length(0.01, 8) == 8
    for _ in range(20):
        state.record(4, 0)
    assert state.acceptance < 0.05
    lengths = [state.draft_length(0.5, 8) for _ in range(2 * PROBE_INTERVAL)]
    assert lengths.count(1) == 2 and set(lengths) == {0, 1}  # off, with a probe every PROBE_INTERVAL steps


def test_step_costs_switch_speculation_off_when_rows_cost_what_they_bring():
    memory_bound, compute_bound = StepCosts(), StepCosts()
    for t in range(1, 80):
        memory_bound.record(t, 0.020 + 0.00002 * t)  # a row costs 0.1% of a step
        compute_bound.record(t, 0.001 + 0.001 * t)  # a row costs as much as the fixed part
    assert memory_bound.threshold(1, 1) < 0.01
    assert compute_bound.threshold(64, 64) > 0.9  # even a 90% draft is not worth its row


# -- the engine ----------------------------------------------------------------------------------------------------
REPETITIVE = [[1, 2, 3, 4, 5] * 4, [9, 8, 7] * 5 + [9], [11, 12, 13, 14, 11, 12], [3, 4, 3, 4, 3, 4, 3],
              [20, 21, 22, 20, 21, 22, 23, 20, 21]]
OTHERS = [[30, 31, 32], [40, 50, 60, 70, 80, 90], [100, 101]]


class Oracle(Speculator):
    """Drafts read from known answers (request id -> tokens), each draft replaced by another token with probability
    `noise`: verification is then tested at any acceptance rate, independent of the policy and the proposer."""

    def __init__(self, engine, answers: dict[str, list[int]], noise: float, k: int = 4, seed: int = 0):
        super().__init__(engine.config, engine.max_model_len)
        self.answers, self.noise, self.k, self.rng = answers, noise, k, random.Random(seed)
        engine.speculator = self

    def propose(self, running):
        for seq in running:
            seq.draft_token_ids = []
            if seq.num_uncomputed != 1 or seq.grammar is not None:
                continue
            seq.spec = seq.spec or SpecState()
            room = min(self.k, seq.params.max_tokens - len(seq.output_token_ids) - 1,
                       self.max_model_len - seq.num_tokens - 1)
            truth = self.answers[seq.request_id][len(seq.output_token_ids):][:max(room, 0)]
            seq.draft_token_ids = [t if self.rng.random() >= self.noise else (t + 1) % TINY.vocab_size
                                   for t in truth]


def run(engine, prompts, params, check=True) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params[i] if isinstance(params, list) else params)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
        if check:
            engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks
    return out


def test_greedy_output_is_unchanged_at_any_acceptance_rate():
    model = tiny_model()
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = REPETITIVE + OTHERS
    plain = run(tiny_engine(model), prompts, params)
    for noise in (0.0, 0.2, 0.6, 1.0):
        engine = tiny_engine(model, **NGRAM)
        Oracle(engine, plain, noise)
        assert run(engine, prompts, params) == plain, noise
        stats = engine.stats()
        assert stats.num_verifications > 0
        if noise == 0.0:
            assert stats.num_accepted_tokens == stats.num_draft_tokens  # every draft right: all kept
        if noise == 1.0:
            assert stats.num_accepted_tokens == 0  # every draft wrong: plain decoding, one token per step


def test_greedy_output_is_unchanged_with_the_ngram_proposer_alone_and_in_a_batch():
    model = tiny_model()
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = REPETITIVE + OTHERS
    plain = run(tiny_engine(model), prompts, params)
    engine = tiny_engine(model, **NGRAM)
    assert run(engine, prompts, params) == plain
    assert engine.stats().num_draft_tokens > 0
    for i, p in enumerate(prompts[:3]):
        assert run(tiny_engine(model, **NGRAM), [p], params)["0"] == plain[str(i)]


def test_greedy_output_is_unchanged_under_preemption_with_many_rejections():
    model = tiny_model(1)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = REPETITIVE * 2
    small = dict(kv_cache_memory=14 * 16 * TINY.kv_bytes_per_token(torch.float32), max_num_batched_tokens=64)
    plain = run(tiny_engine(model, **small), prompts, params)
    engine = tiny_engine(model, **small, **NGRAM)
    Oracle(engine, plain, noise=0.5)
    assert run(engine, prompts, params) == plain  # check_integrity after every step
    assert engine.num_preemptions > 0
    stats = engine.stats()
    assert stats.num_draft_tokens - stats.num_accepted_tokens > 20  # many rejected drafts rolled back
    assert stats.num_accepted_tokens > 20


def test_penalties_logit_bias_min_tokens_and_stop_tokens_apply_at_every_verified_position():
    model = tiny_model(2)
    params = [SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.3),
              SamplingParams(max_tokens=20, temperature=0.0, frequency_penalty=0.8, presence_penalty=0.3),
              SamplingParams(max_tokens=20, temperature=0.0, logit_bias={2: 3.0, 5: -2.0}),
              SamplingParams(max_tokens=20, temperature=0.0, min_tokens=5, stop_token_ids=(3, 4)),
              SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)]
    plain = run(tiny_engine(model), REPETITIVE, params)
    engine = tiny_engine(model, **NGRAM)
    Oracle(engine, plain, noise=0.3)
    assert run(engine, REPETITIVE, params) == plain
    assert engine.stats().num_accepted_tokens > 10


def test_sampled_tokens_follow_the_target_distribution():
    """Tokens 2 and 3 (the ones verified against drafts) given token 1, with top-k 3 at temperature 1: the counts of
    all 27 outcomes against the exact joint distribution computed from full forward passes."""
    model = tiny_model(5)
    prompt = [1, 2, 3, 4] * 3 + [1, 2, 3]
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=3, ignore_eos=True)
    greedy = run(tiny_engine(model), [prompt], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))["0"]
    # a 512-token budget admits ~34 of these 15-token prompts per step; the default (2048) would admit 64 into 64 KV
    # blocks, whose growth then preempts (dropping drafts) more often than it verifies
    engine = tiny_engine(model, max_num_batched_tokens=512, **NGRAM)
    num = 3000
    Oracle(engine, {str(i): greedy for i in range(num)}, noise=0.0)  # draft the greedy path
    outs = run(engine, [prompt] * num, params, check=False)
    stats = engine.stats()
    assert stats.num_verifications > num // 2 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    counts: dict[tuple[int, ...], int] = {}
    for tokens in outs.values():
        counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
    expected = exact_top_k_joint(model, prompt, 3, 3)
    assert set(counts) <= set(expected)
    keys = sorted(expected)
    observed = [counts.get(k, 0) for k in keys]
    total = sum(expected.values())  # 1 up to float rounding, which chisquare checks to 1e-8
    assert chisquare(observed, [expected[k] / total * num for k in keys]).pvalue > 1e-3


def exact_top_k_joint(model, prompt: list[int], top_k: int, length: int) -> dict[tuple[int, ...], float]:
    def next_probs(ids):
        with torch.inference_mode():
            logits = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)))[-1:])[0].float()
        values, tokens = logits.topk(top_k)
        return dict(zip(tokens.tolist(), values.softmax(-1).tolist()))

    joint = {(): 1.0}
    for _ in range(length):
        joint = {seq + (t,): p * q for seq, p in joint.items() for t, q in next_probs(prompt + list(seq)).items()}
    return joint


def test_seeded_requests_are_reproducible_with_speculation():
    model = tiny_model(6)
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=1234, ignore_eos=True)
    outputs = []
    for _ in range(2):
        engine = tiny_engine(model, **NGRAM)
        Oracle(engine, {"0": [1] * 16, "1": [2] * 16}, noise=0.0)
        outputs.append(run(engine, REPETITIVE[:2], params))
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("options, words", [
    (dict(num_speculative_tokens=0), "num_speculative_tokens must be in [1, 16]"),
    (dict(num_speculative_tokens=17), "num_speculative_tokens must be in [1, 16]"),
    (dict(speculative="sometimes"), "speculative must be one of off, ngram"),
])
def test_bad_speculative_settings_are_clear_errors(options, words):
    with pytest.raises(InvalidRequestError) as err:
        EngineConfig(**options)
    assert words in str(err.value)


def test_drafts_stop_at_max_tokens_and_the_context():
    model = tiny_model()
    engine = tiny_engine(model, max_model_len=26, **NGRAM)
    Oracle(engine, {"0": list(range(100))}, noise=0.0, k=16)
    out = run(engine, [REPETITIVE[0]], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    assert len(out["0"]) == 6  # 20 prompt tokens + 6 = the context of 26
    plain = run(tiny_engine(model), [REPETITIVE[0]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert run(tiny_engine(model, **NGRAM), [REPETITIVE[0]],
               SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)) == plain
    assert len(plain["0"]) == 5


def test_every_combination_of_draft_budget_is_exact():
    model = tiny_model(3)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    plain = run(tiny_engine(model), REPETITIVE, params)
    for k, budget in itertools.product((1, 3, 16), (8, 512)):
        engine = tiny_engine(model, speculative=SpeculativeMode.NGRAM, num_speculative_tokens=k,
                             max_num_batched_tokens=budget)
        Oracle(engine, plain, noise=0.25, k=k)
        assert run(engine, REPETITIVE, params) == plain, (k, budget)


def test_metrics_report_acceptance_rate_and_mean_accepted_length():
    from freehold.server.metrics import ServerMetrics
    model = tiny_model()
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = run(tiny_engine(model), REPETITIVE, params)
    engine = tiny_engine(model, **NGRAM)
    Oracle(engine, plain, noise=0.3)
    run(engine, REPETITIVE, params)
    s = engine.stats()
    text = ServerMetrics(engine.stats, lambda: 0).render().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("freehold_spec")}
    assert values["freehold_spec_decode_num_draft_tokens_total"] == s.num_draft_tokens > 0
    assert values["freehold_spec_decode_acceptance_rate"] == pytest.approx(s.num_accepted_tokens / s.num_draft_tokens)
    assert values["freehold_spec_decode_mean_accepted_length"] == pytest.approx(
        s.num_accepted_tokens / s.num_verifications)


# -- a draft model -------------------------------------------------------------------------------------------------
def draft_engine(model, draft, draft_cfg=TINY, **options):
    from freehold.engine.engine import Engine
    options.setdefault("kv_cache_memory", 64 * TINY.kv_bytes_per_token(torch.float32) * 16)
    options.setdefault("kv_dtype", KVDtype.FP32)  # as tiny_engine's, which the outputs are compared with
    config = EngineConfig(speculative=SpeculativeMode.DRAFT, **options)
    return Engine(model, TINY, [255], config, draft=(draft, draft_cfg, 0.3))


@pytest.mark.parametrize("draft_seed, all_accepted", [(0, True), (7, False)])
def test_a_draft_model_leaves_greedy_output_unchanged(draft_seed, all_accepted):
    model = tiny_model()
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = REPETITIVE + OTHERS
    plain = run(tiny_engine(model), prompts, params)
    engine = draft_engine(model, tiny_model(draft_seed))  # seed 0: the target itself; 7: another model
    assert run(engine, prompts, params) == plain
    s = engine.stats()
    assert s.num_draft_tokens > 0
    assert (s.num_accepted_tokens == s.num_draft_tokens) is all_accepted
    assert engine.speculator.draft.pool.num_free == engine.speculator.draft.pool.num_blocks  # mirrors freed


def test_a_draft_model_under_preemption_keeps_output_and_blocks_intact():
    model = tiny_model(1)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    small = dict(kv_cache_memory=14 * 16 * TINY.kv_bytes_per_token(torch.float32), max_num_batched_tokens=64)
    plain = run(tiny_engine(model, **small), REPETITIVE * 2, params)
    engine = draft_engine(model, tiny_model(1), **small)
    assert run(engine, REPETITIVE * 2, params) == plain
    assert engine.num_preemptions > 0 and engine.stats().num_accepted_tokens > 0


def test_a_draft_model_with_another_vocabulary_is_refused_naming_both_sizes():
    import dataclasses
    other = dataclasses.replace(TINY, vocab_size=300)
    with pytest.raises(InvalidRequestError, match="draft model's vocabulary has 300 tokens but the target's has 256"):
        draft_engine(tiny_model(), tiny_model(cfg=other), other)


def test_draft_mode_without_a_draft_model_is_a_clear_error():
    with pytest.raises(InvalidRequestError, match="needs a draft model"):
        tiny_engine(tiny_model(), speculative=SpeculativeMode.DRAFT)


def test_draft_depth_follows_costs_and_acceptance():
    from freehold.spec.policy import draft_depth
    verify, cheap, dear = StepCosts(), StepCosts(0.1), StepCosts(1.0)
    assert draft_depth(0.9, 1, 1, verify, cheap, 8) >= 4  # a cheap, accurate draft: deep
    assert draft_depth(0.2, 1, 1, verify, cheap, 8) <= 1
    assert draft_depth(0.9, 1, 1, verify, dear, 8) == 0  # a draft step as costly as the target's: never worth it


def test_step_costs_count_as_measured_only_with_sizes_far_enough_apart():
    costs = StepCosts()
    for _ in range(10):
        costs.record(64, 0.3)
        costs.record(65, 0.3)
    assert not costs.measured  # a one-row probe in a step of 64 rows: no slope to trust
    for _ in range(10):
        costs.record(1, 0.02)
        costs.record(2, 0.021)
    assert costs.measured
    for _ in range(200):  # the spread of older steps decays away
        costs.record(64, 0.3)
        costs.record(65, 0.3)
    assert not costs.measured


# -- per request, and the budget claims ----------------------------------------------------------------------------
def test_a_request_may_lower_its_draft_length_or_turn_speculation_off(monkeypatch):
    from freehold.engine import speculation
    model = tiny_model()
    base = dict(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompt = REPETITIVE[0]
    truth = run(tiny_engine(model), [prompt], SamplingParams(**base))["0"]

    class Truth:  # the engine's own policy and limits, with proposals that are always right
        def propose(self, token_ids, length, k):
            done = length - len(prompt)
            return truth[done:done + k]

    monkeypatch.setattr(speculation, "SpecState", lambda: SpecState(index=Truth()))
    engine = tiny_engine(model, **NGRAM)  # the engine drafts up to 4
    drafts: dict[str, list[int]] = {}
    record = engine.speculator.record_verification

    def recording(seq, num_drafts, num_accepted):
        if num_drafts:
            drafts.setdefault(seq.request_id, []).append(num_drafts)
        record(seq, num_drafts, num_accepted)

    engine.speculator.record_verification = recording
    params = [SamplingParams(**base, num_speculative_tokens=0), SamplingParams(**base, num_speculative_tokens=2),
              SamplingParams(**base)]
    assert run(engine, [prompt] * 3, params) == {str(i): truth for i in range(3)}
    assert "0" not in drafts  # off for this request
    assert max(drafts["1"]) == 2 and max(drafts["2"]) == 4  # its own limit; the engine's


def test_per_request_speculation_the_engine_cannot_give_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(InvalidRequestError, match="runs without .*--speculative ngram or draft"):
        tiny_engine(model).add_request("a", [1, 2, 3], SamplingParams(num_speculative_tokens=2))
    tiny_engine(model).add_request("b", [1, 2, 3], SamplingParams(num_speculative_tokens=0))  # off is always fine
    with pytest.raises(InvalidRequestError, match=r"num_speculative_tokens must be in \[0, 4\].*got 5"):
        tiny_engine(model, **NGRAM).add_request("c", [1, 2, 3], SamplingParams(num_speculative_tokens=5))
    with pytest.raises(InvalidRequestError, match="num_speculative_tokens must be >= 0"):
        SamplingParams(num_speculative_tokens=-1)


def test_drafts_never_preempt_and_take_only_free_blocks():
    model = tiny_model()
    engine = tiny_engine(model, **NGRAM)
    prompts = [p for p in REPETITIVE + OTHERS if len(p) % engine.pool.block_size]  # next token: in the last block
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    engine.step()  # prefill: all running, each with a partly filled last block
    hog = engine.pool.allocate(engine.pool.num_free)  # no free block left
    running = list(engine.scheduler.running)
    for seq in running:
        seq.draft_token_ids = list(range(1, 17))  # 16 drafts: more than the last block's free slots
    out = engine.scheduler.schedule()
    assert out.preempted == () and list(engine.scheduler.running) == running
    size = engine.pool.block_size
    for chunk in out.chunks:
        seq = chunk.seq
        assert chunk.num_drafts == len(seq.draft_token_ids) == (-seq.num_tokens) % size  # what the last block holds
    engine.pool.free(hog)


def test_the_draft_model_catches_up_a_bounded_number_of_tokens_per_step(monkeypatch):
    from freehold.engine import draft as draft_module
    from freehold.engine.sequence import Sequence
    dm = draft_engine(tiny_model(), tiny_model(1)).speculator.draft
    seqs = [Sequence(str(i), 0, list(range(1, n + 1)), SamplingParams(max_tokens=4), arrival=i)
            for i, n in enumerate((300, 200, 100, 50))]
    monkeypatch.setattr(draft_module, "CATCH_UP_TOKENS", 400)
    assert [s.request_id for s in dm.within_catch_up_budget(seqs)] == ["3", "2", "1"]  # 350 <= 400, least behind first
    assert dm.within_catch_up_budget(seqs[:1]) == seqs[:1]  # one sequence past the budget alone still catches up


def test_a_draft_model_probe_goes_to_the_sequence_it_is_least_behind():
    """At batch sizes where the cost model keeps drafting off, a probe every PROBE_INTERVAL steps drafts one token for
    one sequence: the one the draft model needs the fewest catch-up tokens for (a sequence it has not seen costs it
    its whole prompt), not simply the first running one."""
    from freehold.engine.sequence import Sequence
    speculator = draft_engine(tiny_model(), tiny_model(1)).speculator
    seqs = [Sequence(str(i), 0, list(range(1, n + 1)), SamplingParams(max_tokens=4), arrival=i)
            for i, n in enumerate((300, 40, 200))]
    for seq in seqs:
        seq.spec = SpecState()
    speculator.steps_off = PROBE_INTERVAL - 1
    speculator._propose_from_draft_model(seqs, len(seqs))
    assert [len(s.draft_token_ids) for s in seqs] == [0, 1, 0]
    assert speculator.draft.lag(seqs[1]) == 1 and speculator.draft.lag(seqs[0]) == 300  # only the probed one caught up
    short = Sequence("3", 0, list(range(1, 11)), SamplingParams(max_tokens=4), arrival=3)  # new, 10 tokens
    short.spec = SpecState()
    seqs.insert(0, short)
    speculator.steps_off = PROBE_INTERVAL - 1  # the next probe: still the one it follows (1 token behind)
    speculator._propose_from_draft_model(seqs, len(seqs))
    assert [len(s.draft_token_ids) for s in seqs] == [0, 0, 1, 0]
