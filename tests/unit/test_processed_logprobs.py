"""Processed logprobs (SamplingParams.processed_logprobs, the chat request's `processed_logprobs`): the distribution a
token was drawn from, next to the raw one, in the sampler and in the chat response's JSON."""
import math

import pytest
import torch

from freehold.config import SpeculativeMode
from freehold.errors import InvalidRequestError
from freehold.sampling import Sampler, SamplingRow, make_generator
from freehold.sampling import logprobs as logprobs_module
from freehold.sampling.logprobs import sampling_probs
from freehold.sampling.transforms import transform_probs
from freehold.server.logprobs import chat_logprobs
from freehold.server.params import sampling_params
from freehold.server.protocol import ChatCompletionRequest
from freehold.types import SamplingParams
from tests.conftest import tiny_engine, tiny_model
from tests.unit.test_speculative import REPETITIVE, Oracle

VOCAB = 64


def sample_one(params: SamplingParams, logits: torch.Tensor, prompt=(), output=(), **row):
    sampler = Sampler(VOCAB, "cpu", eos_token_ids=[], seed=0)
    return sampler.sample(logits, [SamplingRow(params, prompt, output, make_generator(params.seed), **row)]).logprobs[0]


def logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3.0


def test_top_k_and_temperature_reshape_the_processed_distribution_only():
    raw = logits()
    params = SamplingParams(temperature=0.5, top_k=3, logprobs=5, processed_logprobs=True, seed=7)
    lp = sample_one(params, raw)
    plain = sample_one(SamplingParams(temperature=0.5, top_k=3, logprobs=5, seed=7), raw)
    assert (lp.token_id, lp.logprob, lp.top) == (plain.token_id, plain.logprob, plain.top)  # raw part unchanged
    assert plain.processed is None
    # top-3 at T = 0.5, by hand: softmax(l / 0.5) over the three largest logits, the rest probability 0
    values, ids = raw[0].topk(3)
    expected = torch.log_softmax(values / 0.5, dim=-1)
    assert [t for t, _ in lp.processed.top] == ids.tolist()  # only 3 of the 5 asked for: the others have p = 0
    assert [v for _, v in lp.processed.top] == pytest.approx(expected.tolist(), abs=1e-5)
    assert lp.token_id in ids.tolist()
    assert lp.processed.logprob == pytest.approx(dict(lp.processed.top)[lp.token_id], abs=1e-6)
    assert lp.processed.top[0][1] > lp.top[0][1]  # sharpened: the favourite gains probability


def test_greedy_rows_have_probability_one_on_their_token():
    lp = sample_one(SamplingParams(temperature=0.0, logprobs=3, processed_logprobs=True), logits(1))
    assert lp.processed.top == ((lp.token_id, 0.0),)
    assert lp.processed.logprob == 0.0
    assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id


def test_penalties_are_part_of_the_processed_distribution():
    raw = torch.zeros(1, VOCAB)
    raw[0, 5] = 4.0  # the favourite, until it is penalized
    raw[0, 6] = 3.0
    params = SamplingParams(temperature=1.0, logprobs=2, processed_logprobs=True, presence_penalty=2.0, seed=1)
    lp = sample_one(params, raw, output=[5])
    assert lp.top[0][0] == 5  # raw: unpenalized
    assert lp.processed.top[0][0] == 6  # processed: 4 - 2 = 2 < 3
    penalized = raw.clone()
    penalized[0, 5] -= 2.0
    assert lp.processed.top[0][1] == pytest.approx(torch.log_softmax(penalized[0], -1)[6].item(), abs=1e-5)


def test_the_chat_request_field_maps_and_needs_logprobs():
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=4,
                                 processed_logprobs=True, temperature=0.3)
    params = sampling_params(body, 10, 100)
    assert params.processed_logprobs and params.logprobs == 4
    plain = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], logprobs=True)
    assert not sampling_params(plain, 10, 100).processed_logprobs
    bad = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], processed_logprobs=True)
    with pytest.raises(InvalidRequestError) as err:
        sampling_params(bad, 10, 100)
    assert err.value.param == "processed_logprobs"
    with pytest.raises(InvalidRequestError):
        SamplingParams(processed_logprobs=True)


