"""Batched sampler behaviour: penalties by hand, seeds, greedy, logprobs, allowed masks, min_tokens."""
import pytest
import torch

from freehold.errors import InvalidRequestError
from freehold.sampling import Sampler, SamplingRow, make_generator, transform_probs
from freehold.sampling.penalties import per_key, token_keys
from freehold.types import SamplingParams

VOCAB = 32
EOS = 3


def row(params: SamplingParams, prompt=(), output=(), mask=None) -> SamplingRow:
    return SamplingRow(params, prompt, output, make_generator(params.seed), mask)


def random_logits(batch: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0


# -- penalties ---------------------------------------------------------------------------------------------

def test_penalties_match_hand_computed_logits():
    sampler = Sampler(5, "cpu", seed=0)
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias={0: -3.0, 3: -1.0, 4: 2.5})
    out = sampler.process_logits(logits, [row(params, prompt=[0, 1], output=[1, 2, 2])])
    # bias first: [-1, -1, 0.5, 2, 2.5]; repetition on seen {0, 1, 2}: -1*2, -1*2, 0.5/2 -> [-2, -2, 0.25, 2, 2.5];
    # presence/frequency on output counts {1: 1, 2: 2}: 1: -2 - 0.25 - 0.5; 2: 0.25 - 0.5 - 0.5
    assert torch.allclose(out, torch.tensor([[-2.0, -2.75, -0.75, 2.0, 2.5]]))
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])), "input logits were modified"


def test_presence_frequency_ignore_prompt_tokens_and_neutral_rows_are_untouched():
    sampler = Sampler(4, "cpu", seed=0)
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 2.0, 0.5]])
    rows = [row(SamplingParams(presence_penalty=1.0, frequency_penalty=1.0), prompt=[0, 0, 1], output=[2]),
            row(SamplingParams(), prompt=[0, 1], output=[1, 2])]
    out = sampler.process_logits(logits, rows)
    assert torch.allclose(out, torch.tensor([[1.0, 1.0, -1.0, 1.0], [1.0, -1.0, 2.0, 0.5]]))


def test_repetition_penalty_below_one_encourages_seen_tokens():
    sampler = Sampler(3, "cpu", seed=0)
    out = sampler.process_logits(torch.tensor([[2.0, -2.0, 1.0]]),
                                 [row(SamplingParams(repetition_penalty=0.5), prompt=[0], output=[1])])
    assert torch.allclose(out, torch.tensor([[4.0, -1.0, 1.0]]))


def test_sparse_token_keys_and_parameters():
    cpu = torch.device("cpu")
    keys = token_keys([[1, 1, 2], (), (0,)], 3, cpu)
    assert keys.tolist() == [1, 1, 2, 6]  # row * 3 + id, repeats kept
    assert token_keys([(), []], 3, cpu).numel() == 0
    assert per_key([0.5, 0.9, 0.5], [True, False, True], keys, 3) == 0.5  # one number when the rows agree
    assert per_key([0.5, 0.9, 0.7], [True, False, True], keys, 3).tolist() == pytest.approx([0.5, 0.5, 0.5, 0.7])


def test_penalties_change_the_greedy_choice():
    sampler = Sampler(4, "cpu", eos_token_ids=[], seed=0)
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0]])
    assert sampler.sample(logits, [row(SamplingParams(temperature=0.0))]).token_ids == [0]
    penalized = row(SamplingParams(temperature=0.0, frequency_penalty=1.0), output=[0])
    assert sampler.sample(logits, [penalized]).token_ids == [1]


# -- seeds -------------------------------------------------------------------------------------------------

def run_steps(rows_for_step, logits_for_step, steps: int, sampler: Sampler) -> list[list[int]]:
    return [sampler.sample(logits_for_step(s), rows_for_step(s)).token_ids for s in range(steps)]


