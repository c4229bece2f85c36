"""Draws from the batched sampler match the analytic distribution (chi-square), and filtered tokens never appear.

The batch dimension is used as repetitions: N identical rows, one sampler call, fixed seeds."""
import pytest
import torch
from scipy.stats import chisquare

from freehold.sampling import Sampler, SamplingRow, make_generator, transform_probs
from freehold.types import SamplingParams

VOCAB = 50
NUM_DRAWS = 30_000
MIN_EXPECTED = 5.0  # chi-square needs expected counts >= 5 per bin; smaller bins are merged into one


def fixed_logits() -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(1234)) * 2.0


def draw_counts(logits: torch.Tensor, params: SamplingParams, seed: int = 0) -> torch.Tensor:
    sampler = Sampler(VOCAB, "cpu", seed=seed)
    rows = [SamplingRow(params, prompt_token_ids=(), output_token_ids=())] * NUM_DRAWS
    tokens = sampler.sample(logits.expand(NUM_DRAWS, VOCAB).contiguous(), rows).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=VOCAB).double()


def chi_square_p(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit over tokens with p > 0, tiny-expected bins merged into one."""
    expected = probs.double() * observed.sum()
    support = probs > 0
    obs, exp = observed[support], expected[support]
    big = exp >= MIN_EXPECTED
    obs_bins = torch.cat([obs[big], obs[~big].sum().reshape(1)]) if (~big).any() else obs[big]
    exp_bins = torch.cat([exp[big], exp[~big].sum().reshape(1)]) if (~big).any() else exp[big]
    if len(exp_bins) < 2:
        return 1.0 if torch.equal(obs_bins, exp_bins) else 0.0
    exp_bins = exp_bins * obs_bins.sum() / exp_bins.sum()  # absorb float rounding of sum(p) == 1
    return float(chisquare(obs_bins.numpy(), exp_bins.numpy()).pvalue)


SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.6),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=1.3, top_k=20, top_p=0.9),
    dict(temperature=0.8, top_k=10, top_p=0.95, min_p=0.1),
    dict(temperature=1.5, top_p=0.5, min_p=0.02),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_draws_match_transformed_distribution(setting):
    logits = fixed_logits()
    probs = transform_probs(logits, setting["temperature"], setting.get("top_k"), setting.get("top_p", 1.0),
                            setting.get("min_p", 0.0))
    observed = draw_counts(logits, SamplingParams(**setting))
    assert observed[probs == 0].sum() == 0, "a filtered-out token was drawn"
    assert chi_square_p(observed, probs) > 1e-3


def test_chi_square_rejects_the_wrong_distribution():
    """The test above has power: draws at T=1 do not pass for the T=0.7 distribution."""
    logits = fixed_logits()
    observed = draw_counts(logits, SamplingParams(temperature=1.0))
    assert chi_square_p(observed, transform_probs(logits, 0.7)) < 1e-6


def test_filters_keep_the_expected_support():
    logits = fixed_logits()
    order = logits.argsort(descending=True)
    assert set(transform_probs(logits, 1.0, top_k=5).nonzero().flatten().tolist()) == set(order[:5].tolist())
    p = logits.softmax(-1)
    nucleus = transform_probs(logits, 1.0, top_p=0.8) > 0
    kept_mass = p[nucleus].sum()
    assert kept_mass >= 0.8 and kept_mass - p[nucleus].min() < 0.8  # smallest set reaching 0.8
    assert torch.equal(nucleus, p >= p[order[: int(nucleus.sum())]].min())  # it is a top set
    min_p = transform_probs(logits, 1.0, min_p=0.1) > 0
    assert torch.equal(min_p, p >= 0.1 * p.max())


def test_seeded_rows_match_the_distribution_too():
    """Per-row generators (one per row, different seeds) also sample the right distribution."""
    logits = fixed_logits()
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=0)
    n = 4000
    rows = [SamplingRow(params, (), (), make_generator(seed)) for seed in range(n)]
    tokens = Sampler(VOCAB, "cpu", seed=0).sample(logits.expand(n, VOCAB).contiguous(), rows).token_ids
    observed = torch.bincount(torch.tensor(tokens), minlength=VOCAB).double()
    probs = transform_probs(logits, 0.9, top_p=0.9)
    assert observed[probs == 0].sum() == 0
    assert chi_square_p(observed, probs) > 1e-3