def test_chat_json_has_the_processed_fields_only_when_asked():
    raw = sample_one(SamplingParams(temperature=0.0, logprobs=2), logits(2))
    processed = sample_one(SamplingParams(temperature=0.0, logprobs=2, processed_logprobs=True), logits(2))
    text = str  # token id -> its "spelling"
    plain_json = chat_logprobs([raw], text).model_dump(mode="json")["content"][0]
    assert "processed_logprob" not in plain_json and "processed_top_logprobs" not in plain_json
    entry = chat_logprobs([processed], text).model_dump(mode="json")["content"][0]
    assert entry["processed_logprob"] == 0.0
    assert entry["processed_top_logprobs"] == [{"token": str(processed.token_id), "logprob": 0.0,
                                                "bytes": list(str(processed.token_id).encode())}]
    assert math.isclose(entry["logprob"], raw.logprob, abs_tol=1e-6)


# four likely tokens (p = .5, .3, .15, .05 up to ~1e-11) and 60 unlikely ones
FOUR = torch.full((1, VOCAB), -30.0)
FOUR[0, :4] = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
BIASED = 0.05 * math.e ** 3


def bits(*tokens: int) -> torch.Tensor:
    """An xgrammar-layout token bitmask [ceil(V / 32)] allowing exactly `tokens`."""
    mask = torch.zeros((VOCAB + 31) // 32, dtype=torch.int64)
    for t in tokens:
        mask[t // 32] |= 1 << (t % 32)
    return mask.to(torch.int32)


@pytest.mark.parametrize("options, row, expected", [
    # top-p 0.75: the smallest most-likely set with mass >= 0.75 is {0, 1} (0.8), renormalized
    (dict(top_p=0.75), {}, {0: 0.5 / 0.8, 1: 0.3 / 0.8}),
    # min-p 0.25: p >= 0.25 * 0.5 keeps 0, 1, 2
    (dict(min_p=0.25), {}, {0: 0.5 / 0.95, 1: 0.3 / 0.95, 2: 0.15 / 0.95}),
    # logit bias +3 on token 3: weight .05 e^3 ~ 1.004 against .95 for the rest
    (dict(logit_bias={3: 3.0}), {}, {3: BIASED / (0.95 + BIASED), 0: 0.5 / (0.95 + BIASED)}),
    # allowed tokens {1, 2} (allowed_token_ids)
    (dict(), {"allowed_token_mask": torch.isin(torch.arange(VOCAB), torch.tensor([1, 2]))},
     {1: 0.3 / 0.45, 2: 0.15 / 0.45}),
    # a structured-output grammar's bitmask allowing {2, 3}
    (dict(), {"token_bitmask": bits(2, 3)}, {2: 0.15 / 0.2, 3: 0.05 / 0.2}),
])
def test_filters_bias_and_masks_are_part_of_the_processed_distribution(options, row, expected):
    params = SamplingParams(temperature=1.0, logprobs=4, processed_logprobs=True, seed=3, **options)
    lp = sample_one(params, FOUR.clone(), **row)
    processed = dict(lp.processed.top)
    assert set(expected) <= set(processed) and lp.token_id in processed
    assert {t: math.exp(processed[t]) for t in expected} == pytest.approx(expected, abs=1e-5)
    if len(expected) < 4 and "logit_bias" not in options:  # the dropped tokens are not listed (p = 0)
        assert set(processed) == set(expected)
    assert [t for t, _ in lp.top] == [0, 1, 2, 3]  # the raw alternatives are the model's, untouched


@pytest.mark.parametrize("options", [
    dict(temperature=1.0), dict(temperature=0.7), dict(temperature=1.3, min_p=0.05), dict(temperature=0.8, top_k=1),
    dict(temperature=0.8, top_k=5), dict(temperature=0.5, top_k=7, min_p=0.1), dict(temperature=1.0, top_k=VOCAB),
    dict(temperature=0.9, top_k=1000), dict(temperature=0.9, top_p=0.8, top_k=9), dict(temperature=0.0, top_k=3),
])
def test_the_unsorted_distribution_is_the_sorted_one(options):
    """sampling_probs skips transform_probs' full sort when top-p is off: the same tensor, bit for bit, on logits
    with ties, masked (-inf) tokens and tokens far below the rest (p = 0 in fp32)."""
    params = SamplingParams(logprobs=1, processed_logprobs=True, **options)
    for seed in range(4):
        row = logits(seed)[0]
        row[::7] = float("-inf")
        row[1:4] = row[10]  # a tie, at the top-k threshold for some k
        row[5] = row.max() - 200.0
        expected = transform_probs(row, params.temperature, params.top_k, params.top_p, params.min_p)
        assert torch.equal(sampling_probs(row, params), expected)


def test_without_top_p_nothing_sorts_the_vocabulary(monkeypatch):
    def sorted_path(*args, **kwargs):
        raise AssertionError("the full sort ran")

    monkeypatch.setattr(logprobs_module, "transform_probs", sorted_path)
    lp = sample_one(SamplingParams(temperature=0.7, top_k=5, min_p=0.1, logprobs=3, processed_logprobs=True,
                                   seed=1), logits(4))
    assert lp.processed is not None
    with pytest.raises(AssertionError, match="full sort"):
        sample_one(SamplingParams(temperature=0.7, top_p=0.9, logprobs=3, processed_logprobs=True, seed=1), logits(4))


def test_speculative_rows_and_each_of_n_completions_report_their_own_distribution():
    """n = 2 completions decoded with drafts (every draft the greedy path: some accepted, some not): the processed
    logprobs of every token, verified draft positions included, are top-8 at T = 0.5 of the model's logits for that
    completion's own history, less its presence penalty, computed here by full forward passes."""
    model = tiny_model(2)
    prompt = REPETITIVE[0]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, presence_penalty=0.5, ignore_eos=True)
    engine = tiny_engine(model)
    engine.add_request("r", prompt, greedy)
    answer = [t for _ in iter(engine.has_unfinished, False) for o in engine.step() for t in o.outputs[0].token_ids]
    engine = tiny_engine(model, speculative=SpeculativeMode.NGRAM, num_speculative_tokens=4)
    Oracle(engine, {"r": answer}, noise=0.0)
    params = SamplingParams(n=2, max_tokens=10, temperature=0.5, top_k=8, presence_penalty=0.5, logprobs=3,
                            processed_logprobs=True, seed=11, ignore_eos=True)
    engine.add_request("r", prompt, params)
    tokens: dict[int, list[int]] = {0: [], 1: []}
    logprobs: dict[int, list] = {0: [], 1: []}
    while engine.has_unfinished():
        for out in engine.step():
            for completion in out.outputs:
                tokens[completion.index] += completion.token_ids
                logprobs[completion.index] += completion.logprobs or []
    assert engine.stats().num_accepted_tokens > 0 and tokens[0] != tokens[1]
    for index in (0, 1):
        assert len(logprobs[index]) == len(tokens[index]) == 10
        for i, lp in enumerate(logprobs[index]):
            history = prompt + tokens[index][:i]
            with torch.inference_mode():
                scores = model.compute_logits(model(torch.tensor(history), torch.arange(len(history)))[-1:])[0]
            scores = scores.float().clone()
            scores[sorted(set(tokens[index][:i]))] -= 0.5
            values, ids = scores.topk(8)
            expected = dict(zip(ids.tolist(), torch.log_softmax(values / 0.5, -1).tolist()))
            assert lp.token_id == tokens[index][i] and lp.token_id in expected
            assert lp.processed.logprob == pytest.approx(expected[lp.token_id], abs=1e-4)
            assert dict(lp.processed.top) == pytest.approx({t: expected[t] for t, _ in lp.processed.top}, abs=1e-4)
            assert [t for t, _ in lp.processed.top] == ids[:3].tolist()