@pytest.mark.parametrize("position", [0, 7, 15])
def test_seeded_row_is_identical_alone_and_in_a_batch(position):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    steps, batch = 8, 16
    logits = [random_logits(batch, seed=s) for s in range(steps)]
    alone_gen = make_generator(1234)
    alone = [Sampler(VOCAB, "cpu", seed=1).sample(logits[s][position:position + 1],
                                                  [SamplingRow(params, (), (), alone_gen)]).token_ids[0]
             for s in range(steps)]
    gens = {i: make_generator(1234 if i == position else 100 + i) for i in range(batch) if i % 3 == 0}
    gens[position] = make_generator(1234)
    sampler = Sampler(VOCAB, "cpu", seed=99)
    other = SamplingParams(temperature=0.8, top_k=7)
    in_batch = []
    for s in range(steps):
        rows = [SamplingRow(params if i == position else other, (), (), gens.get(i)) for i in range(batch)]
        in_batch.append(sampler.sample(logits[s], rows).token_ids[position])
    assert alone == in_batch


def test_different_seeds_give_different_tokens():
    logits = torch.zeros(1, VOCAB)  # uniform: two streams agreeing for 20 steps has probability 32**-20

    def stream(seed):
        gen = make_generator(seed)
        sampler = Sampler(VOCAB, "cpu", seed=0)
        return [sampler.sample(logits, [SamplingRow(SamplingParams(seed=seed), (), (), gen)]).token_ids[0]
                for _ in range(20)]

    assert stream(1) == stream(1)
    assert stream(1) != stream(2)


def test_make_generator_without_seed_is_none():
    assert make_generator(None) is None


@pytest.mark.parametrize("a, b", [(0, 2**32), (1, 2**40 + 1), (-1, 2**32 - 1), (2**63 - 1, -(2**63))])
def test_the_whole_64_bit_seed_counts(a, b):
    """torch's CPU generator keeps 32 bits of a seed; a request's stream must not (seeds 0 and 2**32 differ)."""
    def draws(seed: int, index: int = 0) -> list[float]:
        stream = make_generator(seed, index)
        return [stream.uniform() for _ in range(8)]

    assert draws(a) == draws(a)
    assert draws(a) != draws(b)
    assert draws(a, 1) != draws(a + 1, 0)  # completion 1 of seed a is not completion 0 of seed a + 1


@pytest.mark.parametrize("seed", [2**63, 2**64, -(2**63) - 1])
def test_seeds_beyond_64_bits_are_refused_not_wrapped(seed):
    with pytest.raises(InvalidRequestError, match="seed"):
        SamplingParams(seed=seed)


# -- greedy and logprobs -------------------------------------------------------------------------------------

def test_temperature_zero_is_argmax_and_tiny_temperature_matches():
    logits = random_logits(16, seed=3)
    sampler = Sampler(VOCAB, "cpu", seed=0)
    greedy = sampler.sample(logits, [row(SamplingParams(temperature=0.0))] * 16).token_ids
    assert greedy == logits.argmax(-1).tolist()
    for t in (1e-6, 1e-3):
        assert sampler.sample(logits, [row(SamplingParams(temperature=t))] * 16).token_ids == greedy
    mixed = [row(SamplingParams(temperature=0.0 if i % 2 else 1.0, top_k=3)) for i in range(16)]
    tokens = sampler.sample(logits, mixed).token_ids
    assert tokens[1::2] == greedy[1::2]


def test_logprobs_are_log_softmax_of_raw_logits():
    logits = random_logits(4, seed=5)
    params = [SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.5, logprobs=5, seed=1),
              SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.2, logprobs=20, logit_bias={0: 50.0})]
    out = Sampler(VOCAB, "cpu", seed=0).sample(logits, [row(p, prompt=[1, 2]) for p in params])
    expected = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp = out.logprobs[i]
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(expected[i, lp.token_id].item(), abs=1e-5)
        assert len(lp.top) == params[i].logprobs
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        ids = [t for t, _ in lp.top]
        assert ids == expected[i].argsort(descending=True)[:len(ids)].tolist()
        for tok, value in lp.top:
            assert value == pytest.approx(expected[i, tok].item(), abs=1e-5)
            if tok == lp.token_id:
                assert value == pytest.approx(lp.logprob, abs=1e-6)
    assert out.token_ids[3] == 0  # the bias steered the draw but not the reported logprob
    assert out.logprobs[3].logprob == pytest.approx(expected[3, 0].item(), abs=1e-5)


