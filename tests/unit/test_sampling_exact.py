"""The sampler's fast paths against their plain definitions: two-level draw vs the flat inverse CDF, two-level
argmax vs torch's, sparse penalties vs the dense [B, V] rule, and whole sampler calls vs the reference
distribution for the same uniforms."""
import pytest
import torch

from freehold.sampling import Sampler, SamplingRow, make_generator, transform_probs
from freehold.sampling.chunked import argmax_rows, power_of_two_chunk
from freehold.sampling.draw import draw_inverse_cdf, draw_inverse_cdf_chunked, first_above
from freehold.types import SamplingParams


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- two-level draw ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [49152, 4096, 50, 32, 7])
def test_two_level_draw_equals_flat_inverse_cdf(vocab):
    batch = 64
    logits = torch.randn(batch, vocab, generator=gen(vocab)) * 4
    logits[::3, : vocab // 2] = float("-inf")  # zero weights, whole chunks of them on some rows
    logits[1::4, vocab // 3: 2 * vocab // 3] = float("-inf")
    weights = logits.softmax(dim=-1)
    for trial in range(20):
        u = torch.rand(batch, generator=gen(1000 + trial))
        assert torch.equal(draw_inverse_cdf_chunked(weights, u), draw_inverse_cdf(weights, u))


def test_two_level_draw_never_picks_a_zero_weight_token():
    vocab = 4096
    length = power_of_two_chunk(vocab)
    weights = torch.zeros(5, vocab)
    weights[0, 0] = 1.0  # one token
    weights[1, length - 2] = 1e-30  # a tiny weight near a chunk end, then a zero at the chunk's last token
    weights[1, 3 * length] = 1.0
    weights[2, ::length] = 1.0  # only first tokens of chunks
    weights[3, length - 1::length] = 1.0  # only last tokens of chunks
    weights[4] = torch.rand(vocab, generator=gen(0))
    weights[4, 5::7] = 0.0
    for u in (0.0, 0.5, 1.0 - 2 ** -24, 0.999999):
        tokens = draw_inverse_cdf_chunked(weights, torch.full((5,), u))
        assert bool((weights.gather(1, tokens.unsqueeze(1)) > 0).all()), (u, tokens)
    assert draw_inverse_cdf_chunked(weights[:1], torch.tensor([0.99])).item() == 0


def test_first_above_never_returns_a_zero_weight_past_the_running_sum():
    weights = torch.tensor([[0.0, 0.5, 0.25, 0.0], [0.25, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert first_above(weights, torch.tensor([[0.6], [0.1], [0.0]], dtype=torch.float64)).tolist() == [2, 0, 0]
    past = torch.tensor([[0.75], [0.25], [1.0]], dtype=torch.float64)  # at or past each row's total
    assert first_above(weights, past).tolist() == [2, 0, 1]


# -- two-level argmax ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [49152, 32000, 50, 32, 7])
def test_argmax_rows_equals_argmax_including_first_of_ties(vocab):
    x = torch.randn(8, vocab, generator=gen(vocab))
    x[0] = 1.0  # all tied: index 0
    x[1, vocab // 2], x[1, vocab - 1] = 100.0, 100.0  # tie across chunks: the first
    x[2] = float("-inf")
    x[2, vocab - 1] = 0.0
    x[3] = x[3].round()  # many ties
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


# -- sparse penalties ----------------------------------------------------------------------------------------

def dense_penalties(logits, prompts, outputs, rep, presence, frequency):
    """The dense rule on [B, V] count tables, written out: the definition the sparse stage must equal."""
    batch, vocab = logits.shape
    counts = torch.zeros(batch, vocab)
    seen = torch.zeros(batch, vocab, dtype=torch.bool)
    for b in range(batch):
        for t in outputs[b]:
            counts[b, t] += 1
        seen[b, list(prompts[b]) + list(outputs[b])] = True
    r = torch.tensor(rep).unsqueeze(1)
    out = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return (out - torch.tensor(frequency).unsqueeze(1) * counts
            - torch.tensor(presence).unsqueeze(1) * (counts > 0).float())


MIXED = [(1.3, 0.3, 0.7), (1.0, 0.7, 0.0), (0.8, 0.0, 0.0), (1.1, 0.1, 0.9), (1.0, 0.0, -0.3), (1.0, 0.0, 0.0)]
SHARED = [(1.3, 0.3, 0.7)] * 6  # one number per penalty: the scalar path


@pytest.mark.parametrize("settings", [MIXED, SHARED], ids=["per-row", "shared"])
def test_sparse_penalties_equal_the_dense_rule_bit_for_bit(settings):
    """Not dyadic: a different order or precision of the float ops would round differently."""
    vocab, batch = 1000, 6
    logits = torch.randn(batch, vocab, generator=gen(3)) * 5
    logits[0, :10] = float("-inf")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (50, 0, 30, 200, 5, 40)]
    outputs = [torch.randint(0, 40, (n,), generator=g).tolist() for n in (20, 30, 0, 60, 1, 25)]  # repeats
    outputs[5] = tuple(outputs[5])  # any Sequence[int]
    rows = [SamplingRow(SamplingParams(repetition_penalty=r, presence_penalty=p, frequency_penalty=f),
                        prompts[i], outputs[i]) for i, (r, p, f) in enumerate(settings)]
    out = Sampler(vocab, "cpu", seed=0).process_logits(logits, rows)
    # dense rule; rows without a penalty contribute no tokens (their parameters are neutral anyway)
    rep, presence, frequency = zip(*settings)
    expected = dense_penalties(logits, prompts, outputs, list(rep), list(presence), list(frequency))
    assert torch.equal(out, expected)
    assert not torch.equal(out[3], logits[3])
    assert torch.equal(logits[0, :10], torch.full((10,), float("-inf"))), "the input logits were modified"


# -- whole sampler vs the reference distribution, same uniforms ------------------------------------------------

@pytest.mark.parametrize("setting", [dict(temperature=1.0), dict(temperature=0.6),
                                     dict(temperature=1.4, min_p=0.05), dict(temperature=0.8, top_k=50),
                                     dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_p=0.99),
                                     dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05)], ids=str)
@pytest.mark.parametrize("max_candidates", [4096, 128], ids=["widen", "sort"])
def test_seeded_rows_draw_the_reference_token(setting, max_candidates):
    """Every path (two-level draw; top-K candidates, widened to max_candidates, or the full sort) picks the
    token of the flat inverse CDF over the vocabulary, in vocabulary order, of the reference distribution
    (transform_probs, by full sort) at the row's own uniform: the plain definition, alone or in any batch.
    The top-p rows here need 165-1054 candidates."""
    vocab, batch = 16384, 16
    logits = torch.randn(batch, vocab, generator=gen(11)) * 3
    params = SamplingParams(seed=0, **setting)
    seeds = list(range(100, 100 + batch))
    rows = [SamplingRow(params, (), (), make_generator(s)) for s in seeds]
    sampler = Sampler(vocab, "cpu", seed=0)
    sampler.max_candidates = max_candidates
    tokens = sampler.sample(logits, rows).token_ids
    for b, s in enumerate(seeds):
        u = torch.tensor([make_generator(s).uniform()])
        probs = transform_probs(logits[b], setting["temperature"], setting.get("top_k"), setting.get("top_p", 1.0),
                                setting.get("min_p", 0.0))
        assert tokens[b] == draw_inverse_cdf(probs.unsqueeze(0), u).item()


@pytest.mark.parametrize("setting", [dict(temperature=1.0, top_k=20), dict(temperature=0.8, top_p=0.9),
                                     dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05)], ids=str)
def test_filtered_rows_match_the_reference_distribution_on_a_large_vocabulary(setting):
    """Top-k / top-p rows on a 32k vocabulary: drawn tokens stay in
    the reference support and their frequencies match it (chi-square over the kept tokens)."""
    from scipy.stats import chisquare
    vocab, batch, calls = 32000, 1000, 8
    logits = torch.randn(vocab, generator=gen(5)) * 3.5  # top-p 0.9 at T=0.8 needs ~90 of the 256 candidates
    probs = transform_probs(logits, setting["temperature"], setting.get("top_k"), setting.get("top_p", 1.0),
                            setting.get("min_p", 0.0)).double()
    sampler = Sampler(vocab, "cpu", seed=1)
    rows = [SamplingRow(SamplingParams(**setting), (), ())] * batch
    observed = torch.zeros(vocab, dtype=torch.float64)
    for _ in range(calls):
        tokens = torch.tensor(sampler.sample(logits.expand(batch, vocab).contiguous(), rows).token_ids)
        observed += torch.bincount(tokens, minlength=vocab).double()
    assert observed[probs == 0].sum() == 0, "a filtered-out token was drawn"
    expected = probs * observed.sum()
    big, small = expected >= 5, (expected < 5) & (probs > 0)  # small bins are merged into one
    obs = torch.cat([observed[big], observed[small].sum().reshape(1)]) if small.any() else observed[big]
    exp = torch.cat([expected[big], expected[small].sum().reshape(1)]) if small.any() else expected[big]
    exp = exp * obs.sum() / exp.sum()
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


def test_overwrite_gives_the_same_tokens_and_only_then_writes_into_the_logits():
    """The engine lets the sampler overwrite its per-step logits: same tokens as with a copy."""
    from freehold.sampling.sampler import Sampler, SamplingRow
    from freehold.types import SamplingParams
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4)
    rows = [SamplingRow(params, [1, 2, 3, 7 * i], [4, 4, 5, i]) for i in range(4)]
    sampler = Sampler(300, "cpu", seed=0)
    kept = logits.clone()
    copied = sampler.sample(logits, rows)
    assert torch.equal(logits, kept)  # by default the caller's logits are left alone
    overwritten = sampler.sample(logits, rows, overwrite=True)
    assert overwritten.token_ids == copied.token_ids
    assert not torch.equal(logits, kept)  # the penalties were applied in place
    with_logprobs = [SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=1.3, logprobs=2), [1], [4])]
    one = kept[:1].clone()
    sampler.sample(one, with_logprobs, overwrite=True)
    assert torch.equal(one, kept[:1])  # logprobs read the raw logits: no overwrite then


def test_engine_overwrites_its_inference_logits_with_penalties():
    """The engine's logits are inference tensors: the in-place penalties must run (and match the copying path)."""
    from tests.conftest import tiny_engine
    params = SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5,
                            ignore_eos=True)
    outs = []
    for logprobs in (None, 1):  # with logprobs the sampler copies; without, it writes in place
        engine = tiny_engine()
        engine.add_request("a", [3, 3, 4, 5], SamplingParams(**{**vars(params), "logprobs": logprobs}))
        tokens = []
        while engine.has_unfinished():
            tokens += [t for o in engine.step() for t in o.outputs[0].token_ids]
        outs.append(tokens)
    assert len(outs[0]) == 6 and outs[0] == outs[1]