# -- allowed mask and min_tokens ---------------------------------------------------------------------------

def test_allowed_mask_is_never_violated():
    n = 2000
    logits = random_logits(1, seed=7).expand(n, VOCAB).contiguous()
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[[2, 9, 17, 30]] = True
    params = SamplingParams(temperature=1.5)
    tokens = Sampler(VOCAB, "cpu", seed=0).sample(logits, [row(params, mask=allowed)] * n).token_ids
    assert set(tokens) <= {2, 9, 17, 30}
    assert len(set(tokens)) > 1
    greedy = Sampler(VOCAB, "cpu", seed=0).sample(logits[:1], [row(SamplingParams(temperature=0.0), mask=allowed)])
    best_allowed = max((2, 9, 17, 30), key=lambda t: logits[0, t].item())
    assert greedy.token_ids == [best_allowed]


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 5], logits[0, 6] = 10.0, 9.0, 8.0
    sampler = Sampler(VOCAB, "cpu", eos_token_ids=[EOS], seed=0)
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(5,))
    for generated in range(3):
        assert sampler.sample(logits, [row(params, output=[0] * generated)]).token_ids == [6]
    assert sampler.sample(logits, [row(params, output=[0, 0, 0])]).token_ids == [EOS]
    sampled = SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=(5,))
    tokens = sampler.sample(logits.expand(500, VOCAB).contiguous(), [row(sampled, output=[1])] * 500).token_ids
    assert EOS not in tokens and 5 not in tokens
    ignore = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)
    assert sampler.sample(logits, [row(ignore)]).token_ids == [EOS]


def test_a_row_with_nothing_allowed_fails_alone():
    sampler = Sampler(4, "cpu", eos_token_ids=[1], seed=0)
    only_eos = torch.tensor([False, True, False, False])
    logits = torch.tensor([[0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rows = [row(SamplingParams(temperature=0)), row(SamplingParams(min_tokens=2), mask=only_eos)]
    out = sampler.sample(logits, rows)
    assert list(out.failed) == [1] and "exclude every token" in str(out.failed[1])
    assert "row" not in str(out.failed[1])  # no batch positions: the message goes to that request's client
    assert out.token_ids[0] == 2


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_row_with_non_finite_logits_fails_alone_and_the_others_draw_as_alone(poison):
    logits = random_logits(6, seed=3)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_p=0.9, seed=5),
              SamplingParams(temperature=1.0, seed=6)]
    alone = [Sampler(VOCAB, "cpu", seed=0).sample(logits[i:i + 1], [row(p)]).token_ids[0]
             for i, p in zip((0, 2, 4), params)]
    poisoned = logits.clone()
    poisoned[1, 3] = poison
    poisoned[3, :] = float("-inf")
    out = Sampler(VOCAB, "cpu", seed=0).sample(poisoned, [row(params[0]), row(SamplingParams()), row(params[1]),
                                                          row(SamplingParams(temperature=0)), row(params[2]),
                                                          row(SamplingParams(temperature=0))])
    assert sorted(out.failed) == [1, 3]
    assert "NaN or infinite" in str(out.failed[1]) and "exclude every token" in str(out.failed[3])
    assert [out.token_ids[i] for i in (0, 2, 4)] == alone


def test_check_params_rejects_out_of_vocab_ids():
    sampler = Sampler(10, "cpu", seed=0)
    sampler.check_params(SamplingParams(logit_bias={9: 1.0}, stop_token_ids=(0,)))
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        sampler.check_params(SamplingParams(logit_bias={10: 1.0}))
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        sampler.check_params(SamplingParams(stop_token_ids=(-1,)))


def test_candidate_filter_equals_full_sort_filter():
    """The top-K candidate filter gives the full-sort distribution (same support, same probabilities) on every
    covered row, and declines (not covered) when top-p might reach past the candidates."""
    from freehold.sampling.transforms import apply_temperature, apply_top_k_top_p, filter_candidates, min_p_weights
    gen = torch.Generator().manual_seed(0)
    V = 4096
    logits = torch.randn(7, V, generator=gen) * 3
    logits[4, 0] = 40.0  # row 4 (top-p off): the cumulative mass reaches 1.0 in float32 after one token
    temperature = torch.tensor([[1.0], [0.7], [1.3], [1.0], [0.5], [2.0], [1.0]])  # one column per parameter
    top_k = torch.tensor([[V], [5], [V], [40], [200], [12], [64]])  # V: off
    top_p = torch.tensor([[0.5], [1.0], [0.3], [0.9], [1.0], [0.6], [1.0]])  # 1: off
    min_p = torch.tensor([[0.0], [0.0], [0.1], [0.05], [0.0], [0.2], [0.0]])
    cand = filter_candidates(logits, temperature, top_k, top_p, min_p, 256)
    assert cand.covered is not None and cand.covered.all()
    reference = min_p_weights(apply_top_k_top_p(apply_temperature(logits, temperature), top_k, top_p).softmax(-1),
                              min_p)
    reference = reference / reference.sum(-1, keepdim=True)
    drawn = torch.zeros(7, V).scatter_(1, cand.token_ids, cand.weights / cand.weights.sum(-1, keepdim=True))
    assert torch.equal(drawn > 0, reference > 0)
    assert torch.allclose(drawn, reference, rtol=1e-5, atol=1e-7)
    assert int((drawn[1] > 0).sum()) == 5 and int((drawn[4] > 0).sum()) == 200
    uniform = filter_candidates(logits, 0.8, 30, 0.9, 0.05, 30)  # one number per parameter: the same filter
    reference = min_p_weights(apply_top_k_top_p(logits / 0.8, 30, 0.9).softmax(-1), 0.05)
    reference = reference / reference.sum(-1, keepdim=True)
    drawn = torch.zeros(7, V).scatter_(1, uniform.token_ids, uniform.weights / uniform.weights.sum(-1, keepdim=True))
    assert uniform.covered is None and torch.allclose(drawn, reference, rtol=1e-5, atol=1e-7)
    flat = torch.zeros(2, V)  # uniform: top-p 0.9 needs 3687 tokens, more than 256 candidates
    flat[1, :10] = 10.0  # ... unless the mass sits on a few tokens
    assert filter_candidates(flat, 1.0, None, 0.9, None, 256).covered.tolist() == [False, True]


def test_top_p_rows_beyond_the_candidates_fall_back_exactly():
    """A flat row needs more than CANDIDATES tokens for top-p: the sampler widens the candidates or sorts, and
    still draws only from the nucleus, matching the full-sort distribution."""
    V, n = 1024, 3000
    logits = torch.linspace(0.0, 1.0, V).expand(n, V).contiguous()
    params = SamplingParams(temperature=1.0, top_p=0.5)
    probs = transform_probs(logits[0], 1.0, top_p=0.5)  # a nucleus of ~440 tokens
    for max_candidates in (4096, 128):  # widen to max_candidates; or (too few) the full sort
        sampler = Sampler(V, "cpu", seed=0)
        sampler.max_candidates = max_candidates
        if max_candidates > V:  # the wider candidate set suffices: no full sort
            sampler._draw_sorted = None
        tokens = torch.tensor(sampler.sample(logits, [row(params)] * n).token_ids)
        assert bool((probs[tokens] > 0).all()), "a token outside the nucleus was drawn"
        assert len(set(tokens.tolist())) > 300  # more than the 256 first candidates: the tail was reached
